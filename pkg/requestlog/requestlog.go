// Package requestlog keeps what happened to the app's outbound requests, so
// that an operator can see why one failed without a trace backend: the
// failed requests, with their attempts and why the chain stopped, in a
// bounded ring per service (GET /requests/failed); a live tap of every
// request for a few watchers at most (GET /tap); and the access log, one
// JSON line per request through slog.
//
// The outbound chain hands it a Request only when the request failed, or
// when someone taps or the access log is on (Wants): a request that
// succeeds while nobody watches costs one atomic load.
package requestlog

import (
	"context"
	"errors"
	"log/slog"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sidecar-mesh/sidecar/internal/clip"
)

// Request is what happened to one request, as the admin API, the tap and
// the access log show it. Fields are bounded: Record clips each string to
// its limit (the path at MaxPath bytes, the detail at MaxDetail, an
// attempt's outcome at MaxOutcome), and the attempts to MaxAttempts.
type Request struct {
	Time    time.Time `json:"time"`
	Service string    `json:"service"`
	Method  string    `json:"method"`
	Path    string    `json:"path"`
	// Status is the answer's status: the upstream's, or the sidecar's own
	// when Reason is set (499: the client went away).
	Status int `json:"status"`
	// GRPCStatus is a gRPC answer's grpc-status, when known.
	GRPCStatus string `json:"grpcStatus,omitempty"`
	// Reason is the sidecar's error (x-sidecar-error), "" for an upstream
	// answer.
	Reason string `json:"reason,omitempty"`
	// Detail says more of a sidecar's error.
	Detail     string  `json:"detail,omitempty"`
	TraceID    string  `json:"traceId,omitempty"`
	DurationMs float64 `json:"durationMs"`
	// Attempts are the attempts made, in order; empty when the request
	// was refused before any (circuit open, overloaded, no endpoint).
	Attempts []Attempt `json:"attempts"`
	// Stop says why the chain made no further attempt (Stop* constants),
	// for a failed request; "" when there was nothing to try again.
	Stop string `json:"stop,omitempty"`
}

// Attempt is one attempt of a request.
type Attempt struct {
	Endpoint string `json:"endpoint"`
	// Outcome is the answer's status ("503", "200 grpc-status 14") or the
	// failure ("connection refused", "reset", "per-try timeout").
	Outcome    string  `json:"outcome"`
	DurationMs float64 `json:"durationMs"`
	// RetryReason is the retry.on condition this attempt retried ("" for
	// the first), after BackoffMs of backoff; Hedge for a hedge, sent
	// while the attempts before it were still out.
	RetryReason string  `json:"retryReason,omitempty"`
	BackoffMs   float64 `json:"backoffMs,omitempty"`
	// Lost: the attempt was cancelled because another one's answer came
	// first (a hedge's, or the one it hedged).
	Lost bool `json:"lost,omitempty"`
	// BreakerState is the service's circuit breaker when the chain judged
	// the attempt: "closed", "open" or "half-open".
	BreakerState string `json:"breakerState"`
}

// Why the chain made no further attempt (Request.Stop).
const (
	// StopAttemptsUsedUp: retry.attempts were all made.
	StopAttemptsUsedUp = "attempts-used-up"
	// StopBudgetExhausted: a retry was due, the retry budget had none.
	StopBudgetExhausted = "budget-exhausted"
	// StopDeadline: the overall timeout could not cover the next backoff
	// and attempt, or passed.
	StopDeadline = "deadline"
	// StopBreakerOpen: the service's circuit breaker was open.
	StopBreakerOpen = "breaker-open"
	// StopMethodNotRetryable: the outcome is a retry.on condition but
	// the method is not in retry.methods and has no Idempotency-Key.
	StopMethodNotRetryable = "method-not-retryable"
	// StopBodyNotReplayable: the request body was too large (over 64 KiB)
	// or still streaming, so it could not be sent again.
	StopBodyNotReplayable = "body-not-replayable"
	// StopNotRetryable: the outcome is no retry.on condition.
	StopNotRetryable = "not-retryable"
)

// Failed reports whether r is a failure: the sidecar's own error, a 5xx
// answer, or a gRPC server failure (UNAVAILABLE, INTERNAL, UNKNOWN,
// DATA_LOSS).
func (r *Request) Failed() bool {
	if r.Reason != "" || r.Status >= 500 {
		return true
	}
	switch r.GRPCStatus {
	case "14", "13", "2", "15":
		return true
	}
	return false
}

