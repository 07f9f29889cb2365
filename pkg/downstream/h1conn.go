package downstream

// One connection of the fast path: its lifecycle (read a header block,
// serve the request, keep alive or close), the watch for a client gone
// while its request runs, and the handover of the connection to net/http.

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sidecar-mesh/sidecar/internal/readahead"
	"github.com/sidecar-mesh/sidecar/pkg/panics"
)

// h1Conn is one client connection on the fast path. Its fields are owned by
// its serve goroutine, except those under bgMu.
type h1Conn struct {
	srv  *h1Server
	conn net.Conn
	fc   *framingConn // nil when the listener does not check framing
	// rd is what the fast path reads from: under the framing check, the
	// connection the check reads (parse applies its rules to the blocks
	// it serves, in its one pass over them, and a connection handed over
	// resumes the check with what is left); else conn.
	rd          net.Conn
	headerClock bool // a partial header block started the header timeout
	ctx         context.Context
	remoteAddr  string
	since       time.Time
	state       atomic.Int32

	rbuf     []byte // bytes read from conn: rbuf[r:w] not consumed yet
	r, w     int
	bw       *bufio.Writer // to the client, through errWriter
	werr     error         // a write to the client failed
	lastPOST bool          // the last request was a POST (CR/LF tolerance)
	deadline time.Time     // the read deadline set on conn
	served   int           // requests served

	resp h1Response // reused from request to request

	// The read that watches for the client going away (see clientWatchDelay).
	watch     *time.Timer
	bgMu      sync.Mutex // guards the fields below and read deadline changes
	bgState   bgState
	bgAborted bool
	bgDone    chan struct{}
	bgByte    []byte // a byte the watching read got: the next request's
	bgErr     error
	cancel    context.CancelFunc // the request's context
}

type bgState int

const (
	bgOff      bgState = iota // no request, or the watch is over
	bgArmed                   // the request runs; the timer may start the read
	bgWaitBody                // the timer fired while the body was being read
	bgRunning                 // the read runs
)

var h1BufPool = sync.Pool{New: func() any { b := make([]byte, 4096); return &b }}

type errWriter struct{ c *h1Conn }

func (e errWriter) Write(p []byte) (int, error) {
	n, err := e.c.conn.Write(p)
	if err != nil && e.c.werr == nil {
		e.c.werr = err
		e.c.bgMu.Lock()
		if e.c.cancel != nil {
			e.c.cancel() // the client is gone: so is its request
		}
		e.c.bgMu.Unlock()
	}
	return n, err
}

func (c *h1Conn) serve() {
	defer func() {
		if v := recover(); v != nil {
			// A bug in the fast path itself, outside any handler.
			panics.Report("http.conn", v)
			_ = c.conn.Close()
		}
	}()
	bp := h1BufPool.Get().(*[]byte)
	c.rbuf = *bp
	c.bw = bufio.NewWriterSize(errWriter{c}, 4<<10)
	c.resp.w = bufio.NewWriterSize(&c.resp.cw, bufferBeforeChunkingSize)
	c.resp.cw.res = &c.resp
	c.resp.c = c
	c.setReadDeadline(time.Now().Add(c.srv.limits.ReadHeaderTimeout))
	for {
		if !c.serveOne() {
			break
		}
	}
	if c.rbuf != nil && len(c.rbuf) == 4096 {
		*bp = c.rbuf
		h1BufPool.Put(bp)
	}
	c.rbuf = nil
}

// close ends the connection.
func (c *h1Conn) close() {
	if c.watch != nil {
		c.watch.Stop()
	}
	_ = c.bw.Flush()
	_ = c.conn.Close()
	c.srv.forget(c)
}

func (c *h1Conn) setReadDeadline(t time.Time) {
	c.deadline = t
	_ = c.rd.SetReadDeadline(t)
}

