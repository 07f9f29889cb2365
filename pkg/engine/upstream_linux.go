//go:build linux

package engine

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sidecar-mesh/sidecar/pkg/upstream"
)

// upConn is one upstream connection of a loop: dialled for an attempt,
// carrying one request at a time, pooled between them.
type upConn struct {
	l      *loop
	fd     int
	addr   netip.AddrPort
	name   string // addr as errors name it
	state  upState
	events uint32
	out    []byte // request bytes the socket did not take yet
	in     []byte // answer bytes read and not yet passed on
	a      *Attempt
	timer  *Timer
	reused bool
	got    bool // a byte of the answer came
	// statusOK: the status line of the head being read was checked.
	statusOK bool

	// The answer being read.
	resp    *http.Response
	interim int
	left    int64 // body bytes left with a Content-Length; -1: to the close
	chunked bool
	chunks  chunkReader
	paused  bool // reading stops while the client has not taken enough
	passing bool // Respond passes the body on
	// draining: the answer was dropped (Drop); its body is read and
	// thrown away, and the connection pooled once it ends.
	draining bool
	idleAt   time.Time

	closeFn, headTimedOutFn func() // u.close and u.headTimedOut, for u.timer
}

type upState uint8

const (
	upConnecting upState = iota
	upWriting
	upHead // awaiting the answer's head
	upBody // the answer's body is passed on
	upIdle // in the pool
	upClosed
)

// pool holds a loop's idle upstream connections by endpoint, the most
// recently used last.
type pool struct {
	l    *loop
	idle map[netip.AddrPort][]*upConn
}

func (p *pool) init(l *loop) { p.l, p.idle = l, make(map[netip.AddrPort][]*upConn) }

// get returns an idle connection to addr, or nil. Only idle connections
// are pooled: one closed leaves the pool as it closes.
func (p *pool) get(addr netip.AddrPort) *upConn {
	list := p.idle[addr]
	if len(list) == 0 {
		return nil
	}
	u := list[len(list)-1]
	p.remove(u)
	u.timer.Stop()
	u.reused = true
	return u
}

// put pools u, whose answer ended where its framing said and left nothing
// behind; the pool full, it is closed.
func (p *pool) put(u *upConn) {
	list := p.idle[u.addr]
	if len(list) >= p.l.e.cfg.Transport.MaxIdleConnsPerHost || p.l.e.inShutdown.Load() {
		u.close()
		return
	}
	u.state, u.a, u.resp, u.idleAt, u.passing, u.paused, u.draining = upIdle, nil, nil, p.l.now, false, false, false
	u.in, u.out = u.in[:0], u.out[:0]
	// Idle, it is still read: any byte or a close retires it at once.
	u.setEvents(unix.EPOLLIN | unix.EPOLLRDHUP)
	u.timer.f = u.closeFn
	p.l.reset(u.timer, p.l.e.cfg.Transport.IdleConnTimeout)
	p.idle[u.addr] = append(list, u)
}

// remove takes u, idle, out of the pool.
func (p *pool) remove(u *upConn) {
	list := p.idle[u.addr]
	for i, v := range list {
		if v == u {
			list = append(list[:i], list[i+1:]...)
			list[len(list):cap(list)][0] = nil
			break
		}
	}
	if len(list) == 0 {
		delete(p.idle, u.addr)
		return
	}
	p.idle[u.addr] = list
}

func (p *pool) closeAll() {
	for _, list := range p.idle {
		for _, u := range slices.Clone(list) {
			u.close() // takes it out of the pool
		}
	}
	clear(p.idle)
}

// Attempt is one sending of a request to an endpoint.
type Attempt struct {
	x              *Exchange
	u              *upConn
	addr           netip.AddrPort
	req            *http.Request
	wire           []byte // the request's head and body, for a resend
	connectTimeout time.Duration
	done           func(*Attempt, *http.Response, error)
	resent         bool
	over           bool // done was called with an error, or the attempt was cancelled
}

