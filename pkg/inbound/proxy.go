// Package inbound is the sidecar's inbound side: the listener that peers and
// clients reach the app through (0.0.0.0:15006), the probes the sidecar runs
// against the app, and the health endpoints the kubelet asks (0.0.0.0:15020).
package inbound

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/downstream"
	"github.com/sidecar-mesh/sidecar/pkg/forward"
	"github.com/sidecar-mesh/sidecar/pkg/upstream"
)

// DefaultMaxInFlight is the concurrency limit of the inbound proxy when
// Config.MaxInFlight is zero, the same as a policy's concurrency default.
const DefaultMaxInFlight = 1024

// StatusClientClosed is the status an Observer is given for a request whose
// client went away before anything was answered (nginx's 499). It is never
// written.
const StatusClientClosed = forward.StatusClientClosed

// Config configures the inbound proxy. The zero value of a field means its
// default, except AppAddr, which is required.
type Config struct {
	// AppAddr is the app's host:port, normally 127.0.0.1:appPort. Every
	// request goes there, whatever its Host header says.
	AppAddr string
	// Service is the app's service name, for error bodies and logs. Empty:
	// none is named.
	Service string
	// MaxInFlight bounds the requests forwarded to the app at once; a
	// request over it is answered 503 overloaded at once, never queued.
	// Zero: DefaultMaxInFlight.
	MaxInFlight int
	// Transport configures the connections to the app. Its
	// ResponseHeaderTimeout (default 15s) bounds how long the app may take
	// to start answering.
	Transport upstream.TransportConfig
	// Limits bound the listener (header size, read timeouts); they should
	// be the ones given to downstream.Listen. Only BodyReadTimeout is used
	// here.
	Limits downstream.Limits
	// Observer is told about every request (spans, metrics). Nil: none.
	Observer Observer
	// Logger receives state transitions; nil discards them.
	Logger *slog.Logger
}

// Observer is told when an inbound request starts and ends, for a server
// span and metrics with direction=inbound. Both methods are called on the
// request's goroutine, for every request the listener hands to the Proxy
// (rejected ones included), and must not block. Implementations are safe
// for concurrent use.
type Observer interface {
	// Start is called when a request arrives, before anything is read or
	// forwarded. It returns the request to go on with: r itself, or r with a
	// context carrying what End needs (an extracted span context). Headers
	// it sets on r are forwarded to the app.
	Start(r *http.Request) *http.Request
	// End is called once the answer is complete, with the request Start
	// returned.
	End(r *http.Request, res Result)
}

// Result is what an Observer learns about a finished request, a plain
// value.
type Result struct {
	// Status is the status code sent to the client: the app's, or the
	// sidecar's own for a local error, 101 for a protocol upgrade, and
	// StatusClientClosed when the client went away before an answer.
	Status int
	// Reason is the x-sidecar-error reason when the sidecar answered
	// itself; empty for the app's answers.
	Reason string
	// Aborted is set when the answer was cut off after it started.
	Aborted bool
	// Duration is from Start to the end of the answer.
	Duration time.Duration
	// GRPCStatus is a gRPC answer's grpc-status, as it went to the client
	// ("" for other answers).
	GRPCStatus string
}

// Proxy is the inbound http.Handler: it forwards every request to the app.
// Serve it with downstream.Listen, whose framing check it relies on. Safe for
// concurrent use; the zero value is not usable, call New.
type Proxy struct {
	app       string
	service   string
	max       int64
	bodyRead  time.Duration
	observer  Observer
	log       *slog.Logger
	transport *upstream.Transport
	fw        *forward.Forwarder
	toApp     *appReachability // the transport, minding whether the app accepts connections

	inFlight atomic.Int64
	waiters  atomic.Int64  // goroutines in Wait
	mu       sync.Mutex    // guards idle
	idle     chan struct{} // closed when inFlight drops to 0 while someone waits
}

var _ http.Handler = (*Proxy)(nil)

