package proxyhttp

import (
	"github.com/sidecar-mesh/sidecar/pkg/panics"

	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http/httpguts"
)

// Why this file exists: the proxy listeners serve plain HTTP/1.1 requests
// (a GET or a POST with a Content-Length, the bulk of an app's calls)
// themselves, and hand every other connection to net/http. Go's server
// costs a proxy a goroutine and a read syscall per request (its background
// read that watches for a client gone), three read-deadline changes per
// request and some twenty allocations; on a 2-core pod that is a third of
// the sidecar's CPU per request (see docs/benchmarks.md).
//
// The fast path takes only what it can serve exactly as net/http does: a
// header block the framing check passed, with a request line "METHOD
// TARGET HTTP/1.1" for a common method and an origin-form or http
// absolute-form target net/url accepts, CRLF line ends, header values
// net/http accepts, one valid Host, a Content-Length or no body, and no
// Expect, Upgrade, Transfer-Encoding or "Connection: upgrade". The first
// request that is anything else (HTTP/2's preface, HTTP/1.0, chunked
// bodies, CONNECT, protocol upgrades, "OPTIONS *", malformed or oversized
// requests) hands the connection, with every byte not yet consumed, to
// net/http's server for the rest of its life: net/http then answers it as
// it always did (h2c, 400, 431, 501, upgrades, hijacking). The response side
// is net/http's response writer ported: the same header block byte for
// byte (sorted handler headers, then Date, Content-Length, Content-Type
// sniffing, Connection, Transfer-Encoding), the same 2 KiB buffer before
// chunking, trailers, flushes, 1xx, the same handling of unread request
// bodies and keep-alive. A client that goes away while its request is in
// flight still cancels the request's context, but the read that watches
// for it starts only once the request has taken clientWatchDelay, so that
// the common short request costs no extra goroutine or syscall.

// clientWatchDelay is how long a request runs before a read watches its
// connection for the client going away (which cancels the request).
const clientWatchDelay = 5 * time.Millisecond

// net/http's constants, for the same behaviour.
const (
	bufferBeforeChunkingSize = 2048
	maxPostHandlerReadBytes  = 256 << 10
	rstAvoidanceDelay        = 500 * time.Millisecond
	shutdownPollIntervalMax  = 500 * time.Millisecond
)

// h1Server serves the fast path of one listener. Safe for concurrent use.
type h1Server struct {
	handler  http.Handler
	limits   Limits
	errorLog *log.Logger
	handoff  *handoffListener

	inShutdown   atomic.Bool
	keepAliveOff atomic.Bool

	mu    sync.Mutex // guards conns
	conns map[*h1Conn]struct{}
}

func newH1Server(h http.Handler, limits Limits, errorLog *log.Logger, addr net.Addr) *h1Server {
	return &h1Server{handler: h, limits: limits, errorLog: errorLog, conns: map[*h1Conn]struct{}{},
		handoff: &handoffListener{addr: addr, conns: make(chan net.Conn), done: make(chan struct{})}}
}

func (s *h1Server) logf(format string, args ...any) {
	if s.errorLog != nil {
		s.errorLog.Printf(format, args...)
	}
}

func (s *h1Server) doKeepAlives() bool { return !s.keepAliveOff.Load() && !s.inShutdown.Load() }

// serve accepts connections until ln is closed; nil once shutting down.
func (s *h1Server) serve(ln net.Listener) error {
	var delay time.Duration // how long to sleep on accept failure, as net/http
	for {
		c, err := ln.Accept()
		if err != nil {
			if s.inShutdown.Load() {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || isTemporary(err) {
				if delay == 0 {
					delay = 5 * time.Millisecond
				} else {
					delay = min(2*delay, time.Second)
				}
				s.logf("http: Accept error: %v; retrying in %v", err, delay)
				time.Sleep(delay) // as net/http: the listener is out of file descriptors or similar
				continue
			}
			return err
		}
		delay = 0
		hc := s.newConn(c)
		if hc == nil {
			continue
		}
		go hc.serve()
	}
}

func isTemporary(err error) bool {
	var t interface{ Temporary() bool }
	return errors.As(err, &t) && t.Temporary()
}

// connState is where a connection is in its life, for Shutdown.
type connState int32

const (
	stateNew    connState = iota // accepted, no request read yet
	stateActive                  // reading or serving a request
	stateIdle                    // waiting for the next request
)

func (s *h1Server) newConn(c net.Conn) *h1Conn {
	hc := &h1Conn{srv: s, conn: c, since: time.Now()}
	hc.fc, _ = c.(*framingConn)
	if ra := c.RemoteAddr(); ra != nil {
		hc.remoteAddr = ra.String()
	}
	hc.ctx = context.WithValue(ConnContext(context.Background(), c), http.LocalAddrContextKey, c.LocalAddr())
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.inShutdown.Load() {
		_ = c.Close()
		return nil
	}
	s.conns[hc] = struct{}{}
	return hc
}

func (s *h1Server) forget(c *h1Conn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
}

// closeIdle closes idle connections, and new ones that sent nothing for 5
// seconds (as net/http), and reports whether none is left.
func (s *h1Server) closeIdle() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	quiescent := true
	for c := range s.conns {
		st := connState(c.state.Load())
		if st == stateNew && time.Since(c.since) > 5*time.Second {
			st = stateIdle
		}
		if st != stateIdle {
			quiescent = false
			continue
		}
		_ = c.conn.Close()
		delete(s.conns, c)
	}
	return quiescent
}