// fill reads more from the connection into rbuf; it fails for a header
// block larger than the listener allows.
func (c *h1Conn) fill() error {
	if c.r == c.w {
		c.r, c.w = 0, 0
	}
	if c.w == len(c.rbuf) {
		if c.r > 0 {
			copy(c.rbuf, c.rbuf[c.r:c.w])
			c.w -= c.r
			c.r = 0
		} else {
			nb := make([]byte, 2*len(c.rbuf))
			copy(nb, c.rbuf[:c.w])
			c.rbuf = nb
		}
	}
	n, err := readSome(c.rd, c.rbuf[c.w:])
	c.w += n
	return err
}

// serveOne reads and serves one request; false ends the connection's
// goroutine (closed, hijacked or handed over).
func (c *h1Conn) serveOne() bool {
	// Wait for a whole header block. The framing check releases a block
	// only once it is whole, so it mostly arrives in one read.
	maxBlock := c.srv.limits.MaxHeaderBytes + 4096
	for {
		if c.lastPOST && c.r < c.w {
			if c.w-c.r < 4 {
				// net/http drops up to four CR/LF bytes after a POST once
				// four bytes are in; they must not reach net/http on a
				// connection handed over later.
				if !c.more() {
					return false
				}
				continue
			}
			for k := 0; k < 4 && (c.rbuf[c.r] == '\r' || c.rbuf[c.r] == '\n'); k++ {
				c.r++
			}
			c.lastPOST = false
		}
		if c.r < c.w && !requestStart(c.rbuf[c.r]) {
			// Not HTTP at all (a TLS ClientHello in a CONNECT tunnel, a
			// stray binary protocol): no use waiting for a header block.
			c.state.Store(int32(stateActive))
			c.refuseMalformed()
			return false
		}
		if end := headerBlockEnd(c.rbuf[c.r:c.w]); end > 0 {
			c.state.Store(int32(stateActive))
			if end < len(h2PrefaceStart) {
				// No request is this short ("M / HTTP/1.1" and two LFs is
				// the least); net/http would first wait for the 14 bytes
				// that tell an HTTP/2 preface apart, until the header
				// timeout. Its answer, at once.
				c.refuseMalformed()
				return false
			}
			if end > c.srv.limits.MaxHeaderBytes {
				c.handOver() // net/http judges its size (431 or not)
				return false
			}
			return c.serveBlock(c.r + end)
		}
		if c.w-c.r > maxBlock {
			c.handOver() // net/http answers 431
			return false
		}
		if c.r < c.w && !c.headerClock && c.srv.limits.ReadHeaderTimeout > 0 {
			// Part of a header block is in: the rest must come within
			// the header timeout, on every request of the connection.
			c.headerClock = true
			if t := time.Now().Add(c.srv.limits.ReadHeaderTimeout); c.deadline.IsZero() || t.Before(c.deadline) {
				c.setReadDeadline(t)
			}
		}
		if !c.more() {
			return false
		}
	}
}

// more reads more of the next request; false when the connection ended
// (closed, or handed over with bytes net/http must judge).
func (c *h1Conn) more() bool {
	if err := c.fill(); err != nil {
		// A client gone, a timeout: net/http closes without a word.
		if c.r < c.w && !isCommonReadError(err) {
			c.handOver()
			return false
		}
		c.close()
		return false
	}
	// The connection stays idle (Shutdown closes it) until a whole
	// header block is in, as with net/http.
	return true
}

func isCommonReadError(err error) bool {
	var ne net.Error
	if errors.Is(err, io.EOF) || errors.As(err, &ne) && ne.Timeout() {
		return true
	}
	var oe *net.OpError
	return errors.As(err, &oe) && oe.Op == "read"
}

// h2PrefaceStart is what net/http's server reads before it tells an
// HTTP/2 preface from an HTTP/1 request.
const h2PrefaceStart = "PRI * HTTP/2.0"

// malformedAnswer is net/http's answer to a request it cannot parse.
const malformedAnswer = "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n400 Bad Request"