// New builds the inbound proxy.
func New(cfg Config) (*Proxy, error) {
	if _, _, err := net.SplitHostPort(cfg.AppAddr); err != nil {
		return nil, fmt.Errorf("inbound: AppAddr %q is not the app's host:port", cfg.AppAddr)
	}
	if cfg.MaxInFlight < 0 {
		return nil, errors.New("inbound: MaxInFlight must not be negative")
	}
	if cfg.MaxInFlight == 0 {
		cfg.MaxInFlight = DefaultMaxInFlight
	}
	p := &Proxy{
		app:       cfg.AppAddr,
		service:   cfg.Service,
		max:       int64(cfg.MaxInFlight),
		bodyRead:  cfg.Limits.WithDefaults().BodyReadTimeout,
		observer:  cfg.Observer,
		log:       componentLogger(cfg.Logger, "inbound").With("app", cfg.AppAddr),
		transport: upstream.NewTransport(cfg.Transport),
	}
	p.fw = &forward.Forwarder{OnError: p.handleError, WriteTimeout: cfg.Limits.WithDefaults().WriteTimeout}
	p.toApp = &appReachability{next: p.transport, log: p.log}
	return p, nil
}

// Close releases the pooled connections to the app. Stop the listener and
// Wait for in-flight requests first.
func (p *Proxy) Close() { p.transport.Close() }

// InFlight is the number of requests being forwarded to the app now.
func (p *Proxy) InFlight() int64 { return p.inFlight.Load() }