// closeIdleOnly closes the idle connections once (keep-alives turned off).
func (s *h1Server) closeIdleOnly() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.conns {
		if connState(c.state.Load()) == stateIdle {
			_ = c.conn.Close()
			delete(s.conns, c)
		}
	}
}

// shutdown stops keep-alives and waits, closing idle connections, until
// none is left or ctx ends. The listener must be closed by the caller.
func (s *h1Server) shutdown(ctx context.Context) error {
	s.inShutdown.Store(true)
	base := time.Millisecond
	next := func() time.Duration {
		d := base + rand.N(base/10+1)
		base = min(2*base, shutdownPollIntervalMax)
		return d
	}
	t := time.NewTimer(next())
	defer t.Stop()
	for {
		if s.closeIdle() {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
			t.Reset(next())
		}
	}
}

// closeAll closes every connection at once.
func (s *h1Server) closeAll() {
	s.inShutdown.Store(true)
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.conns {
		_ = c.conn.Close()
		delete(s.conns, c)
	}
}

// handoffListener hands connections the fast path does not serve to
// net/http's server. Safe for concurrent use.
type handoffListener struct {
	addr  net.Addr
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
	// onClose runs when net/http closes the listener: its Close or
	// Shutdown called directly end the fast path too.
	onClose func()
}

func (l *handoffListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		select {
		case <-l.done: // closed meanwhile: net/http would not track it
			_ = c.Close()
			return nil, net.ErrClosed
		default:
			return c, nil
		}
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *handoffListener) Close() error {
	l.once.Do(func() {
		close(l.done)
		if l.onClose != nil {
			l.onClose()
		}
	})
	return nil
}

func (l *handoffListener) Addr() net.Addr { return l.addr }

func (l *handoffListener) give(c net.Conn) {
	select {
	case l.conns <- c:
	case <-l.done:
		_ = c.Close()
	}
}

// ---- one connection ------------------------------------------------------------