// Limits of a Request's strings and attempts: what an app, a peer or an
// upstream wrote into them (a path, an endpoint's broken header line quoted
// in an outcome, a grpc-status) is kept, shown and logged at most this long.
const (
	MaxPath    = 256
	MaxDetail  = 512
	MaxOutcome = 256
	maxWord    = 64  // method, reason, grpc-status, stop, retry reason, breaker state
	maxName    = 256 // service, endpoint
	// MaxAttempts bounds the attempts kept of one request (retry.attempts
	// is at most 10).
	MaxAttempts = 16
)

// bound clips every string of r and its attempts to the limits above, as
// valid UTF-8: one place, whatever the caller cut already.
func (r *Request) bound() {
	r.Service, r.Method, r.Path = clip.String(r.Service, maxName), clip.String(r.Method, maxWord), clip.String(r.Path, MaxPath)
	r.GRPCStatus, r.Reason, r.Detail = clip.String(r.GRPCStatus, maxWord), clip.String(r.Reason, maxWord), clip.String(r.Detail, MaxDetail)
	r.TraceID, r.Stop = clip.String(r.TraceID, maxWord), clip.String(r.Stop, maxWord)
	if len(r.Attempts) > MaxAttempts {
		r.Attempts = r.Attempts[:MaxAttempts]
	}
	for i := range r.Attempts {
		a := &r.Attempts[i]
		a.Endpoint, a.Outcome = clip.String(a.Endpoint, maxName), clip.String(a.Outcome, MaxOutcome)
		a.RetryReason, a.BreakerState = clip.String(a.RetryReason, maxWord), clip.String(a.BreakerState, maxWord)
	}
}

// Config configures a Recorder. The zero value keeps failures with the
// defaults, taps with the defaults, and has no access log.
type Config struct {
	// PerService is how many failed requests are kept per service; 0:
	// DefaultPerService.
	PerService int
	// MaxServices is how many services get a ring of their own; failures
	// of later ones, and of requests named no service, share one more.
	// 0: DefaultMaxServices.
	MaxServices int
	// MaxWatchers is how many taps may watch at once; 0:
	// DefaultMaxWatchers.
	MaxWatchers int
	// TapRate is the most lines per second one tap gets; the rest are
	// dropped and counted. 0: DefaultTapRate.
	TapRate int
	// AccessLog, when set, gets one line per request (info level, message
	// "request"), written by a goroutine of the recorder's: the request
	// path only queues it, and drops it when the queue is full.
	AccessLog *slog.Logger
	// Sample is the share of requests the access log writes (0 < Sample
	// <= 1); 0: 1.
	Sample float64
	// FailuresOnly limits the access log to failed requests.
	FailuresOnly bool
}

// Defaults of Config.
const (
	DefaultPerService  = 64
	DefaultMaxServices = 256
	DefaultMaxWatchers = 4
	DefaultTapRate     = 100
	accessLogQueue     = 4096
)

// Recorder keeps failed requests, feeds taps and writes the access log.
// Safe for concurrent use; a nil *Recorder records nothing.
type Recorder struct {
	cfg Config

	mu    sync.Mutex // guards rings
	rings map[string]*ring
	other ring // services past MaxServices, and requests of no service

	tapMu      sync.Mutex // guards taps and tapsClosed
	taps       []*Tap
	tapsClosed bool        // CloseTaps was called: no more taps
	watching   atomic.Bool // len(taps) > 0

	// logQueue is never closed: a request that finishes after Close
	// queues its line, which nobody writes, or drops it.
	logQueue chan *Request // nil without an access log
	logStop  chan struct{} // closed by Close
	logDone  chan struct{} // closed when the writer has stopped
	dropped  atomic.Int64  // access log lines dropped, the queue full
	closed   sync.Once
}

// New returns a recorder; with an access log it starts the goroutine that
// writes it, which Close stops.
func New(cfg Config) *Recorder {
	if cfg.PerService <= 0 {
		cfg.PerService = DefaultPerService
	}
	if cfg.MaxServices <= 0 {
		cfg.MaxServices = DefaultMaxServices
	}
	if cfg.MaxWatchers <= 0 {
		cfg.MaxWatchers = DefaultMaxWatchers
	}
	if cfg.TapRate <= 0 {
		cfg.TapRate = DefaultTapRate
	}
	if cfg.Sample <= 0 || cfg.Sample > 1 {
		cfg.Sample = 1
	}
	r := &Recorder{cfg: cfg, rings: map[string]*ring{}, other: ring{buf: make([]*Request, cfg.PerService)}}
	if cfg.AccessLog != nil {
		r.logQueue = make(chan *Request, accessLogQueue)
		r.logStop, r.logDone = make(chan struct{}), make(chan struct{})
		go r.writeLog()
	}
	return r
}

