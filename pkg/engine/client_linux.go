//go:build linux

package engine

import (
	"bytes"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sidecar-mesh/sidecar/pkg/downstream"
)

// clientConn is one client connection a loop owns: it reads a request
// (head, then body), has the handler serve it as an Exchange, writes the
// answer, and goes on with the next, until the client or the answer closes
// it, or a request the engine does not serve hands it off.
type clientConn struct {
	l      *loop
	fd     int
	remote string // "ip:port", as the request's RemoteAddr
	state  clientState
	events uint32 // registered with epoll
	in     []byte // read and not consumed: the request being read, and any after it
	out    []byte // answer bytes the socket did not take yet
	rt, wt Timer  // the read timer (idle, head, body) and the write timer
	x      *Exchange
	pend   *http.Request // a request whose body is being read
	pendAt int           // the length of its head
	// closing: the connection ends once the current answer is written.
	closing bool
	// peerDone: the client shut its side down; the connection ends once
	// the requests it sent are answered.
	peerDone bool
	// corked: writes are queued, not made, until uncork (a head and the
	// body bytes already at hand go out in one write).
	corked bool
}

type clientState uint8

const (
	clIdle     clientState = iota // between requests: the idle timeout runs
	clHead                        // a head is arriving: the header timeout runs
	clBody                        // a body is arriving: the body timeout runs for each wait
	clServing                     // the handler has the exchange
	clDraining                    // the last answer is being written, then the connection closes
	clClosed
)

// maxPipelined bounds what a client may send ahead while its request is
// served: past it the engine stops reading until the answer is out.
const maxPipelined = 64 << 10

func (l *loop) newClient(fd int, sa unix.Sockaddr) {
	c := &clientConn{l: l, fd: fd, remote: sockaddrString(sa)}
	c.rt = Timer{l: l, index: -1, f: c.readTimedOut}
	c.wt = Timer{l: l, index: -1, f: c.abort}
	l.track(fd, c)
	l.clients[c] = struct{}{}
	l.e.conns.Add(1)
	c.events = unix.EPOLLIN | unix.EPOLLRDHUP
	if err := l.watch(unix.EPOLL_CTL_ADD, fd, c.events); err != nil {
		c.abort()
		return
	}
	// As net/http: the first request's head must come within the header
	// timeout of the connection's start. A connection whose head or body
	// does not come in time, or that is idle too long, is closed without
	// a word, as net/http closes it.
	c.state = clHead
	l.reset(&c.rt, l.e.cfg.Limits.ReadHeaderTimeout)
}

func sockaddrString(sa unix.Sockaddr) string {
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port)).String()
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(a.Addr), uint16(a.Port)).String()
	}
	return ""
}

func (c *clientConn) setEvents(ev uint32) {
	if c.events != ev && c.state != clClosed {
		c.events = ev
		_ = c.l.watch(unix.EPOLL_CTL_MOD, c.fd, ev)
	}
}

func (c *clientConn) event(ev uint32) {
	if ev&unix.EPOLLOUT != 0 {
		c.flush()
	}
	if c.state != clClosed && ev&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		c.read()
	}
}

// read takes what the socket has.
func (c *clientConn) read() {
	room := len(c.l.scratch)
	if c.state == clServing || c.state == clDraining {
		room = min(room, maxPipelined-len(c.in))
		if room <= 0 {
			// Enough ahead: stop reading (and asking to hear a close,
			// which level-triggered would be reported again and again);
			// a reset is reported still, and ends the connection.
			if ev := c.events &^ (unix.EPOLLIN | unix.EPOLLRDHUP); c.events != ev {
				c.setEvents(ev)
				return
			}
			c.abort()
			return
		}
	}
	n, err := unix.Read(c.fd, c.l.scratch[:room])
	if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
		return
	}
	if n == 0 && err == nil && (c.state == clServing || c.state == clDraining) {
		c.halfClosed()
		return
	}
	if n <= 0 {
		// The client left (or reset) between requests.
		c.abort()
		return
	}
	c.in = append(c.in, c.l.scratch[:n]...)
	switch c.state {
	case clIdle:
		c.state = clHead
		c.l.reset(&c.rt, c.l.e.cfg.Limits.ReadHeaderTimeout)
		c.next()
	case clHead, clBody:
		c.next()
	}
}