// refuseMalformed answers as net/http does a request it cannot parse, and
// ends the connection.
func (c *h1Conn) refuseMalformed() {
	// The 400 goes out or the connection goes: a client that does not
	// read it does not keep the connection.
	_ = c.conn.SetWriteDeadline(time.Now().Add(malformedWriteTimeout))
	_, _ = c.bw.WriteString(malformedAnswer)
	_ = c.bw.Flush()
	c.close()
}

// malformedWriteTimeout bounds the writing of the 400 to a malformed
// request.
const malformedWriteTimeout = 10 * time.Second

// handOver gives the connection, with every byte not consumed, to net/http.
func (c *h1Conn) handOver() {
	if c.watch != nil {
		c.watch.Stop()
	}
	_ = c.bw.Flush()
	pending := c.rbuf[c.r:c.w]
	var conn net.Conn
	if c.fc != nil {
		// The check starts on these bytes: the fast path checked only
		// the blocks it served. Only a connection's first bytes can be
		// HTTP/2's preface.
		c.fc.resume(pending, c.served > 0, c.lastPOST)
		conn = c.fc
	} else {
		conn = &readahead.Conn{Conn: c.conn, Head: append([]byte(nil), pending...)}
	}
	c.r, c.w = 0, 0
	c.setReadDeadline(time.Time{})
	c.srv.forget(c)
	c.srv.handoff.give(conn)
}

// serveBlock serves the request whose header block is rbuf[r:end], or hands
// the connection over.
func (c *h1Conn) serveBlock(end int) bool {
	c.headerClock = false
	var req http.Request // on the stack: serveRequest gives the handler a copy with its context
	if !c.parse(c.rbuf[c.r:end], &req) {
		c.handOver()
		return false
	}
	c.r = end
	c.lastPOST = req.Method == http.MethodPost
	return c.serveRequest(&req)
}

// serveRequest runs the handler and finishes the response; false ends the
// connection's goroutine.
func (c *h1Conn) serveRequest(parsed *http.Request) bool {
	ctx, cancel := context.WithCancel(c.ctx)
	req := parsed.WithContext(ctx)
	if req.ContentLength > 0 {
		// As net/http: no read deadline while the handler runs (reads of
		// the body set their own).
		c.setReadDeadline(time.Time{})
	}
	w := &c.resp
	w.reset(req)
	c.bgMu.Lock()
	c.cancel = cancel
	c.bgState = bgArmed
	c.bgErr = nil
	c.bgByte = nil
	c.bgMu.Unlock()
	if b, ok := req.Body.(*h1Body); ok {
		b.onEOF = c.bodyDone
	}
	if c.watch == nil {
		c.watch = time.AfterFunc(clientWatchDelay, c.startWatch)
	} else {
		c.watch.Reset(clientWatchDelay)
	}

	panicked := false
	func() {
		defer func() {
			if p := recover(); p != nil {
				panicked = true
				if p != http.ErrAbortHandler {
					buf := make([]byte, 64<<10)
					buf = buf[:runtime.Stack(buf, false)]
					c.srv.logf("http: panic serving %v: %v\n%s", c.remoteAddr, p, buf)
				}
			}
		}()
		c.srv.handler.ServeHTTP(w, req)
	}()
	cancel()
	c.stopWatch()
	c.served++
	if w.hijacked {
		return false
	}
	if panicked {
		// As net/http: the connection ends with whatever was sent.
		c.close()
		return false
	}
	w.finish()
	if !w.shouldReuseConnection() {
		if w.requestBodyLimitHit || w.closedRequestBodyEarly() {
			c.closeWriteAndWait()
		}
		c.close()
		return false
	}
	if !c.srv.doKeepAlives() {
		c.close()
		return false
	}
	c.state.Store(int32(stateIdle))
	if c.srv.inShutdown.Load() {
		c.close()
		return false
	}
	// Wait for the next request with the idle timeout. Under load the
	// deadline already in force is close enough: it is moved at most once
	// a second.
	if want := time.Now().Add(c.srv.limits.IdleTimeout); want.Sub(c.deadline) > time.Second || c.deadline.IsZero() {
		c.setReadDeadline(want)
	}
	return true
}

