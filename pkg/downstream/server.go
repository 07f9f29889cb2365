// Package downstream is the serving side of the sidecar's two proxies:
// the listeners that take requests from apps and peers. Listen binds a
// hardened server: the framing check (framing.go) that keeps smuggled and
// malformed requests out, the HTTP/1.1 fast path (h1*.go) with net/http's
// server behind it for everything else (h2c included), the verdicts a
// handler takes for each request (TakeVerdict), request bodies read with a
// progress timeout whose failures are the client's (BodyReader,
// ClientError), and the original destination of a redirected connection.
package downstream

import (
	"crypto/tls"
	"github.com/sidecar-mesh/sidecar/internal/readahead"
	"github.com/sidecar-mesh/sidecar/pkg/panics"

	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"sync/atomic"
	"syscall"
	"time"
)

// Limits bound what one client may cost a listener. The zero value of a field
// means its default.
type Limits struct {
	// ReadHeaderTimeout bounds the wait for a request's header block
	// (slowloris). Default 10s.
	ReadHeaderTimeout time.Duration
	// BodyReadTimeout bounds each wait for more request body bytes, so a
	// client that stops sending mid-body is cut off while long uploads that
	// keep moving are fine. Default 30s.
	BodyReadTimeout time.Duration
	// IdleTimeout closes keep-alive connections idle this long. Default 90s.
	IdleTimeout time.Duration
	// WriteTimeout bounds each wait to write an answer to the client (a
	// client that stops reading), as Envoy's stream_idle_timeout bounds a
	// stream nobody reads: the proxies' Forwarder applies it. Default 5m.
	WriteTimeout time.Duration
	// MaxHeaderBytes bounds a request's header block; larger gets 431. For
	// HTTP/2 it is the header list limit announced to the client.
	// Default 64 KiB.
	MaxHeaderBytes int
	// MaxConcurrentStreams bounds the streams an HTTP/2 client may have open
	// on one connection. Default 250.
	MaxConcurrentStreams int
}

// WithDefaults returns l with zero fields set to their defaults.
func (l Limits) WithDefaults() Limits {
	if l.ReadHeaderTimeout <= 0 {
		l.ReadHeaderTimeout = 10 * time.Second
	}
	if l.BodyReadTimeout <= 0 {
		l.BodyReadTimeout = 30 * time.Second
	}
	if l.IdleTimeout <= 0 {
		l.IdleTimeout = 90 * time.Second
	}
	if l.WriteTimeout <= 0 {
		l.WriteTimeout = 5 * time.Minute
	}
	if l.MaxHeaderBytes <= 0 {
		l.MaxHeaderBytes = 64 << 10
	}
	if l.MaxConcurrentStreams <= 0 {
		l.MaxConcurrentStreams = 250
	}
	return l
}

// Server serves a proxy listener: plain HTTP/1.1 requests on its own fast
// path (h1.go), every other connection (h2c, HTTP/1.0, upgrades, CONNECT,
// malformed requests) with net/http's server, both behind the framing
// check. Serve, Shutdown, Close and SetKeepAlivesEnabled cover both;
// HTTP's handler, limits and logger are the fast path's too, and must not
// change once Serve has been called.
type Server struct {
	HTTP     *http.Server
	Listener net.Listener
	Limits   Limits

	h1 *h1Server
}

// Listen binds addr and prepares a hardened server for h. A port already in
// use is reported as such, with the address.
func Listen(name, addr string, h http.Handler, limits Limits, log *slog.Logger) (*Server, error) {
	return listen(name, addr, h, limits, log, nil)
}

// ListenTLS is Listen for a listener whose connections are TLS (the mesh's
// mutual TLS): each is handshaken with cfg, on its first read and within
// the read header timeout, and its plaintext is served as a plaintext
// connection's is: behind the framing check, on the fast path, and as
// HTTP/2 when the client speaks it (ALPN "h2", after which a client sends
// HTTP/2 at once, as with prior knowledge). PeerTLS gives a handler the
// connection's TLS state.
func ListenTLS(name, addr string, h http.Handler, limits Limits, log *slog.Logger, cfg *tls.Config) (*Server, error) {
	if cfg == nil || (cfg.GetCertificate == nil && len(cfg.Certificates) == 0 && cfg.GetConfigForClient == nil) {
		return nil, fmt.Errorf("%s listener: TLS without a certificate", name)
	}
	return listen(name, addr, h, limits, log, func(ln net.Listener) net.Listener { return tls.NewListener(ln, cfg) })
}

