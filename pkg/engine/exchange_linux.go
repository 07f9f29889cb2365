//go:build linux

package engine

import (
	"errors"
	"net/http"
	"net/netip"
	"strconv"
	"time"

	"golang.org/x/net/http/httpguts"
	"golang.org/x/sys/unix"
)

// Exchange is one request the engine read and its answer. Its methods run
// on the loop (in Serve or in a callback the exchange calls) and must not
// be kept past the exchange's end.
type Exchange struct {
	// Request is the request as the listener's fast path parses it; its
	// Body reads Body, and GetBody gives it again.
	Request *http.Request
	// Body is the request's whole body (nil without one).
	Body []byte

	c        *clientConn
	l        *loop
	consumed int       // bytes of the connection's input the request took
	since    time.Time // when the request was read whole

	handedOff bool
	started   bool
	ended     bool
	answered  bool // Reply or Respond was called
	attempts  []*Attempt
	attempt1  [1]*Attempt // attempts' first backing array
	timer2    [2]*Timer   // timers' first backing array
	timers    []*Timer
	onGone    func()

	// The answer.
	answering *Attempt // whose body is passed on
	head      answerHead
	headSent  bool
	held      []byte // body bytes held back until the head can be written
	written   bool   // every byte of the answer is queued
	sent      int64  // body bytes queued for the client
	end       func(error)
}

// ErrClientGone is what an answer's end is told when the client left (or
// stopped reading past the write timeout) before all of it was written.
var ErrClientGone = errors.New("engine: the client went away")

// Now is the loop's time: when the events being handled came.
func (x *Exchange) Now() time.Time { return x.l.now }

// Handoff gives the connection, this request and all after it, to the
// listener's server (Config.Handoff). Only in Serve, before anything else.
func (x *Exchange) Handoff() {
	if x.started || x.handedOff {
		panic("engine: Handoff after the exchange started")
	}
	x.handedOff = true
	x.c.x = nil
	x.l.e.active.Add(-1)
	x.c.handoff(false)
}

// start marks the exchange as the engine's: the request's bytes are
// consumed.
func (x *Exchange) start() {
	if x.handedOff {
		panic("engine: the exchange was handed off")
	}
	if !x.started {
		x.started = true
		c := x.c
		c.in = c.in[:copy(c.in, c.in[x.consumed:])]
	}
}

// AfterFunc runs f on the loop after d, unless the timer is stopped or
// the exchange ended first.
func (x *Exchange) AfterFunc(d time.Duration, f func()) *Timer {
	x.start()
	if x.ended {
		return nil
	}
	t := x.l.after(d, x, f)
	x.timers = append(x.timers, t)
	return t
}

// OnGone sets what runs when the client goes away before the exchange
// answered (Reply or Respond called): the engine has already cancelled the
// attempts and timers. Once answering, the answer's end is told instead
// (if it has one).
// Timers of an exchange that ended (answered, gone, aborted) are stopped;
// AfterFunc on one returns nil.
func (x *Exchange) OnGone(f func()) { x.onGone = f }

// Send sends req to addr, on an idle connection to it of this loop's pool
// or a new one, connecting within connectTimeout (0: the transport's
// DialTimeout). The request's head is written as upstream.WriteRequestHead
// writes it, body after it (req's Body is not read). done is called on the
// loop, once: with the answer's final head (interim answers skipped, its
// Body not to be read: Respond passes it on), or with the error (an
// *upstream.ConnectError when no connection could be made, an
// *upstream.UpstreamError once the request may have been sent). After an
// answer, Respond passes it on, or Cancel drops it.
func (x *Exchange) Send(addr netip.AddrPort, req *http.Request, body []byte, connectTimeout time.Duration, done func(*Attempt, *http.Response, error)) *Attempt {
	x.start()
	a := x.newAttempt(addr, req, body, connectTimeout, done)
	if !a.over {
		x.attempts = append(x.attempts, a)
	}
	return a
}

func (x *Exchange) forget(a *Attempt) {
	for i, b := range x.attempts {
		if b == a {
			x.attempts = append(x.attempts[:i], x.attempts[i+1:]...)
			return
		}
	}
}