// Wait blocks until no request is in flight or ctx ends, and returns
// ctx.Err() in the second case. New requests may still arrive while it
// waits: for a drain, stop the listener (downstream.Server.Shutdown) first.
// Unlike Shutdown, it also waits for upgraded connections.
func (p *Proxy) Wait(ctx context.Context) error {
	p.waiters.Add(1)
	defer p.waiters.Add(-1)
	for {
		p.mu.Lock()
		if p.inFlight.Load() == 0 {
			p.mu.Unlock()
			return nil
		}
		if p.idle == nil {
			p.idle = make(chan struct{})
		}
		idle := p.idle
		p.mu.Unlock()
		select {
		case <-idle:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// release ends one in-flight request and wakes Wait at zero. The waiter
// count is checked after the decrement and Wait checks the count after
// registering, so one of the two always sees the other.
func (p *Proxy) release() {
	if p.inFlight.Add(-1) != 0 || p.waiters.Load() == 0 {
		return
	}
	p.mu.Lock()
	if p.idle != nil {
		close(p.idle)
		p.idle = nil
	}
	p.mu.Unlock()
}

// ServeHTTP forwards one request to the app.
func (p *Proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	v := downstream.TakeVerdict(r)
	if p.observer == nil {
		p.serve(w, r, v)
		return
	}
	// What Start adds (trace context) must reach the app: the client's
	// Connection header may not name it for deletion.
	forward.RemoveConnectionOptions(r.Header)
	start := time.Now()
	if r2 := p.observer.Start(r); r2 != nil {
		r = r2
	}
	rec := recorderPool.Get().(*recorder)
	rec.ResponseWriter = w
	completed := false
	defer func() {
		res := Result{Status: rec.status, Reason: rec.reason, Duration: time.Since(start), GRPCStatus: grpcStatusOf(w.Header())}
		if !completed { // the handler is panicking, as it does for a client gone
			if res.Status == 0 {
				res.Status = StatusClientClosed
			} else {
				res.Aborted = true
			}
		}
		if res.Status == 0 {
			res.Status = http.StatusOK // net/http's implicit answer
		}
		*rec = recorder{}
		recorderPool.Put(rec)
		p.observer.End(r, res)
	}()
	p.serve(rec, r, v)
	completed = true
}

func (p *Proxy) serve(w http.ResponseWriter, r *http.Request, v downstream.Verdict) {
	if v.Reason != "" {
		p.reject(w, r, forward.Refuse(forward.ReasonBadRequest, p.service, v.Reason))
		return
	}
	if r.Method == http.MethodConnect {
		p.reject(w, r, forward.Refuse(forward.ReasonNotAllowed, p.service, "CONNECT is not served on the inbound port"))
		return
	}
	if p.inFlight.Add(1) > p.max {
		p.release()
		p.reject(w, r, forward.Refuse(forward.ReasonOverloaded, p.service, "the app's inbound concurrency limit is reached"))
		return
	}
	defer p.release()
	// A hop marker is about the way a request took to this pod; what the
	// app calls while serving it are new requests.
	delete(r.Header, forward.HopHeader)
	if r.Body != nil && r.Body != http.NoBody {
		// The handler owns r: reads get a progress timeout and client
		// errors are told apart from the app's.
		r.Body = downstream.NewBodyReader(w, r, p.bodyRead)
	}
	p.fw.Forward(w, r, p.toApp, p.app)
}

// reject answers with a local error, noting its reason for the Observer.
func (p *Proxy) reject(w http.ResponseWriter, r *http.Request, e *forward.LocalError) {
	if rec, ok := w.(*recorder); ok {
		rec.reason = e.Reason
	}
	forward.WriteError(w, r, e)
}

// handleError answers a request the app could not be asked or could not
// answer. The inbound path has no retries or deadlines of its own, so only
// the transport's and the client's errors arrive here.
func (p *Proxy) handleError(w http.ResponseWriter, r *http.Request, err error) {
	e := forward.LocalReply(p.service, err)
	if e.Status == StatusClientClosed {
		// The client went away: nobody to answer, and net/http must not
		// send an implicit 200.
		panic(http.ErrAbortHandler)
	}
	p.log.Debug("request failed", "reason", e.Reason, "err", err)
	p.reject(w, r, e)
}

// componentLogger returns l (nil: one that discards) for a component.
func componentLogger(l *slog.Logger, component string) *slog.Logger {
	if l == nil {
		l = slog.New(slog.DiscardHandler)
	}
	return l.With("component", component)
}

// appReachability logs when the app stops and starts accepting
// connections: a transition, not a request.
type appReachability struct {
	next http.RoundTripper
	log  *slog.Logger
	down atomic.Bool
}

func (a *appReachability) RoundTrip(r *http.Request) (*http.Response, error) {
	resp, err := a.next.RoundTrip(r)
	var ce *upstream.ConnectError
	switch {
	case errors.As(err, &ce):
		if !a.down.Swap(true) {
			a.log.Warn("app not accepting connections", "err", ce.Err)
		}
	case err == nil && a.down.Load():
		if a.down.Swap(false) {
			a.log.Info("app accepting connections again")
		}
	}
	return resp, err
}

// recorder notes the status the client was sent, for the Observer. It
// keeps http.ResponseController working: Flush goes through Unwrap, and
// Hijack (protocol upgrades) is recorded as 101.
type recorder struct {
	http.ResponseWriter
	status int
	reason string
}

var recorderPool = sync.Pool{New: func() any { return new(recorder) }}

func (rec *recorder) WriteHeader(code int) {
	if rec.status == 0 && code >= 200 {
		rec.status = code
	}
	rec.ResponseWriter.WriteHeader(code)
}

func (rec *recorder) Write(b []byte) (int, error) {
	if rec.status == 0 {
		rec.status = http.StatusOK
	}
	return rec.ResponseWriter.Write(b)
}

func (rec *recorder) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	c, brw, err := http.NewResponseController(rec.ResponseWriter).Hijack()
	if err == nil {
		rec.status = http.StatusSwitchingProtocols
	}
	return c, brw, err
}

func (rec *recorder) Unwrap() http.ResponseWriter { return rec.ResponseWriter }

// grpcStatusOf is the grpc-status of a gRPC answer whose header (trailers
// included, as http.TrailerPrefix fields) is h; "" for other answers.
func grpcStatusOf(h http.Header) string {
	if !strings.HasPrefix(h.Get("Content-Type"), "application/grpc") {
		return ""
	}
	if v := h.Get("Grpc-Status"); v != "" {
		return v
	}
	if v := h[http.TrailerPrefix+"Grpc-Status"]; len(v) > 0 {
		return v[0]
	}
	return ""
}