func listen(name, addr string, h http.Handler, limits Limits, log *slog.Logger, wrap func(net.Listener) net.Listener) (*Server, error) {
	limits = limits.WithDefaults()
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		if errors.Is(err, syscall.EADDRINUSE) {
			return nil, fmt.Errorf("%s listener: address %s is already in use (another sidecar or process holds it; set a different address)", name, addr)
		}
		return nil, fmt.Errorf("%s listener on %s: %w", name, addr, err)
	}
	if wrap != nil {
		ln = wrap(ln)
	}
	h = panics.Handler(name+".request", h)
	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: limits.ReadHeaderTimeout,
		IdleTimeout:       limits.IdleTimeout,
		MaxHeaderBytes:    limits.MaxHeaderBytes,
		ConnContext:       ConnContext,
		// "OPTIONS *" goes to the handler too, so that every request on a
		// connection takes its framing verdict.
		DisableGeneralOptionsHandler: true,
		ErrorLog:                     slog.NewLogLogger(log.With("listener", name).Handler(), slog.LevelDebug),
		// HTTP/1.1 and HTTP/2 with prior knowledge (h2c) on the same port:
		// gRPC clients dial it directly. net/http's HTTP/2 server carries
		// the rapid-reset and CONTINUATION-flood defences; the limits here
		// bound streams, header lists and frame sizes.
		Protocols: h1h2c(),
		HTTP2: &http.HTTP2Config{
			MaxConcurrentStreams:      limits.MaxConcurrentStreams,
			MaxDecoderHeaderTableSize: 4 << 10,
			MaxReadFrameSize:          16 << 10,
			// Ping a connection that went quiet, so that a peer gone
			// without a FIN does not hold its streams forever.
			SendPingTimeout: 30 * time.Second,
			PingTimeout:     15 * time.Second,
		},
	}
	s := &Server{
		HTTP:     srv,
		Listener: &FramingListener{Listener: ln, MaxHeaderBytes: limits.MaxHeaderBytes, ReadHeaderTimeout: limits.ReadHeaderTimeout},
		Limits:   limits,
		h1:       newH1Server(h, limits, srv.ErrorLog, ln.Addr()),
	}
	s.h1.handoff.onClose = func() {
		if !s.h1.inShutdown.Load() {
			// HTTP.Close or HTTP.Shutdown called directly: stop it all.
			s.h1.closeAll()
			_ = s.Listener.Close()
		}
	}
	return s, nil
}

func h1h2c() *http.Protocols {
	var p http.Protocols
	p.SetHTTP1(true)
	p.SetUnencryptedHTTP2(true)
	return &p
}

// Addr is the bound address (useful with port 0).
func (s *Server) Addr() net.Addr { return s.Listener.Addr() }

// Serve serves until Shutdown or Close; it returns nil after those.
func (s *Server) Serve() error {
	done := make(chan error, 1)
	go func() { done <- s.HTTP.Serve(s.h1.handoff) }()
	err := s.h1.serve(s.Listener)
	if err != nil {
		_ = s.HTTP.Close() // the listener failed: the other half ends too
	}
	if herr := <-done; err == nil && !errors.Is(herr, http.ErrServerClosed) {
		err = herr
	}
	return err
}

// RawListener is the listener's own socket, for a server that accepts on
// it itself (the event-loop engine) and gives ServeConn the connections it
// does not serve; then ServeConns runs instead of Serve.
func (s *Server) RawListener() net.Listener {
	if fl, ok := s.Listener.(*FramingListener); ok {
		return fl.Listener
	}
	return s.Listener
}