// next reads the next request out of c.in, if it is whole, and serves it.
func (c *clientConn) next() {
	if c.state == clHead {
		if len(c.in) == 0 {
			return
		}
		if !requestStart(c.in[0]) {
			c.handoff(false) // leading CR/LF, TLS, binary: the server's to judge
			return
		}
		end := headEnd(c.in)
		limit := c.l.e.cfg.Limits.MaxHeaderBytes
		if end == 0 {
			if len(c.in) > limit {
				c.handoff(false) // the server answers 431
			}
			return
		}
		req := new(http.Request)
		if end > limit || !downstream.PlainRequest(c.in[:end], c.remote, req) || req.ContentLength > MaxBody {
			c.handoff(false)
			return
		}
		c.pend, c.pendAt, c.state = req, end, clBody
	}
	if c.state == clBody {
		if int64(len(c.in)-c.pendAt) < c.pend.ContentLength {
			c.l.reset(&c.rt, c.l.e.cfg.Limits.BodyReadTimeout)
			return
		}
		c.dispatch()
	}
}

// dispatch hands the request read whole to the handler.
func (c *clientConn) dispatch() {
	req, end := c.pend, c.pendAt
	c.pend, c.pendAt = nil, 0
	var body []byte
	if n := req.ContentLength; n > 0 {
		body = bytes.Clone(c.in[end : end+int(n)])
		req.Body = io.NopCloser(bytes.NewReader(body))
		req.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(body)), nil }
	}
	c.state = clServing
	c.rt.Stop()
	x := &Exchange{Request: req, Body: body, c: c, l: c.l, consumed: end + len(body), since: c.l.now}
	x.attempts, x.timers = x.attempt1[:0], x.timer2[:0]
	c.x = x
	c.l.e.active.Add(1)
	if req.Close || c.l.e.inShutdown.Load() || c.l.e.noKeepAlive.Load() {
		c.closing = true
	}
	c.l.serve(x)
}

// serve runs the handler; a panic in it ends the exchange's connection.
func (l *loop) serve(x *Exchange) {
	defer l.recoverFor(x.c)
	l.e.cfg.Handler.Serve(x)
	if !x.handedOff && !x.started {
		panic("engine: the handler returned without starting or handing off the exchange")
	}
}

// handoff gives the connection, with every byte read of it, to the
// listener's server. expired: the body being read already waited the body
// timeout, so the server's next read of the connection times out at once
// (it answers 408 as it would have), rather than waiting it again.
func (c *clientConn) handoff(expired bool) {
	buffered := c.in
	c.in = nil
	c.detach()
	nc, err := fileConn(c.fd)
	if err != nil {
		c.l.e.cfg.Logger.Warn("handing a connection off failed", "error", err)
		return
	}
	if expired {
		nc = expiredConn{nc}
	}
	c.l.e.cfg.Handoff(nc, buffered)
}

// expiredConn is a connection whose reads time out: what the server reads
// past the bytes handed off with it.
type expiredConn struct{ net.Conn }

func (expiredConn) Read([]byte) (int, error) { return 0, os.ErrDeadlineExceeded }

// detach removes the connection from the loop without closing its socket.
func (c *clientConn) detach() {
	if c.state == clClosed {
		return
	}
	c.state = clClosed
	c.rt.Stop()
	c.wt.Stop()
	_ = unix.EpollCtl(c.l.ep, unix.EPOLL_CTL_DEL, c.fd, nil)
	c.l.byFD[c.fd] = owned{}
	delete(c.l.clients, c)
	c.l.e.conns.Add(-1)
}

// abort closes the connection now; an exchange in progress ends with it.
func (c *clientConn) abort() {
	if c.state == clClosed {
		return
	}
	x := c.x
	c.x = nil
	c.detach()
	_ = unix.Close(c.fd)
	if x != nil {
		x.clientGone()
	}
}

// goneGrace is how long a request runs before a client that stopped
// sending is taken to be gone, as the listener's fast path watches for it:
// a client that sends its requests and shuts its side of the connection
// down still gets the answers of quick ones.
const goneGrace = 5 * time.Millisecond

// halfClosed is the client ending its side while a request of it runs:
// the answers due are written, nothing more is read, and the request is
// cancelled (as net/http cancels it) if it runs past goneGrace.
func (c *clientConn) halfClosed() {
	c.peerDone = true
	c.setEvents(c.events &^ (unix.EPOLLIN | unix.EPOLLRDHUP))
	x := c.x
	if x == nil || len(c.in) > 0 {
		// Requests it sent before are still to be answered: the close
		// only ends what it sends, as net/http, which does not watch the
		// connection while pipelined requests wait, serves them.
		return
	}
	c.l.after(max(0, x.since.Add(goneGrace).Sub(c.l.now)), nil, func() {
		if c.x == x && c.state != clClosed {
			c.abort()
		}
	})
}

