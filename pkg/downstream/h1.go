package downstream

import (
	"context"
	"errors"
	"log"
	"math/rand/v2"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
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
//
// The port follows net/http as of Go 1.26.8: server.go (conn.serve,
// readRequest, response, chunkWriter, the keep-alive rules) and
// transfer.go. A Go release that changes them, a security fix above all,
// is ported here: compare with
// "git log go1.26.8.. -- src/net/http/server.go src/net/http/transfer.go"
// in Go's repository. The files: h1.go (the server and its handover
// listener), h1conn.go (one connection), h1parse.go (the header block),
// h1body.go (the request body), h1response.go (the response writer).

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
	hc.rd = c
	if hc.fc != nil {
		hc.rd = hc.fc.Conn
	}
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