// h1Conn is one client connection on the fast path. Its fields are owned by
// its serve goroutine, except those under bgMu.
type h1Conn struct {
	srv        *h1Server
	conn       net.Conn
	fc         *framingConn // nil when the listener does not check framing
	ctx        context.Context
	remoteAddr string
	since      time.Time
	state      atomic.Int32

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
	_ = c.conn.SetReadDeadline(t)
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
	n, err := readSome(c.conn, c.rbuf[c.w:])
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

// headerBlockEnd returns the length of the header block at the start of b,
// through its empty line, or 0 while it is incomplete.
func headerBlockEnd(b []byte) int {
	for i := 0; i < len(b); {
		j := indexByte(b[i:], '\n')
		if j < 0 {
			return 0
		}
		line := b[i : i+j]
		i += j + 1
		if len(line) == 0 || (len(line) == 1 && line[0] == '\r') {
			return i
		}
	}
	return 0
}

func indexByte(b []byte, c byte) int {
	for i, x := range b {
		if x == c {
			return i
		}
	}
	return -1
}

// requestStart reports whether b can begin a request: a method's first
// character, or a CR or LF before the request line.
func requestStart(b byte) bool {
	return b == '\r' || b == '\n' || httpguts.IsTokenRune(rune(b))
}

// h2PrefaceStart is what net/http's server reads before it tells an
// HTTP/2 preface from an HTTP/1 request.
const h2PrefaceStart = "PRI * HTTP/2.0"

// malformedAnswer is net/http's answer to a request it cannot parse.
const malformedAnswer = "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n400 Bad Request"

// refuseMalformed answers as net/http does a request it cannot parse, and
// ends the connection.
func (c *h1Conn) refuseMalformed() {
	_, _ = c.bw.WriteString(malformedAnswer)
	_ = c.bw.Flush()
	c.close()
}

// handOver gives the connection, with every byte not consumed, to net/http.
func (c *h1Conn) handOver() {
	if c.watch != nil {
		c.watch.Stop()
	}
	_ = c.bw.Flush()
	pending := c.rbuf[c.r:c.w]
	var conn net.Conn
	if c.fc != nil {
		c.fc.unread(pending)
		conn = c.fc
	} else {
		conn = &primedConn{Conn: c.conn, read: append([]byte(nil), pending...)}
	}
	c.r, c.w = 0, 0
	c.setReadDeadline(time.Time{})
	c.srv.forget(c)
	c.srv.handoff.give(conn)
}

// serveBlock serves the request whose header block is rbuf[r:end], or hands
// the connection over.
func (c *h1Conn) serveBlock(end int) bool {
	var req http.Request // on the stack: serveRequest gives the handler a copy with its context
	if !c.parse(c.rbuf[c.r:end], &req) {
		c.handOver()
		return false
	}
	c.r = end
	c.lastPOST = req.Method == http.MethodPost
	return c.serveRequest(&req)
}

var fastMethods = [...]string{http.MethodGet, http.MethodPost, http.MethodHead, http.MethodPut,
	http.MethodDelete, http.MethodOptions, http.MethodPatch}

// parse fills req with the request of a header block the fast path can
// serve exactly as net/http would, or returns false.
func (c *h1Conn) parse(block []byte, req *http.Request) bool {
	// Request line: METHOD SP TARGET SP HTTP/1.1 CRLF.
	eol := indexByte(block, '\n')
	if eol < 1 || block[eol-1] != '\r' {
		return false
	}
	line := block[:eol-1]
	const proto = " HTTP/1.1"
	if len(line) <= len(proto) || string(line[len(line)-len(proto):]) != proto {
		return false
	}
	line = line[:len(line)-len(proto)]
	sp := indexByte(line, ' ')
	if sp < 0 {
		return false
	}
	method := ""
	for _, m := range fastMethods {
		if string(line[:sp]) == m {
			method = m
			break
		}
	}
	target := line[sp+1:]
	if method == "" || len(target) == 0 || !(target[0] == '/' || len(target) > 7 && string(target[:7]) == "http://") {
		return false
	}
	for _, b := range target {
		if b <= ' ' || b >= 0x7f {
			return false
		}
	}
	// One string holds the target and every header value.
	all := string(block[sp+1 : len(block)])
	rawURL := all[:len(target)]
	u, err := url.ParseRequestURI(rawURL)
	if err != nil {
		return false
	}

	// Header lines.
	lines := block[eol+1:]
	n := 0
	for _, b := range lines {
		if b == '\n' {
			n++
		}
	}
	hdr := make(http.Header, n)
	vals := make([]string, 0, n)
	off := sp + 1 // offset of all in block
	pos := eol + 1
	for {
		e := indexByte(block[pos:], '\n')
		if e < 1 || block[pos+e-1] != '\r' {
			return false // bare LF: net/http's own reading decides
		}
		l := block[pos : pos+e-1]
		lineStart := pos
		pos += e + 1
		if len(l) == 0 {
			break
		}
		colon := indexByte(l, ':')
		if colon <= 0 {
			return false
		}
		name := l[:colon]
		vs, ve := colon+1, len(l)
		for vs < ve && (l[vs] == ' ' || l[vs] == '\t') {
			vs++
		}
		for ve > vs && (l[ve-1] == ' ' || l[ve-1] == '\t') {
			ve--
		}
		value := all[lineStart+vs-off : lineStart+ve-off]
		if !httpguts.ValidHeaderFieldValue(value) {
			return false
		}
		key, ok := canonicalKey(name, all[lineStart-off:lineStart+colon-off])
		if !ok {
			return false
		}
		switch key {
		case "Expect", "Upgrade", "Transfer-Encoding":
			return false
		case "Connection":
			if httpguts.HeaderValuesContainsToken([]string{value}, "upgrade") {
				return false
			}
		}
		if prior, ok := hdr[key]; ok {
			hdr[key] = append(prior, value)
			continue
		}
		vals = append(vals, value)
		hdr[key] = vals[len(vals)-1 : len(vals) : len(vals)]
	}

	hosts := hdr["Host"]
	if len(hosts) != 1 || !httpguts.ValidHostHeader(hosts[0]) {
		return false
	}
	var cl int64
	if v, ok := hdr["Content-Length"]; ok {
		if len(v) != 1 {
			return false // net/http merges identical duplicates: let it
		}
		n, ok := parseDecimal([]byte(v[0]))
		if !ok {
			return false
		}
		cl = n
	}
	host := u.Host
	if host == "" {
		host = hosts[0]
	}
	// As net/http's readRequest.
	if hp, ok := hdr["Pragma"]; ok && len(hp) > 0 && hp[0] == "no-cache" {
		if _, ok := hdr["Cache-Control"]; !ok {
			hdr["Cache-Control"] = []string{"no-cache"}
		}
	}
	closeReq := httpguts.HeaderValuesContainsToken(hdr["Connection"], "close")
	delete(hdr, "Host")

	*req = http.Request{
		Method:        method,
		URL:           u,
		Proto:         "HTTP/1.1",
		ProtoMajor:    1,
		ProtoMinor:    1,
		Header:        hdr,
		ContentLength: cl,
		Close:         closeReq,
		Host:          host,
		RemoteAddr:    c.remoteAddr,
		RequestURI:    rawURL,
		Body:          http.NoBody,
	}
	if cl > 0 {
		req.Body = &h1Body{c: c, remain: cl, closing: closeReq}
	}
	return true
}

// canonicalKey returns the canonical form of header name b (s is b as a
// string), as net/textproto does, without allocating when b already is
// canonical or a common header; false for a name that is no token.
func canonicalKey(b []byte, s string) (string, bool) {
	upper := true
	canonical := true
	for _, c := range b {
		if !httpguts.IsTokenRune(rune(c)) {
			return "", false
		}
		if upper && 'a' <= c && c <= 'z' || !upper && 'A' <= c && c <= 'Z' {
			canonical = false
		}
		upper = c == '-'
	}
	if canonical {
		return s, true
	}
	return http.CanonicalHeaderKey(s), true
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
		if b, ok := c.resp.req.Body.(*h1Body); ok && !b.eofSeen() {
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
	_ = c.conn.SetReadDeadline(time.Time{})
	go c.backgroundRead(c.bgDone)
}

func (c *h1Conn) backgroundRead(done chan struct{}) {
	defer close(done)
	var b [1]byte
	n, err := c.conn.Read(b[:])
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
		_ = c.conn.SetReadDeadline(aLongTimeAgo)
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
	return c.conn.Read(p)
}

// h1Body is a request body framed by Content-Length, as net/http's body.
type h1Body struct {
	c       *h1Conn
	mu      sync.Mutex // guards the fields below: Close may race a Read
	remain  int64
	sawEOF  bool
	closed  bool
	closing bool // the request asked to close the connection
	early   bool // closed with more than maxPostHandlerReadBytes unread
	onEOF   func()
	// eof mirrors sawEOF for the watch timer, which must not take mu:
	// onEOF runs under mu and takes the connection's bgMu.
	eof atomic.Bool
}

func (b *h1Body) Read(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return 0, http.ErrBodyReadAfterClose
	}
	return b.readLocked(p)
}

func (b *h1Body) readLocked(p []byte) (int, error) {
	if b.sawEOF {
		return 0, io.EOF
	}
	if b.remain <= 0 {
		b.hitEOF()
		return 0, io.EOF
	}
	if int64(len(p)) > b.remain {
		p = p[:b.remain]
	}
	n, err := b.c.readBody(p)
	b.remain -= int64(n)
	if err == io.EOF {
		b.sawEOF = true
		if b.remain > 0 {
			err = io.ErrUnexpectedEOF
		}
	}
	if err == nil && n > 0 && b.remain == 0 {
		err = io.EOF
		b.sawEOF = true
	}
	if b.sawEOF {
		b.eof.Store(true)
		if b.onEOF != nil {
			b.onEOF()
		}
	}
	return n, err
}

func (b *h1Body) hitEOF() {
	b.sawEOF = true
	b.eof.Store(true)
	if b.onEOF != nil {
		b.onEOF()
	}
}

func (b *h1Body) eofSeen() bool { return b.eof.Load() }

type lockedBody struct{ b *h1Body }

func (l lockedBody) Read(p []byte) (int, error) { return l.b.readLocked(p) }

func (b *h1Body) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return nil
	}
	var err error
	switch {
	case b.sawEOF:
	case b.closing:
		// The connection closes next: no point reading on.
	case b.remain > maxPostHandlerReadBytes:
		b.early = true
	default:
		var n int64
		n, err = io.CopyN(io.Discard, lockedBody{b}, maxPostHandlerReadBytes)
		if err == io.EOF {
			err = nil
		}
		if n == maxPostHandlerReadBytes {
			b.early = true
		}
	}
	b.closed = true
	return err
}