func (x *Exchange) newAttempt(addr netip.AddrPort, req *http.Request, body []byte, connectTimeout time.Duration, done func(*Attempt, *http.Response, error)) *Attempt {
	a := &Attempt{x: x, addr: addr, req: req, connectTimeout: connectTimeout, done: done}
	// Room for a usual head and the body: one allocation.
	w := appender{make([]byte, 0, 1024+len(body))}
	if err := upstream.WriteRequestHead(&w, req); err != nil {
		a.over = true
		x.l.later(func() { done(a, nil, err) })
		return a
	}
	a.wire = append(w.b, body...)
	a.connect(false)
	return a
}

// appender is an upstream.HeadWriter that appends to b.
type appender struct{ b []byte }

func (a *appender) Write(p []byte) (int, error)       { a.b = append(a.b, p...); return len(p), nil }
func (a *appender) WriteByte(c byte) error            { a.b = append(a.b, c); return nil }
func (a *appender) WriteString(s string) (int, error) { a.b = append(a.b, s...); return len(s), nil }

// connect gives the attempt a connection: a pooled one, unless fresh, or
// a new one.
func (a *Attempt) connect(fresh bool) {
	l := a.x.l
	if !fresh {
		if u := l.pool.get(a.addr); u != nil {
			a.bind(u)
			u.send()
			return
		}
	}
	u, err := l.dial(a.addr)
	if err != nil {
		// Told once Send has returned, as every outcome is.
		l.later(func() { a.fail(&upstream.ConnectError{Addr: a.addr.String(), Err: err}) })
		return
	}
	a.bind(u)
	d := a.connectTimeout
	if d <= 0 {
		d = l.e.cfg.Transport.DialTimeout
	}
	u.timer.f = func() {
		u.close()
		a.fail(&upstream.ConnectError{Addr: u.name, Err: fmt.Errorf("%w after %v", upstream.ErrConnectTimeout, d)})
	}
	l.reset(u.timer, d)
}

func (a *Attempt) bind(u *upConn) {
	a.u, u.a = u, a
	u.out = append(u.out[:0], a.wire...)
	u.got, u.interim, u.resp = false, 0, nil
}

// fail ends the attempt with err, once.
func (a *Attempt) fail(err error) {
	if a.over {
		return
	}
	a.over = true
	a.u = nil
	a.x.forget(a)
	a.done(a, nil, err)
}

// maxDrain is the most of a dropped answer's body read to keep its
// connection, as the goroutine path reads at most 64 KiB of an answer it
// retries past.
const maxDrain = 64 << 10

// Drop abandons the answer done delivered, as a retry does: the rest of
// its body, when its Content-Length leaves at most maxDrain bytes, is read
// and thrown away within d, and the connection pooled once it ended where
// its framing said; any other answer's connection is closed, as Cancel
// closes it. done is not called again.
func (a *Attempt) Drop(d time.Duration) {
	if a == nil || a.over {
		return
	}
	u := a.u
	if u == nil || u.state != upBody || u.chunked || u.left < 0 || u.left > maxDrain || d <= 0 || !u.reusable(a) {
		a.Cancel()
		return
	}
	a.over = true
	a.u, u.a = nil, nil
	a.x.forget(a)
	u.draining, u.passing = true, true
	buffered := u.in
	u.in = nil
	u.drain(buffered)
	if u.state != upBody {
		return // pooled, or closed
	}
	u.in = buffered[:0]
	u.pause(false)
	u.timer.f = u.closeFn
	u.l.reset(u.timer, d)
}

// drain reads b, body bytes of a dropped answer: the connection is pooled
// once the body ended, closed if anything came after it.
func (u *upConn) drain(b []byte) {
	n := int(min(int64(len(b)), u.left))
	u.left -= int64(n)
	switch {
	case n < len(b):
		u.close() // a byte nobody asked for
	case u.left == 0:
		u.timer.Stop()
		u.l.pool.put(u) // reusable: Drop drains no other
	}
}

// reusable reports whether u may carry another request once a's answer
// ended where its framing said: the whole request was written (an answer
// that came before it leaves the rest unwritten), and neither side asked
// for the connection to close.
func (u *upConn) reusable(a *Attempt) bool {
	return len(u.out) == 0 && !u.resp.Close && !a.req.Close
}