// Wants reports whether a request that succeeded is wanted: someone taps,
// or the access log writes successes. A failed request is always wanted.
// One atomic load; never blocks.
func (r *Recorder) Wants() bool {
	return r != nil && (r.watching.Load() || (r.logQueue != nil && !r.cfg.FailuresOnly))
}

// Record takes one finished request: a failure goes into its service's
// ring, and every request to the taps and the access log. It never blocks;
// r is not modified afterwards and must not be by the caller.
func (r *Recorder) Record(req *Request) {
	if r == nil {
		return
	}
	req.bound()
	failed := req.Failed()
	if failed {
		r.ringOf(req.Service).add(req)
	}
	if r.watching.Load() {
		r.publish(req, failed)
	}
	if r.logQueue != nil && (failed || !r.cfg.FailuresOnly) && (r.cfg.Sample >= 1 || rand.Float64() < r.cfg.Sample) {
		select {
		case r.logQueue <- req:
		default:
			r.dropped.Add(1)
		}
	}
}

// RecordUnrouted records a request refused before it was routed to a
// service (unknown_service, not_allowed, bad_request): req.Service is the
// name it asked for. It is kept with the services that have no ring of
// their own, so that the names a client makes up take no ring from the
// services that exist; sidecar why finds it by that name all the same.
func (r *Recorder) RecordUnrouted(req *Request) {
	if r == nil {
		return
	}
	req.bound()
	r.other.add(req)
	if r.watching.Load() {
		r.publish(req, true)
	}
	if r.logQueue != nil && (r.cfg.Sample >= 1 || rand.Float64() < r.cfg.Sample) {
		select {
		case r.logQueue <- req:
		default:
			r.dropped.Add(1)
		}
	}
}

// ringOf is service's ring, made on its first failure while there is room.
func (r *Recorder) ringOf(service string) *ring {
	r.mu.Lock()
	defer r.mu.Unlock()
	if service == "" {
		return &r.other
	}
	rg := r.rings[service]
	if rg == nil {
		if len(r.rings) >= r.cfg.MaxServices {
			return &r.other
		}
		rg = &ring{buf: make([]*Request, r.cfg.PerService)}
		r.rings[service] = rg
	}
	return rg
}

// Failed returns the failed requests kept, newest first: service's when
// service is set, else every service's.
func (r *Recorder) Failed(service string) []Request {
	out := []Request{}
	if r == nil {
		return out
	}
	r.mu.Lock()
	rings := []*ring{&r.other}
	for _, rg := range r.rings {
		rings = append(rings, rg)
	}
	r.mu.Unlock()
	for _, rg := range rings {
		for _, req := range rg.list() {
			if service == "" || req.Service == service {
				out = append(out, *req)
			}
		}
	}
	slices.SortStableFunc(out, func(a, b Request) int { return b.Time.Compare(a.Time) })
	return out
}

// Kept is how many failed requests are kept now, over every ring.
func (r *Recorder) Kept() int {
	r.mu.Lock()
	rings := []*ring{&r.other}
	for _, rg := range r.rings {
		rings = append(rings, rg)
	}
	r.mu.Unlock()
	n := 0
	for _, rg := range rings {
		rg.mu.Lock()
		n += rg.n
		rg.mu.Unlock()
	}
	return n
}

// Capacity is the most failed requests the recorder ever keeps.
func (r *Recorder) Capacity() int { return (r.cfg.MaxServices + 1) * r.cfg.PerService }

// DroppedLogLines is how many access log lines were dropped because the
// writer fell behind.
func (r *Recorder) DroppedLogLines() int64 { return r.dropped.Load() }

// ring holds the newest len(buf) requests of one service.
type ring struct {
	mu   sync.Mutex // guards the fields below
	buf  []*Request
	next int // where the next one goes
	n    int // how many are held
}

func (g *ring) add(req *Request) {
	g.mu.Lock()
	g.buf[g.next] = req
	g.next = (g.next + 1) % len(g.buf)
	g.n = min(g.n+1, len(g.buf))
	g.mu.Unlock()
}

// list returns the requests held, oldest first.
func (g *ring) list() []*Request {
	g.mu.Lock()
	defer g.mu.Unlock()
	out := make([]*Request, 0, g.n)
	for i := range g.n {
		out = append(out, g.buf[(g.next-g.n+i+len(g.buf))%len(g.buf)])
	}
	return out
}

// ErrTooManyWatchers refuses a tap when MaxWatchers already watch.
var ErrTooManyWatchers = errors.New("too many taps watching already")

// ErrClosed refuses a tap once the recorder's taps were closed.
var ErrClosed = errors.New("the sidecar is shutting down")

// TapFilter chooses what a tap sees.
type TapFilter struct {
	Service      string // "": every service
	FailuresOnly bool
}