func (b *h1Body) didEarlyClose() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.early
}

// ---- the response ----------------------------------------------------------------

// h1Response is net/http's response writer for one request, ported: the
// same buffering, header block and connection decisions.
type h1Response struct {
	c                   *h1Conn
	req                 *http.Request
	reqBody             io.ReadCloser
	w                   *bufio.Writer // bufferBeforeChunkingSize, to cw
	cw                  h1ChunkWriter
	handlerHeader       http.Header
	snapshot            http.Header // handlerHeader at WriteHeader, when Header was called
	calledHeader        bool
	wroteHeader         bool
	hijacked            bool
	fullDuplex          bool
	handlerDone         bool
	wantsClose          bool
	closeAfter          bool
	status              int
	written             int64
	contentLength       int64
	trailers            []string
	requestBodyLimitHit bool
	writeDeadline       bool // the handler set one: cleared after the request, as net/http
	dateBuf             [len(http.TimeFormat)]byte
	clenBuf             [20]byte
}

var (
	_ http.ResponseWriter = (*h1Response)(nil)
	_ http.Flusher        = (*h1Response)(nil)
	_ http.Hijacker       = (*h1Response)(nil)
)

func (w *h1Response) reset(req *http.Request) {
	w.req, w.reqBody = req, req.Body
	if w.handlerHeader == nil {
		w.handlerHeader = make(http.Header)
	} else {
		clear(w.handlerHeader)
	}
	if w.snapshot != nil {
		clear(w.snapshot)
	}
	w.calledHeader, w.wroteHeader, w.hijacked, w.fullDuplex, w.handlerDone = false, false, false, false, false
	w.closeAfter, w.requestBodyLimitHit, w.writeDeadline = false, false, false
	w.wantsClose = req.Close
	w.status, w.written, w.contentLength = 0, 0, -1
	w.trailers = w.trailers[:0]
	w.cw.wroteHeader, w.cw.chunking, w.cw.header = false, false, nil
	w.w.Reset(&w.cw)
}