// Cancel abandons the attempt: its connection is closed (an answer being
// read with it), and done is not called again.
func (a *Attempt) Cancel() {
	if a == nil || a.over {
		return
	}
	a.over = true
	if a.u != nil {
		a.u.a = nil
		a.u.close()
		a.u = nil
	}
	a.x.forget(a)
}

func (l *loop) dial(addr netip.AddrPort) (*upConn, error) {
	family := unix.AF_INET
	var sa unix.Sockaddr
	if addr.Addr().Is4() || addr.Addr().Is4In6() {
		sa = &unix.SockaddrInet4{Port: int(addr.Port()), Addr: addr.Addr().Unmap().As4()}
	} else {
		family = unix.AF_INET6
		sa = &unix.SockaddrInet6{Port: int(addr.Port()), Addr: addr.Addr().As16()}
	}
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	_ = unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	err = unix.Connect(fd, sa)
	if err != nil && !errors.Is(err, unix.EINPROGRESS) {
		_ = unix.Close(fd)
		return nil, dialError(addr, err)
	}
	u := &upConn{l: l, fd: fd, addr: addr, name: addr.String(), state: upConnecting}
	u.timer = &Timer{l: l, index: -1}
	u.closeFn, u.headTimedOutFn = u.close, u.headTimedOut // made once, not each time a timer is set
	l.track(fd, u)
	u.events = unix.EPOLLOUT | unix.EPOLLIN | unix.EPOLLRDHUP
	if err := l.watch(unix.EPOLL_CTL_ADD, fd, u.events); err != nil {
		l.forget(fd)
		return nil, err
	}
	return u, nil // connected or not, EPOLLOUT says so next
}

// dialError is a failed connect as Go's dialer reports it ("dial tcp
// addr: connect: connection refused"), so that either engine's answers
// name it alike.
func dialError(addr netip.AddrPort, err error) error {
	return &net.OpError{Op: "dial", Net: "tcp", Addr: net.TCPAddrFromAddrPort(addr), Err: os.NewSyscallError("connect", err)}
}

func (u *upConn) setEvents(ev uint32) {
	if u.events != ev && u.state != upClosed {
		u.events = ev
		_ = u.l.watch(unix.EPOLL_CTL_MOD, u.fd, ev)
	}
}

func (u *upConn) close() {
	if u.state == upClosed {
		return
	}
	if u.state == upIdle {
		// Closed while pooled (idle too long, a stray byte, the peer
		// gone): out of the pool at once, not when next asked for.
		u.l.pool.remove(u)
	}
	u.state = upClosed
	u.timer.Stop()
	u.l.forget(u.fd)
}

func (u *upConn) event(ev uint32) {
	switch u.state {
	case upIdle:
		u.close() // a byte nobody asked for, or the peer closing
		return
	case upConnecting:
		if ev&(unix.EPOLLOUT|unix.EPOLLERR|unix.EPOLLHUP) == 0 {
			return
		}
		if e, err := unix.GetsockoptInt(u.fd, unix.SOL_SOCKET, unix.SO_ERROR); err != nil || e != 0 {
			a := u.a
			u.close()
			if err == nil {
				err = unix.Errno(e)
			}
			if a != nil {
				a.fail(&upstream.ConnectError{Addr: u.name, Err: dialError(u.addr, err)})
			}
			return
		}
		u.timer.Stop()
		u.send()
		return
	}
	if ev&unix.EPOLLOUT != 0 && u.state == upWriting {
		u.write()
		if u.state == upClosed {
			return
		}
	}
	// Paused, the connection is not read; but a reset or a close of both
	// ways is reported whatever was asked, and keeps being reported: it is
	// read then, to learn how it ended.
	if ev&(unix.EPOLLIN|unix.EPOLLRDHUP) != 0 && !u.paused || ev&(unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		u.read()
	}
}

// send starts writing the attempt's request on a connected connection.
func (u *upConn) send() {
	u.state = upWriting
	u.write()
}