// ServeConns serves the connections given to ServeConn, without accepting
// any, until Shutdown or Close; it returns nil after those.
func (s *Server) ServeConns() error {
	if err := s.HTTP.Serve(s.h1.handoff); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// ServeConn serves c as a connection accepted by the listener, behind the
// same framing check, fast path and HTTP/2 detection: what a CONNECT
// tunnel carries, once the tunnel is established. buffered are bytes of c
// already read. It returns at once; Shutdown and Close cover c.
func (s *Server) ServeConn(c net.Conn, buffered []byte) {
	if len(buffered) > 0 {
		c = &readahead.Conn{Conn: c, Head: buffered}
	}
	fl, ok := s.Listener.(*FramingListener)
	if !ok {
		fl = &FramingListener{MaxHeaderBytes: s.Limits.MaxHeaderBytes, ReadHeaderTimeout: s.Limits.ReadHeaderTimeout}
	}
	if hc := s.h1.newConn(fl.wrap(c)); hc != nil {
		go hc.serve()
	}
}

// Shutdown stops accepting, closes idle connections and waits for
// in-flight requests until ctx ends; it returns ctx's error then.
func (s *Server) Shutdown(ctx context.Context) error {
	s.h1.inShutdown.Store(true)
	lerr := s.Listener.Close()
	if errors.Is(lerr, net.ErrClosed) {
		lerr = nil
	}
	done := make(chan error, 1)
	go func() { done <- s.HTTP.Shutdown(ctx) }()
	err := s.h1.shutdown(ctx)
	if herr := <-done; err == nil {
		err = herr
	}
	if err == nil {
		err = lerr
	}
	return err
}

// Close closes the listener and every connection at once.
func (s *Server) Close() error {
	s.h1.closeAll()
	lerr := s.Listener.Close()
	if errors.Is(lerr, net.ErrClosed) {
		lerr = nil
	}
	return errors.Join(s.HTTP.Close(), lerr)
}

// SetKeepAlivesEnabled controls keep-alives on every connection; with false,
// answers carry "Connection: close" and idle connections are closed.
func (s *Server) SetKeepAlivesEnabled(v bool) {
	s.h1.keepAliveOff.Store(!v)
	s.HTTP.SetKeepAlivesEnabled(v)
	if !v {
		s.h1.closeIdleOnly()
	}
}

// ClientError marks an error that came from reading the client's request,
// not from the upstream.
type ClientError struct{ Err error }

func (e *ClientError) Error() string { return "reading request body: " + e.Err.Error() }
func (e *ClientError) Unwrap() error { return e.Err }

// Timeout reports whether the client was too slow to send its body.
func (e *ClientError) Timeout() bool {
	return errors.Is(e.Err, os.ErrDeadlineExceeded)
}

// Gone reports whether the client went away (closed or reset) mid-body.
func (e *ClientError) Gone() bool {
	if errors.Is(e.Err, ErrBadFraming) {
		return false
	}
	return errors.Is(e.Err, errStreamReset) || errors.Is(e.Err, io.ErrUnexpectedEOF) || errors.Is(e.Err, io.EOF) ||
		errors.Is(e.Err, syscall.ECONNRESET) || errors.Is(e.Err, net.ErrClosed)
}

// IsClientErr reports whether err came from reading the client's request.
func IsClientErr(err error) bool {
	var ce *ClientError
	return errors.As(err, &ce)
}

// errStreamReset marks a body read that failed because the client reset
// its HTTP/2 stream (or its connection went away).
var errStreamReset = errors.New("the client reset the stream")

// BodyReader wraps a request body so that each Read has a timeout to make
// progress and its errors are *ClientError. It clears the deadline at EOF,
// since net/http's background read shares the connection's deadline. Not
// safe for concurrent use, like any body.
type BodyReader struct {
	body    io.ReadCloser
	rc      *http.ResponseController
	timeout time.Duration
	fc      *framingConn    // an HTTP/1 request's connection, when checked
	ctx     context.Context // the request's
	h2      bool
	done    atomic.Bool // the body was read to its end
	closed  atomic.Bool
}

// NewBodyReader wraps r's body; w is r's ResponseWriter.
func NewBodyReader(w http.ResponseWriter, r *http.Request, timeout time.Duration) *BodyReader {
	// The framing check sees HTTP/1 bodies only; an HTTP/2 body fails
	// with its stream.
	b := &BodyReader{body: r.Body, rc: http.NewResponseController(w), timeout: timeout, ctx: r.Context(), h2: r.ProtoMajor != 1}
	if !b.h2 {
		b.fc, _ = b.ctx.Value(connKey{}).(*framingConn)
	} else {
		// An HTTP/2 body is a stream's, which may be quiet for long (a
		// gRPC client stream, a bidi chat while the server streams): it
		// has no read deadline (on HTTP/2 a passing one resets the stream,
		// whatever the other direction does), its silence is the proxy's
		// to bound. Nor is the ResponseController touched for it at all:
		// a transport may still read or close the body after the handler
		// returned, when the controller is no longer valid.
		b.timeout, b.rc = 0, nil
	}
	return b
}

// Read implements io.Reader.
func (b *BodyReader) Read(p []byte) (int, error) {
	if b.done.Load() {
		return 0, io.EOF
	}
	if b.closed.Load() {
		return 0, &ClientError{Err: net.ErrClosed}
	}
	if b.timeout > 0 {
		_ = b.rc.SetReadDeadline(time.Now().Add(b.timeout))
		if b.closed.Load() {
			_ = b.rc.SetReadDeadline(aLongTimeAgo) // Close raced the line above
		}
	}
	n, err := b.body.Read(p)
	if err != nil {
		if err == io.EOF {
			if b.timeout > 0 {
				_ = b.rc.SetReadDeadline(time.Time{})
			}
			b.done.Store(true)
			return n, io.EOF
		}
		// The body is broken and the connection can carry no other
		// request. After the handler, net/http reads what is left of a
		// body: with the deadline in the past it gives up at once and
		// closes the connection, instead of waiting on a stalled client
		// for as long as it keeps the connection open.
		if b.rc != nil {
			_ = b.rc.SetReadDeadline(aLongTimeAgo)
		}
		// net/http reports a framing fault as an unexpected EOF; the
		// framing check knows better.
		if b.fc != nil && b.fc.badFraming.Load() {
			err = ErrBadFraming
		}
		if b.h2 && b.ctx.Err() != nil {
			// net/http's error for a reset stream is of a type of its own.
			err = fmt.Errorf("%w: %w", errStreamReset, err)
		}
		ce := &ClientError{Err: err}
		if b.fc != nil {
			b.fc.bodyErr.Store(&bodyFailure{ctx: b.ctx, err: ce})
		}
		return n, ce
	}
	return n, nil
}

// Cause returns the error a request that failed with err is answered for.
// net/http cancels a request's context as soon as a read on its connection
// fails, so when the client's body breaks (malformed chunked framing, a
// client too slow to send it) the transport may report the cancellation
// rather than the body's error. The client is still there and is owed its
// 400 or 408: the body's error is the cause.
func Cause(r *http.Request, err error) error {
	if r.ProtoMajor != 1 || !errors.Is(err, context.Canceled) {
		return err
	}
	if fc, ok := r.Context().Value(connKey{}).(*framingConn); ok {
		if f := fc.bodyErr.Load(); f != nil && f.ctx == r.Context() {
			return f.err
		}
	}
	return err
}

// bodyFailure is the error a request's body failed with, kept on its
// connection for Cause; ctx tells which request it was.
type bodyFailure struct {
	ctx context.Context
	err *ClientError
}

// Close implements io.Closer. It may be called while another goroutine is
// in Read: that Read is ended at once rather than left waiting on the client.
func (b *BodyReader) Close() error {
	if !b.closed.Swap(true) && !b.done.Load() && b.rc != nil {
		_ = b.rc.SetReadDeadline(aLongTimeAgo)
	}
	return b.body.Close()
}

var aLongTimeAgo = time.Unix(1, 0)