func (w *h1Response) Header() http.Header {
	if w.cw.header == nil && w.wroteHeader && !w.cw.wroteHeader {
		// Read between the logical and the physical write of the header:
		// the written state is kept apart, as net/http does.
		w.cw.header = w.snap()
	}
	w.calledHeader = true
	return w.handlerHeader
}

// snap copies the handler's header into the reused snapshot map, values
// included (as net/http's Clone: a handler changing a value after
// WriteHeader does not change what is sent), in one allocation.
func (w *h1Response) snap() http.Header {
	if w.snapshot == nil {
		w.snapshot = make(http.Header, len(w.handlerHeader))
	}
	n := 0
	for _, v := range w.handlerHeader {
		n += len(v)
	}
	vals := make([]string, n)
	for k, v := range w.handlerHeader {
		n := copy(vals, v)
		w.snapshot[k] = vals[:n:n]
		vals = vals[n:]
	}
	return w.snapshot
}

func (w *h1Response) SetReadDeadline(t time.Time) error {
	w.c.bgMu.Lock()
	defer w.c.bgMu.Unlock()
	w.c.deadline = t
	return w.c.conn.SetReadDeadline(t)
}

func (w *h1Response) SetWriteDeadline(t time.Time) error {
	w.writeDeadline = true
	return w.c.conn.SetWriteDeadline(t)
}

func (w *h1Response) EnableFullDuplex() error {
	w.fullDuplex = true
	return nil
}

func (w *h1Response) WriteHeader(code int) {
	if w.hijacked {
		w.c.srv.logf("http: response.WriteHeader on hijacked connection")
		return
	}
	if w.wroteHeader {
		w.c.srv.logf("http: superfluous response.WriteHeader call")
		return
	}
	if code < 100 || code > 999 {
		panic(fmt.Sprintf("invalid WriteHeader code %v", code))
	}
	if code >= 100 && code <= 199 && code != http.StatusSwitchingProtocols {
		writeStatusLine(w.c.bw, code)
		_ = w.handlerHeader.WriteSubset(w.c.bw, excludedHeadersNoBody)
		_, _ = w.c.bw.WriteString("\r\n")
		_ = w.c.bw.Flush()
		return
	}
	w.wroteHeader = true
	w.status = code
	if w.calledHeader && w.cw.header == nil {
		w.cw.header = w.snap()
	}
	if cl := w.handlerHeader.Get("Content-Length"); cl != "" {
		v, err := strconv.ParseInt(cl, 10, 64)
		if err == nil && v >= 0 {
			w.contentLength = v
		} else {
			w.c.srv.logf("http: invalid Content-Length of %q", cl)
			w.handlerHeader.Del("Content-Length")
		}
	}
}

var excludedHeadersNoBody = map[string]bool{"Content-Length": true, "Transfer-Encoding": true}