// headCame gives the handler an attempt's answer head.
func (x *Exchange) headCame(a *Attempt, resp *http.Response) { a.done(a, resp, nil) }

// Reply answers with a complete answer of the handler's own; end is called
// once it is written, or the client is gone.
func (x *Exchange) Reply(status int, header http.Header, body []byte, end func(error)) {
	x.start()
	x.answer(end)
	x.head = answerHead{status: status, header: header, isHEAD: x.Request.Method == http.MethodHead, done: true}
	c := x.c
	c.cork()
	x.sendHead(body)
	if !x.head.noBody {
		c.write(body)
	}
	x.allWritten()
	c.uncork()
}

// answer marks the exchange as answering: its other attempts end; its
// timers run on (a deadline may bound the answer too) until it ends.
func (x *Exchange) answer(end func(error)) {
	if x.answered || x.ended {
		panic("engine: the exchange answered twice")
	}
	x.answered, x.end = true, end
	for len(x.attempts) > 0 {
		x.attempts[len(x.attempts)-1].Cancel()
	}
}

func (x *Exchange) stopTimers() {
	for _, t := range x.timers {
		t.Stop()
	}
	x.timers = nil
}

// Respond passes a's answer on to the client: resp's status and header
// (as the handler left them; the framing is the engine's: the body goes
// with the Content-Length it came with, or in chunks, with the trailers
// the endpoint sent that a trailer may hold), then its body as it comes.
// end is called once all of it is written, or with the error that cut it
// (the endpoint's, or ErrClientGone).
func (x *Exchange) Respond(a *Attempt, resp *http.Response, end func(error)) {
	u := a.u
	x.forget(a) // not cancelled with the others
	x.answer(end)
	x.answering = a
	c := x.c
	c.cork() // the head and the body at hand: one write
	defer c.uncork()
	h := resp.Header
	delete(h, "Transfer-Encoding")
	if u.chunked || u.left < 0 {
		delete(h, "Content-Length")
	} else if u.left > 0 {
		var b [20]byte
		if n := strconv.AppendInt(b[:0], u.left, 10); len(h["Content-Length"]) != 1 || h["Content-Length"][0] != string(n) {
			h["Content-Length"] = []string{string(n)}
		}
	}
	x.head = answerHead{status: resp.StatusCode, header: h, isHEAD: x.Request.Method == http.MethodHead}
	_, hasType := h["Content-Type"]
	if hasType || h.Get("Content-Encoding") != "" || u.chunked || u.left <= 0 || !bodyAllowed(resp.StatusCode) || x.head.isHEAD {
		// A stream's head goes out at once, as the Forwarder flushes it;
		// a body of known length without a type waits for the bytes its
		// type is sniffed from, as net/http's writer does.
		x.sendHead(nil)
	}
	buffered := u.in
	u.in = nil
	u.passing = true
	u.pause(false)
	if len(buffered) > 0 || u.complete() {
		u.body(buffered) // what it passes on is written or copied
	}
	if u.in == nil && u.state != upClosed {
		u.in = buffered[:0] // the buffer serves the connection's next answer
	}
}

// sendHead writes the answer's head, p being the first bytes of its body.
func (x *Exchange) sendHead(p []byte) {
	c := x.c
	x.head.close = c.closing || x.l.e.inShutdown.Load() || x.l.e.noKeepAlive.Load()
	if x.head.close {
		c.closing = true
	}
	x.headSent = true
	if c.queuing() {
		// Queued anyway: written into the queue.
		if c.state != clClosed {
			c.out = appendHead(c.out, &x.head, p, x.l.now)
		}
		return
	}
	c.write(appendHead(x.l.headBuf[:0], &x.head, p, x.l.now))
}

// bodyData passes on a run of the answer's body.
func (x *Exchange) bodyData(p []byte) {
	if x.c.state == clClosed || len(p) == 0 {
		return
	}
	if !x.headSent {
		x.held = append(x.held, p...)
		if len(x.held) < 512 {
			return
		}
		p, x.held = x.held, nil
		x.sendHead(p)
	}
	x.writeBody(p)
}

// Sent is how many bytes of the answer's body went to the client so far
// (queued for it): what a watch for a silent stream compares.
func (x *Exchange) Sent() int64 { return x.sent }