func (c *h1Conn) closeWriteAndWait() {
	_ = c.bw.Flush()
	if cw, ok := c.conn.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	}
	time.Sleep(rstAvoidanceDelay) // as net/http: let the client read the answer before the close resets it
}

// startWatch runs on the watch timer: the request has run for
// clientWatchDelay, so a read now watches for the client going away.
func (c *h1Conn) startWatch() {
	c.bgMu.Lock()
	defer c.bgMu.Unlock()
	switch c.bgState {
	case bgArmed:
		// The body as read from the connection, not req.Body: a handler
		// may have put a reader of its own there (the inbound proxy's,
		// with its progress timeout), and the body is still being read.
		if b, ok := c.resp.reqBody.(*h1Body); ok && !b.eofSeen() {
			c.bgState = bgWaitBody // the body's end starts it
			return
		}
		c.startReadLocked()
	}
}

// bodyDone is called when the request body reached its end.
func (c *h1Conn) bodyDone() {
	c.bgMu.Lock()
	defer c.bgMu.Unlock()
	if c.bgState == bgWaitBody {
		c.startReadLocked()
	}
}

func (c *h1Conn) startReadLocked() {
	if c.r < c.w {
		// The next request is here already: nothing to watch for (as
		// net/http, a pipelining client's disconnect goes unnoticed).
		c.bgState = bgOff
		return
	}
	c.bgState = bgRunning
	c.bgAborted = false
	c.bgDone = make(chan struct{})
	c.deadline = time.Time{}
	_ = c.rd.SetReadDeadline(time.Time{})
	go c.backgroundRead(c.bgDone)
}

func (c *h1Conn) backgroundRead(done chan struct{}) {
	defer close(done)
	var b [1]byte
	n, err := c.rd.Read(b[:])
	c.bgMu.Lock()
	defer c.bgMu.Unlock()
	if n == 1 {
		c.bgByte = []byte{b[0]}
	}
	var ne net.Error
	if err != nil && !(c.bgAborted && errors.As(err, &ne) && ne.Timeout()) {
		c.bgErr = err
		if c.cancel != nil {
			c.cancel() // the client is gone: so is its request
		}
	}
}

// stopWatch ends the watch of the request that just ended, waiting for a
// read that runs.
func (c *h1Conn) stopWatch() {
	c.watch.Stop()
	c.bgMu.Lock()
	st := c.bgState
	c.bgState = bgOff
	c.cancel = nil
	if st == bgRunning {
		c.bgAborted = true
		c.deadline = aLongTimeAgo
		_ = c.rd.SetReadDeadline(aLongTimeAgo)
	}
	done := c.bgDone
	c.bgMu.Unlock()
	if st != bgRunning {
		return
	}
	<-done
	c.bgMu.Lock()
	if c.bgByte != nil {
		if c.w == len(c.rbuf) {
			c.rbuf = append(c.rbuf, 0)[:len(c.rbuf)]
		}
		c.rbuf = c.rbuf[:cap(c.rbuf)]
		c.rbuf[c.w] = c.bgByte[0]
		c.w++
		c.bgByte = nil
	}
	if c.bgErr != nil && c.werr == nil {
		c.werr = c.bgErr // the connection is dead: never reused
	}
	c.bgMu.Unlock()
}

// readBody reads request body bytes: what rbuf holds first.
func (c *h1Conn) readBody(p []byte) (int, error) {
	if c.r < c.w {
		n := copy(p, c.rbuf[c.r:c.w])
		c.r += n
		return n, nil
	}
	return c.rd.Read(p)
}