func (w *h1Response) Write(p []byte) (int, error) {
	if w.hijacked {
		return 0, http.ErrHijacked
	}
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	if len(p) == 0 {
		return 0, nil
	}
	if !bodyAllowedForStatus(w.status) {
		return 0, http.ErrBodyNotAllowed
	}
	w.written += int64(len(p))
	if w.contentLength != -1 && w.written > w.contentLength {
		return 0, http.ErrContentLength
	}
	return w.w.Write(p)
}

func (w *h1Response) WriteString(s string) (int, error) {
	if w.hijacked {
		return 0, http.ErrHijacked
	}
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	if len(s) == 0 {
		return 0, nil
	}
	if !bodyAllowedForStatus(w.status) {
		return 0, http.ErrBodyNotAllowed
	}
	w.written += int64(len(s))
	if w.contentLength != -1 && w.written > w.contentLength {
		return 0, http.ErrContentLength
	}
	return w.w.WriteString(s)
}

func (w *h1Response) Flush() { _ = w.FlushError() }

func (w *h1Response) FlushError() error {
	if w.hijacked {
		return http.ErrHijacked
	}
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	err := w.w.Flush()
	e2 := w.cw.flush()
	if err == nil {
		err = e2
	}
	return err
}

func (w *h1Response) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	if w.hijacked {
		return nil, nil, http.ErrHijacked
	}
	if w.wroteHeader {
		_ = w.cw.flush()
	}
	c := w.c
	c.stopWatch()
	w.hijacked = true
	c.setReadDeadline(time.Time{})
	_ = c.conn.SetWriteDeadline(time.Time{})
	c.srv.forget(c)
	pending := append([]byte(nil), c.rbuf[c.r:c.w]...)
	c.r, c.w = 0, 0
	br := bufio.NewReader(&primedConn{Conn: c.conn, read: pending})
	bw := bufio.NewWriter(c.conn)
	return c.conn, bufio.NewReadWriter(br, bw), nil
}

// finish ends the response once the handler returned.
func (w *h1Response) finish() {
	w.handlerDone = true
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	_ = w.w.Flush()
	w.cw.close()
	_ = w.c.bw.Flush()
	_ = w.reqBody.Close()
	if w.req.MultipartForm != nil {
		_ = w.req.MultipartForm.RemoveAll() // as net/http: no temporary files left behind
	}
	if w.writeDeadline {
		_ = w.c.conn.SetWriteDeadline(time.Time{})
	}
}

func (w *h1Response) shouldReuseConnection() bool {
	if w.closeAfter {
		return false
	}
	if w.req.Method != http.MethodHead && w.contentLength != -1 && bodyAllowedForStatus(w.status) && w.contentLength != w.written {
		return false // did not write what it announced: out of sync
	}
	if w.c.werr != nil {
		return false
	}
	return !w.closedRequestBodyEarly()
}

func (w *h1Response) closedRequestBodyEarly() bool {
	b, ok := w.req.Body.(*h1Body)
	return ok && b.didEarlyClose()
}

func (w *h1Response) declareTrailer(k string) {
	k = http.CanonicalHeaderKey(k)
	if !httpguts.ValidTrailerHeader(k) {
		return
	}
	w.trailers = append(w.trailers, k)
}

func (w *h1Response) finalTrailers() http.Header {
	var t http.Header
	for k, vv := range w.handlerHeader {
		if kk, found := strings.CutPrefix(k, http.TrailerPrefix); found {
			if t == nil {
				t = make(http.Header)
			}
			t[kk] = vv
		}
	}
	for _, k := range w.trailers {
		if t == nil {
			t = make(http.Header)
		}
		for _, v := range w.handlerHeader[k] {
			t.Add(k, v)
		}
	}
	return t
}

func bodyAllowedForStatus(status int) bool {
	switch {
	case status >= 100 && status <= 199, status == 204, status == 304:
		return false
	}
	return true
}

func writeStatusLine(bw *bufio.Writer, code int) {
	_, _ = bw.WriteString("HTTP/1.1 ")
	if text := http.StatusText(code); text != "" {
		var b [3]byte
		_, _ = bw.Write(strconv.AppendInt(b[:0], int64(code), 10))
		_ = bw.WriteByte(' ')
		_, _ = bw.WriteString(text)
		_, _ = bw.WriteString("\r\n")
	} else {
		_, _ = fmt.Fprintf(bw, "%03d status code %d\r\n", code, code)
	}
}

// h1ChunkWriter is net/http's chunkWriter: it writes the header block on
// the first write and frames the body in chunks when it must.
type h1ChunkWriter struct {
	res         *h1Response
	header      http.Header // the snapshot, or nil: the handler's header
	wroteHeader bool
	chunking    bool
}