func (u *upConn) write() {
	n, err := unix.Write(u.fd, u.out)
	if err != nil && !errors.Is(err, unix.EAGAIN) && !errors.Is(err, unix.EINTR) {
		u.failed("write request", n > 0 || len(u.out) < len(u.a.wire), err)
		return
	}
	u.out = u.out[:copy(u.out, u.out[max(n, 0):])]
	if len(u.out) > 0 {
		u.setEvents(unix.EPOLLOUT | unix.EPOLLIN | unix.EPOLLRDHUP)
		return
	}
	u.state = upHead
	u.setEvents(unix.EPOLLIN | unix.EPOLLRDHUP)
	if !u.got {
		u.timer.f = u.headTimedOutFn
		u.l.reset(u.timer, u.l.e.cfg.Transport.ResponseHeaderTimeout)
	}
}

func (u *upConn) headTimedOut() {
	u.failed("read response", true, upstream.ErrResponseHeaderTimeout)
}

// failed ends the connection and, unless it can be sent again on a new
// one, the attempt: a reused connection that failed before any byte of the
// answer came may have been closed by the endpoint as it sat idle.
func (u *upConn) failed(op string, written bool, err error) {
	a := u.a
	answered := u.resp != nil
	u.a = nil
	u.close()
	if a == nil {
		return
	}
	ue := &upstream.UpstreamError{Addr: u.name, Op: op, Written: written, Err: err}
	if u.reused && !u.got && !a.resent && upstream.Resendable(a.req, ue) {
		a.resent = true
		a.connect(true)
		return
	}
	if answered {
		a.x.upstreamCut(a, ue)
		return
	}
	a.fail(ue)
}

func (u *upConn) read() {
	n, err := unix.Read(u.fd, u.l.scratch)
	if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
		return
	}
	if n <= 0 {
		u.eof(err)
		return
	}
	b := u.l.scratch[:n]
	if u.state == upWriting || u.state == upHead {
		u.got = true
		u.in = append(u.in, b...)
		u.head()
		return
	}
	if u.state == upBody {
		if !u.passing {
			// The handler has the head and has not said yet: hold what
			// comes, within bounds.
			if len(u.in)+len(b) > maxClientBacklog {
				u.failed("read response", true, errors.New("answer body arrived before it was asked for, past the buffer"))
				return
			}
			u.in = append(u.in, b...)
			return
		}
		u.body(b)
	}
}

// eof is the endpoint closing the connection (or resetting it).
func (u *upConn) eof(err error) {
	if err == nil {
		err = io.EOF
		if u.got && u.resp == nil {
			// Within a head: as the transport's reader ends it.
			err = io.ErrUnexpectedEOF
			if u.a != nil && len(u.in) > 0 {
				err = upstream.CutHeadError(u.in, u.a.req)
			}
		}
	}
	if u.state == upBody && u.left < 0 && !u.chunked && err == io.EOF {
		// The answer's body ran to the close: it ended.
		a := u.a
		u.a = nil
		u.close()
		if a != nil {
			a.x.bodyEnded(a, nil)
		}
		return
	}
	if u.state == upBody && err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	u.failed("read response", true, err)
}