// Tap is one watcher: a queue its reader drains, filled without blocking
// and at most TapRate a second. Safe for concurrent use.
type Tap struct {
	r      *Recorder
	filter TapFilter
	lines  chan *Request
	mu     sync.Mutex // guards second, sent and drop
	second int64
	sent   int
	drop   int64
}

// Tap starts a watcher: every request that matches f from now on comes on
// its Lines, at most TapRate a second (the others are dropped and
// counted), until Stop or the recorder's CloseTaps, which close Lines.
func (r *Recorder) Tap(f TapFilter) (*Tap, error) {
	t := &Tap{r: r, filter: f, lines: make(chan *Request, 64)}
	r.tapMu.Lock()
	defer r.tapMu.Unlock()
	if r.tapsClosed {
		return nil, ErrClosed
	}
	if len(r.taps) >= r.cfg.MaxWatchers {
		return nil, ErrTooManyWatchers
	}
	r.taps = append(r.taps, t)
	r.watching.Store(true)
	return t, nil
}

// Lines are the requests the tap sees; closed when the tap ends.
func (t *Tap) Lines() <-chan *Request { return t.lines }

// Dropped is how many requests the tap missed so far (over the rate, or
// its reader behind).
func (t *Tap) Dropped() int64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.drop
}

// Stop ends the tap; no request is queued for it afterwards.
func (t *Tap) Stop() {
	r := t.r
	r.tapMu.Lock()
	defer r.tapMu.Unlock()
	if i := slices.Index(r.taps, t); i >= 0 {
		r.taps = slices.Delete(r.taps, i, i+1)
		close(t.lines)
	}
	r.watching.Store(len(r.taps) > 0)
}

// publish hands req to every tap that wants it, dropping it for a tap
// whose queue is full or whose second is used up.
func (r *Recorder) publish(req *Request, failed bool) {
	r.tapMu.Lock()
	defer r.tapMu.Unlock()
	now := time.Now().Unix()
	for _, t := range r.taps {
		if (t.filter.Service != "" && t.filter.Service != req.Service) || (t.filter.FailuresOnly && !failed) {
			continue
		}
		t.mu.Lock()
		if t.second != now {
			t.second, t.sent = now, 0
		}
		ok := t.sent < r.cfg.TapRate
		if ok {
			select {
			case t.lines <- req:
				t.sent++
			default:
				ok = false
			}
		}
		if !ok {
			t.drop++
		}
		t.mu.Unlock()
	}
}

// CloseTaps ends every tap (their channels close) and refuses new ones
// (ErrClosed): for the admin server's shutdown, which waits for its
// streams.
func (r *Recorder) CloseTaps() {
	if r == nil {
		return
	}
	r.tapMu.Lock()
	defer r.tapMu.Unlock()
	for _, t := range r.taps {
		close(t.lines)
	}
	r.taps, r.tapsClosed = nil, true
	r.watching.Store(false)
}

// Close ends the taps and stops the access log's writer after it wrote
// what was queued.
func (r *Recorder) Close() {
	if r == nil {
		return
	}
	r.CloseTaps()
	r.closed.Do(func() {
		if r.logQueue != nil {
			close(r.logStop)
			<-r.logDone
		}
	})
}

// writeLog writes the access log until Close, and then what was queued
// by then.
func (r *Recorder) writeLog() {
	defer close(r.logDone)
	for {
		select {
		case req := <-r.logQueue:
			r.writeLine(req)
		case <-r.logStop:
			for {
				select {
				case req := <-r.logQueue:
					r.writeLine(req)
				default:
					return
				}
			}
		}
	}
}

// writeLine writes one request's line.
func (r *Recorder) writeLine(req *Request) {
	log := r.cfg.AccessLog
	attrs := []slog.Attr{
		slog.String("service", req.Service), slog.String("method", req.Method), slog.String("path", req.Path),
		slog.Int("status", req.Status), slog.Float64("durationMs", req.DurationMs), slog.Int("attempts", len(req.Attempts)),
	}
	if req.Reason != "" {
		attrs = append(attrs, slog.String("reason", req.Reason))
	}
	if req.GRPCStatus != "" {
		attrs = append(attrs, slog.String("grpcStatus", req.GRPCStatus))
	}
	if n := len(req.Attempts); n > 0 {
		attrs = append(attrs, slog.String("upstream", req.Attempts[n-1].Endpoint))
	}
	if req.Stop != "" {
		attrs = append(attrs, slog.String("stop", req.Stop))
	}
	if req.TraceID != "" {
		attrs = append(attrs, slog.String("traceId", req.TraceID))
	}
	log.LogAttrs(context.Background(), slog.LevelInfo, "request", attrs...)
}