func (cw *h1ChunkWriter) Write(p []byte) (n int, err error) {
	if !cw.wroteHeader {
		cw.writeHeader(p)
	}
	if cw.res.req.Method == http.MethodHead {
		return len(p), nil // eat writes
	}
	bw := cw.res.c.bw
	if cw.chunking {
		var h [18]byte
		if _, err = bw.Write(append(strconv.AppendInt(h[:0], int64(len(p)), 16), '\r', '\n')); err != nil {
			_ = cw.res.c.conn.Close()
			return 0, err
		}
	}
	n, err = bw.Write(p)
	if cw.chunking && err == nil {
		_, err = bw.WriteString("\r\n")
	}
	if err != nil {
		_ = cw.res.c.conn.Close()
	}
	return n, err
}

func (cw *h1ChunkWriter) flush() error {
	if !cw.wroteHeader {
		cw.writeHeader(nil)
	}
	return cw.res.c.bw.Flush()
}

func (cw *h1ChunkWriter) close() {
	if !cw.wroteHeader {
		cw.writeHeader(nil)
	}
	if cw.chunking {
		bw := cw.res.c.bw
		_, _ = bw.WriteString("0\r\n")
		if trailers := cw.res.finalTrailers(); trailers != nil {
			_ = trailers.Write(bw)
		}
		_, _ = bw.WriteString("\r\n")
	}
}

// dateCache formats the Date header once a second.
var dateCache atomic.Pointer[dateValue]

type dateValue struct {
	sec int64
	b   []byte
}

func appendDate(b []byte, now time.Time) []byte {
	sec := now.Unix()
	if d := dateCache.Load(); d != nil && d.sec == sec {
		return append(b, d.b...)
	}
	v := now.UTC().AppendFormat(nil, http.TimeFormat)
	dateCache.Store(&dateValue{sec: sec, b: v})
	return append(b, v...)
}

// writeHeader is net/http's chunkWriter.writeHeader for HTTP/1.1 requests.
func (cw *h1ChunkWriter) writeHeader(p []byte) {
	if cw.wroteHeader {
		return
	}
	cw.wroteHeader = true
	w := cw.res
	keepAlivesEnabled := w.c.srv.doKeepAlives()
	isHEAD := w.req.Method == http.MethodHead

	header := cw.header
	owned := header != nil
	if !owned {
		header = w.handlerHeader
	}
	var excludeHeader map[string]bool
	delHeader := func(key string) {
		if owned {
			header.Del(key)
			return
		}
		if _, ok := header[key]; !ok {
			return
		}
		if excludeHeader == nil {
			excludeHeader = make(map[string]bool)
		}
		excludeHeader[key] = true
	}
	var set struct {
		contentType, connection, transferEncoding string
		date, contentLength                       []byte
	}

	trailers := false
	for k := range cw.header {
		if strings.HasPrefix(k, http.TrailerPrefix) {
			if excludeHeader == nil {
				excludeHeader = make(map[string]bool)
			}
			excludeHeader[k] = true
			trailers = true
		}
	}
	for _, v := range cw.header["Trailer"] {
		trailers = true
		foreachHeaderElement(v, w.declareTrailer)
	}

	te := header.Get("Transfer-Encoding")
	hasTE := te != ""
	if w.handlerDone && !trailers && !hasTE && bodyAllowedForStatus(w.status) && !headerHas(header, "Content-Length") && (!isHEAD || len(p) > 0) {
		w.contentLength = int64(len(p))
		set.contentLength = strconv.AppendInt(w.clenBuf[:0], int64(len(p)), 10)
	}
	hasCL := w.contentLength != -1
	if w.wantsClose {
		w.closeAfter = true
	}
	if header.Get("Connection") == "close" || !keepAlivesEnabled {
		w.closeAfter = true
	}

	if w.req.ContentLength != 0 && !w.closeAfter && !w.fullDuplex {
		var discard, tooBig bool
		switch bdy := w.req.Body.(type) {
		case *h1Body:
			bdy.mu.Lock()
			switch {
			case bdy.closed:
				if !bdy.sawEOF {
					w.closeAfter = true // closed in the handler with a non-EOF error
				}
			case bdy.remain >= maxPostHandlerReadBytes:
				tooBig = true
			default:
				discard = true
			}
			bdy.mu.Unlock()
		default:
			discard = true
		}
		if discard {
			_, err := io.CopyN(io.Discard, w.reqBody, maxPostHandlerReadBytes+1)
			switch err {
			case nil:
				tooBig = true // there is more
			case http.ErrBodyReadAfterClose:
			case io.EOF:
				if err := w.reqBody.Close(); err != nil {
					w.closeAfter = true
				}
			default:
				// A read timeout, a client gone: whatever remains on the
				// wire must not be read as another request.
				w.closeAfter = true
			}
		}
		if tooBig {
			w.requestBodyLimitHit = true
			w.closeAfter = true
			delHeader("Connection")
			set.connection = "close"
		}
	}

	code := w.status
	if bodyAllowedForStatus(code) {
		_, haveType := header["Content-Type"]
		hasCE := header.Get("Content-Encoding") != ""
		if !hasCE && !haveType && !hasTE && len(p) > 0 {
			set.contentType = http.DetectContentType(p)
		}
	} else {
		for _, k := range suppressedHeaders(code) {
			delHeader(k)
		}
	}
	if !headerHas(header, "Date") {
		set.date = appendDate(w.dateBuf[:0], time.Now())
	}
	if hasCL && hasTE && te != "identity" {
		w.c.srv.logf("http: WriteHeader called with both Transfer-Encoding of %q and a Content-Length of %d", te, w.contentLength)
		delHeader("Content-Length")
		hasCL = false
	}
	switch {
	case isHEAD || !bodyAllowedForStatus(code) || code == http.StatusNoContent:
		delHeader("Transfer-Encoding")
	case hasCL:
		delHeader("Transfer-Encoding")
	case hasTE && te == "identity":
		cw.chunking = false
		w.closeAfter = true
		delHeader("Transfer-Encoding")
	default:
		cw.chunking = true
		set.transferEncoding = "chunked"
		if hasTE && te == "chunked" {
			delHeader("Transfer-Encoding")
		}
	}
	if cw.chunking {
		delHeader("Content-Length")
	}
	if w.closeAfter && (!keepAlivesEnabled || !hasToken(cw.header.Get("Connection"), "close")) && !isProtocolSwitchResponse(w.status, header) {
		delHeader("Connection")
		set.connection = "close"
	}

	bw := w.c.bw
	writeStatusLine(bw, code)
	_ = cw.header.WriteSubset(bw, excludeHeader)
	if set.date != nil {
		_, _ = bw.WriteString("Date: ")
		_, _ = bw.Write(set.date)
		_, _ = bw.WriteString("\r\n")
	}
	if set.contentLength != nil {
		_, _ = bw.WriteString("Content-Length: ")
		_, _ = bw.Write(set.contentLength)
		_, _ = bw.WriteString("\r\n")
	}
	for _, kv := range [...][2]string{{"Content-Type", set.contentType}, {"Connection", set.connection}, {"Transfer-Encoding", set.transferEncoding}} {
		if kv[1] != "" {
			_, _ = bw.WriteString(kv[0])
			_, _ = bw.WriteString(": ")
			_, _ = bw.WriteString(kv[1])
			_, _ = bw.WriteString("\r\n")
		}
	}
	_, _ = bw.WriteString("\r\n")
}