// Abort ends the exchange at once: the client's connection is closed (an
// answer under way is cut, so that the client sees it incomplete), and so
// is the upstream connection of an attempt or answer. The answer's end is
// told ErrAborted.
func (x *Exchange) Abort() {
	if x.ended {
		return
	}
	c := x.c
	end := x.end
	x.stop()
	c.x = nil
	c.detach()
	_ = unix.Close(c.fd)
	if end != nil {
		end(ErrAborted)
	}
}

// ErrAborted is what an answer's end is told when the handler aborted it.
var ErrAborted = errors.New("engine: the exchange was aborted")

func (x *Exchange) writeBody(p []byte) {
	x.sent += int64(len(p))
	switch {
	case x.head.noBody:
	case x.head.chunked:
		b := make([]byte, 0, len(p)+20)
		b = strconv.AppendInt(b, int64(len(p)), 16)
		b = append(b, "\r\n"...)
		b = append(b, p...)
		b = append(b, "\r\n"...)
		x.c.write(b)
	default:
		x.c.write(p)
	}
}

// bodyEnded is the answer's body ending where its framing said, with the
// trailers of a chunked one.
func (x *Exchange) bodyEnded(a *Attempt, trailer http.Header) {
	if x.answering != a || x.c.state == clClosed {
		return
	}
	a.over, a.u = true, nil
	if !x.headSent {
		p := x.held
		x.held = nil
		x.sendHead(p)
		x.writeBody(p)
	}
	if x.head.chunked {
		var tr http.Header
		for k, vv := range trailer {
			// Framing, routing and authentication fields may not be
			// trailers (RFC 9110, 6.5.1), as the Forwarder keeps them out.
			if httpguts.ValidTrailerHeader(k) {
				if tr == nil {
					tr = make(http.Header, len(trailer))
				}
				tr[http.TrailerPrefix+k] = vv
			}
		}
		x.c.write(appendTrailers(make([]byte, 0, 64), tr))
	}
	x.allWritten()
}

// upstreamCut is the endpoint failing while its answer was passed on: too
// late for an error of the sidecar's own, the client's connection is cut so
// that it sees the answer is incomplete.
func (x *Exchange) upstreamCut(a *Attempt, err error) {
	if x.answering != a {
		a.fail(err)
		return
	}
	a.over, a.u = true, nil
	end := x.end
	x.ended = true
	x.stopTimers()
	c := x.c
	c.x = nil
	c.l.e.active.Add(-1)
	// What is queued (the head, the body so far) goes out first, as far
	// as the socket takes it: the client sees an answer cut, not a
	// connection closed with no answer (which a client may take for a
	// stale connection and send again).
	if len(c.out) > 0 {
		_, _ = unix.Write(c.fd, c.out)
	}
	c.detach()
	_ = unix.Close(c.fd)
	if end != nil {
		end(err)
	}
}

// allWritten is every byte of the answer queued: the exchange ends once
// the client took them.
func (x *Exchange) allWritten() {
	x.written = true
	if x.c.pending() == 0 {
		x.complete()
	}
}

// drained is the client having taken every byte queued.
func (x *Exchange) drained() {
	if x.written {
		x.complete()
		return
	}
	if a := x.answering; a != nil && a.u != nil {
		a.u.pause(false)
	}
}

func (x *Exchange) complete() {
	if x.ended {
		return
	}
	x.ended = true
	x.stopTimers()
	end := x.end
	x.c.finish()
	if end != nil {
		end(nil)
	}
}

// stop ends the exchange where it stands: its timers, its attempts and
// the upstream connection of an answer being passed on.
func (x *Exchange) stop() {
	x.ended = true
	x.l.e.active.Add(-1)
	x.stopTimers()
	for len(x.attempts) > 0 {
		x.attempts[len(x.attempts)-1].Cancel()
	}
	if a := x.answering; a != nil && a.u != nil {
		a.over = true
		a.u.a = nil
		a.u.close()
		a.u = nil
	}
}

// clientGone ends the exchange of a client that went away.
func (x *Exchange) clientGone() {
	if x.ended {
		return
	}
	x.stop()
	switch {
	case x.end != nil:
		x.end(ErrClientGone)
	case x.onGone != nil && !x.answered:
		x.onGone()
	}
}