// head parses the answer's head once it is whole.
func (u *upConn) head() {
	a := u.a
	max := u.l.e.cfg.Transport.MaxResponseHeaderBytes
	for {
		end := headEnd(u.in)
		if end == 0 || end > max {
			if end > max || len(u.in) > max {
				u.failed("read response", true, &upstream.BadResponseError{Reason: "response header larger than " + strconv.Itoa(max) + " bytes"})
				return
			}
			// A status line that is not one fails now, as the
			// transport's reader fails it, not once a head ends.
			if nl := bytes.IndexByte(u.in, '\n'); nl >= 0 && !u.statusOK {
				if _, err := upstream.ParseResponseHead(append(u.in[:nl+1:nl+1], '\r', '\n'), a.req); err != nil {
					u.failed("read response", true, err)
					return
				}
				u.statusOK = true
			}
			return
		}
		u.statusOK = false
		resp, err := upstream.ParseResponseHead(u.in[:end], a.req)
		if err != nil {
			u.failed("read response", true, err)
			return
		}
		u.in = u.in[:copy(u.in, u.in[end:])]
		if resp.StatusCode == http.StatusSwitchingProtocols {
			u.failed("read response", true, errors.New("101 Switching Protocols to a request that asked for no upgrade"))
			return
		}
		if resp.StatusCode < 200 {
			if u.interim++; u.interim > upstream.MaxInterimResponses {
				u.failed("read response", true, &upstream.BadResponseError{Reason: upstream.ErrTooManyInterim.Error()})
				return
			}
			continue
		}
		u.timer.Stop()
		if u.state == upWriting {
			// An answer before the whole request was written: what is
			// left is never written (the connection is not reused for
			// another request, whose bytes would follow the missing
			// ones), and writability no longer matters.
			u.setEvents(unix.EPOLLIN | unix.EPOLLRDHUP)
		}
		u.resp, u.state = resp, upBody
		u.chunked, u.left = false, 0
		switch {
		case resp.Body == http.NoBody:
		case len(resp.TransferEncoding) > 0:
			u.chunked = true
			u.chunks = chunkReader{maxTrailer: max}
		case resp.ContentLength >= 0:
			u.left = resp.ContentLength
		default:
			u.left = -1
		}
		resp.Body = http.NoBody // the engine passes the body on itself
		// The handler's word follows (the answer passed on, or
		// cancelled); what comes before it is held (read).
		a.x.headCame(a, resp)
		return
	}
}

// pause stops or resumes reading the connection.
func (u *upConn) pause(on bool) {
	if u.paused == on || u.state == upClosed {
		return
	}
	u.paused = on
	if on {
		// Nothing asked: a close is heard when reading resumes (asking
		// for it would report it again and again, level-triggered).
		u.setEvents(0)
	} else {
		u.setEvents(unix.EPOLLIN | unix.EPOLLRDHUP)
	}
}

// complete reports whether the body ended where its framing said.
func (u *upConn) complete() bool {
	if u.chunked {
		return u.chunks.done()
	}
	return u.left == 0
}

// body passes body bytes b on to the client, as the framing says.
func (u *upConn) body(b []byte) {
	a := u.a
	if a == nil {
		if u.draining {
			u.drain(b)
			return
		}
		u.close()
		return
	}
	x := a.x
	var err error
	n := len(b)
	switch {
	case u.chunked:
		n, err = u.chunks.feed(b, x.bodyData)
	case u.left >= 0:
		n = int(min(int64(len(b)), u.left))
		if n > 0 {
			x.bodyData(b[:n])
		}
		u.left -= int64(n)
	default:
		x.bodyData(b)
	}
	if u.state == upClosed || a.over {
		return // the client went away meanwhile
	}
	if err != nil {
		u.failed("read response", true, &upstream.BadResponseError{Reason: err.Error()}) // errBadChunk: bounded
		return
	}
	if !u.complete() {
		if x.c.pending() > maxClientBacklog {
			u.pause(true)
		}
		return
	}
	// The answer ended. Anything after it is a byte nobody asked for:
	// the connection is never reused then.
	reuse := n == len(b) && u.reusable(a)
	a.u, u.a = nil, nil
	if reuse {
		u.l.pool.put(u)
	} else {
		u.close()
	}
	x.bodyEnded(a, u.chunks.trailer)
}

// maxClientBacklog is how much of an answer may wait for the client before
// the upstream is no longer read.
const maxClientBacklog = 64 << 10

// later runs f on the loop once the current event is handled.
func (l *loop) later(f func()) { l.soon = append(l.soon, f) }

// runSoon runs what later queued, and what that queues.
func (l *loop) runSoon() {
	for len(l.soon) > 0 {
		f := l.soon[0]
		l.soon[0] = nil
		l.soon = l.soon[1:]
		l.runOne(f)
	}
	l.soon = l.soon[:0:cap(l.soon)]
}

func (l *loop) runOne(f func()) {
	defer l.recoverFor(nil)
	f()
}