func headerHas(h http.Header, key string) bool {
	_, ok := h[key]
	return ok
}

func suppressedHeaders(status int) []string {
	switch {
	case status == 304:
		return []string{"Content-Type", "Content-Length", "Transfer-Encoding"}
	case !bodyAllowedForStatus(status):
		return []string{"Content-Length", "Transfer-Encoding"}
	}
	return nil
}

func isProtocolSwitchResponse(code int, h http.Header) bool {
	return code == http.StatusSwitchingProtocols && h.Get("Upgrade") != "" &&
		httpguts.HeaderValuesContainsToken(h["Connection"], "Upgrade")
}

// hasToken reports whether token appears in v, case-insensitively, as
// net/http's hasToken (a substring bounded by non-token characters).
func hasToken(v, token string) bool {
	if len(token) > len(v) || token == "" {
		return false
	}
	if v == token {
		return true
	}
	for sp := 0; sp <= len(v)-len(token); sp++ {
		if b := v[sp]; b != token[0] && b|0x20 != token[0] {
			continue
		}
		if sp > 0 && !isTokenBoundary(v[sp-1]) {
			continue
		}
		if endPos := sp + len(token); endPos != len(v) && !isTokenBoundary(v[endPos]) {
			continue
		}
		if strings.EqualFold(v[sp:sp+len(token)], token) {
			return true
		}
	}
	return false
}

func isTokenBoundary(b byte) bool { return b == ' ' || b == ',' || b == '\t' }

// foreachHeaderElement splits v by commas and calls fn for each non-empty
// trimmed element, as net/http.
func foreachHeaderElement(v string, fn func(string)) {
	v = strings.Trim(v, " \t")
	if v == "" {
		return
	}
	if !strings.Contains(v, ",") {
		fn(v)
		return
	}
	for f := range strings.SplitSeq(v, ",") {
		if f = strings.Trim(f, " \t"); f != "" {
			fn(f)
		}
	}
}