// readTimedOut ends a connection whose head or body did not come in time,
// or that was idle too long: closed without a word, as net/http closes it;
// but a body that stopped coming is the listener's server's to answer
// (408, as it answers it), handed off with what came of it.
func (c *clientConn) readTimedOut() {
	if c.state == clBody {
		c.handoff(true)
		return
	}
	c.abort()
}

// closeIfIdle closes a connection between requests (shutdown); one being
// served closes after its answer.
func (c *clientConn) closeIfIdle() {
	switch c.state {
	case clIdle:
		c.abort()
	case clHead:
		if len(c.in) == 0 {
			c.abort()
		}
	case clServing:
		c.closing = true
	}
}

// write queues b for the client and writes what the socket takes.
func (c *clientConn) write(b []byte) {
	if c.state == clClosed {
		return
	}
	if !c.queuing() {
		n, err := unix.Write(c.fd, b)
		if err != nil && !errors.Is(err, unix.EAGAIN) && !errors.Is(err, unix.EINTR) {
			c.abort()
			return
		}
		b = b[max(n, 0):]
		if len(b) == 0 {
			return
		}
		// The write timeout bounds each wait for the client to take more.
		c.l.reset(&c.wt, c.l.e.cfg.Limits.WriteTimeout)
		c.setEvents(c.events | unix.EPOLLOUT)
	}
	c.out = append(c.out, b...)
}

func (c *clientConn) cork() { c.corked = true }

// queuing reports whether a write now is queued rather than made: corked,
// or earlier bytes still wait.
func (c *clientConn) queuing() bool { return c.corked || len(c.out) > 0 }

// uncork writes what was queued while corked.
func (c *clientConn) uncork() {
	c.corked = false
	if len(c.out) > 0 && c.state != clClosed {
		c.flush()
		if len(c.out) > 0 {
			c.l.reset(&c.wt, c.l.e.cfg.Limits.WriteTimeout)
			c.setEvents(c.events | unix.EPOLLOUT)
		}
	}
}

// flush writes what is queued; once all is written the exchange may go on.
func (c *clientConn) flush() {
	if len(c.out) > 0 {
		n, err := unix.Write(c.fd, c.out)
		if err != nil && !errors.Is(err, unix.EAGAIN) && !errors.Is(err, unix.EINTR) {
			c.abort()
			return
		}
		if n > 0 {
			c.out = c.out[:copy(c.out, c.out[n:])]
			c.l.reset(&c.wt, c.l.e.cfg.Limits.WriteTimeout) // progress: the wait starts again
		}
		if len(c.out) > 0 {
			return
		}
	}
	c.wt.Stop()
	c.setEvents(c.events &^ unix.EPOLLOUT)
	switch {
	case c.state == clDraining:
		c.abort()
	case c.x != nil:
		c.x.drained()
	}
}

// pending reports how many answer bytes wait for the client (or for
// uncork).
func (c *clientConn) pending() int { return len(c.out) }

// finish ends the exchange whose answer is all queued: the connection
// closes once it is written, or reads the next request.
func (c *clientConn) finish() {
	c.x = nil
	c.l.e.active.Add(-1)
	if c.closing || c.l.e.inShutdown.Load() {
		c.state = clDraining
		if len(c.out) == 0 {
			c.abort()
		}
		return
	}
	c.state = clIdle
	if c.peerDone {
		// What the client sent before it shut its side down is served;
		// nothing more will come.
		if c.state = clHead; headEnd(c.in) == 0 {
			c.state = clDraining
			if len(c.out) == 0 {
				c.abort()
			}
			return
		}
		c.next()
		return
	}
	c.setEvents(c.events | unix.EPOLLIN | unix.EPOLLRDHUP)
	c.l.reset(&c.rt, c.l.e.cfg.Limits.IdleTimeout)
	if len(c.in) > 0 {
		c.state = clHead
		c.l.reset(&c.rt, c.l.e.cfg.Limits.ReadHeaderTimeout)
		c.next()
	}
}

// requestStart reports whether b can begin a request the engine reads: a
// method's first letter.
func requestStart(b byte) bool { return b >= 'A' && b <= 'Z' }

// headEnd returns the length of the header block at the start of b,
// through its empty line ("\r\n" or "\n", as the servers read it), or 0
// while it is incomplete.
func headEnd(b []byte) int {
	for i := 0; i < len(b); {
		j := bytes.IndexByte(b[i:], '\n')
		if j < 0 {
			return 0
		}
		line := b[i : i+j]
		i += j + 1
		if len(line) == 0 || len(line) == 1 && line[0] == '\r' {
			return i
		}
	}
	return 0
}
