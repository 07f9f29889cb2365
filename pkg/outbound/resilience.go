package outbound

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"math"
	"net/http"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sony/gobreaker/v2"

	"github.com/sidecar-mesh/sidecar/pkg/downstream"
	"github.com/sidecar-mesh/sidecar/pkg/forward"
	"github.com/sidecar-mesh/sidecar/pkg/policy"
)

// Policies gives the effective policy of a service. Implementations are
// safe for concurrent use and never block.
type Policies interface {
	For(service string) *policy.Policy
}

// StaticPolicies is the effective policy of every service from a fixed list
// of Policy documents (service "*" is the default). Effective policies are
// computed once per service and cached.
type StaticPolicies struct {
	byService map[string]policy.Policy
	cache     sync.Map // service -> *policy.Policy
}

// NewStaticPolicies indexes ps by service.
func NewStaticPolicies(ps []policy.Policy) *StaticPolicies {
	s := &StaticPolicies{byService: make(map[string]policy.Policy, len(ps))}
	for _, p := range ps {
		s.byService[p.Service] = p
	}
	return s
}

// For implements Policies.
func (s *StaticPolicies) For(service string) *policy.Policy {
	if p, ok := s.cache.Load(service); ok {
		return p.(*policy.Policy)
	}
	e := policy.Effective(service, s.byService)
	p, _ := s.cache.LoadOrStore(service, &e)
	return p.(*policy.Policy)
}

// serviceState is what outlives a request for one service: its breaker,
// in-flight count, retry budget and outlier state. It lives in a registry
// keyed by service, not in the policy, so that it survives policy reloads:
// only a change of the circuitBreaker section's values replaces the
// breaker; everything else is kept whatever the policy says.
type serviceState struct {
	limit    limiter
	adaptive adaptive // the limit, with concurrency.adaptive
	breaker  atomic.Pointer[breaker]
	// checked is the newest policy the breaker's settings were compared
	// with; a request carrying it needs no comparison.
	checked  atomic.Pointer[policy.Policy]
	rebuild  sync.Mutex // serializes comparing and replacing the breaker
	budget   budget
	outliers outliers
	// endpoints is what the balancers learned of each endpoint.
	endpoints endpointRegistry
}

// breaker is a circuit breaker with the settings it was built from.
type breaker struct {
	*gobreaker.TwoStepCircuitBreaker[struct{}]
	settings *policy.CircuitBreaker // shared with an effective policy: never modified
}

// stateRegistry holds the serviceState of every service called so far.
// Safe for concurrent use.
type stateRegistry struct {
	states   sync.Map // service -> *serviceState
	observer Observer
	log      *slog.Logger
	// policies, when set, gives the policy in force, against which a
	// service's breaker is checked after a reload; nil: the policy of the
	// request at hand.
	policies Policies
}

// get returns service's state, its breaker in step with the policy in
// force. p is the policy the request started with; when it is the one the
// breaker was last checked against (every request but those after a
// reload) this is two loads and a compare.
func (r *stateRegistry) get(service string, p *policy.Policy) *serviceState {
	v, ok := r.states.Load(service)
	if !ok {
		st := &serviceState{}
		st.breaker.Store(r.newBreaker(service, p.CircuitBreaker))
		st.checked.Store(p)
		v, _ = r.states.LoadOrStore(service, st)
	}
	st := v.(*serviceState)
	if p != nil && st.checked.Load() != p {
		r.recheck(service, st, p)
	}
	return st
}

// recheck compares the breaker's settings with the policy in force (not the
// request's, which may be older) and replaces the breaker only if their
// values differ. Checks are serialized and each reads the policy in force
// under the lock, so the breaker only ever moves forward.
func (r *stateRegistry) recheck(service string, st *serviceState, p *policy.Policy) {
	st.rebuild.Lock()
	defer st.rebuild.Unlock()
	cur := p
	if r.policies != nil {
		cur = r.policies.For(service)
	}
	if st.checked.Load() == cur {
		return
	}
	old := st.breaker.Load()
	if !reflect.DeepEqual(old.settings, cur.CircuitBreaker) {
		st.breaker.Store(r.newBreaker(service, cur.CircuitBreaker))
		from := old.State().String()
		r.log.Info("circuit breaker settings changed; breaker reset", "service", service, "from", from)
		if from != gobreaker.StateClosed.String() {
			r.observer.BreakerStateChanged(service, from, gobreaker.StateClosed.String())
		}
	}
	st.checked.Store(cur)
}

// newBreaker maps the policy's breaker onto sony/gobreaker, whose state
// machine is ours exactly: one mutex, lazy state moves, generations that
// drop late results, a rolling window in buckets, and a half-open state that
// admits MaxRequests probes.
func (r *stateRegistry) newBreaker(service string, cb *policy.CircuitBreaker) *breaker {
	window := cb.Window.D()
	return &breaker{settings: cb, TwoStepCircuitBreaker: gobreaker.NewTwoStepCircuitBreaker[struct{}](gobreaker.Settings{
		Name:         service,
		MaxRequests:  uint32(*cb.HalfOpenRequests),
		Interval:     window,
		BucketPeriod: window / 10,
		Timeout:      cb.OpenDuration.D(),
		ReadyToTrip: func(c gobreaker.Counts) bool {
			return cb.ReadyToTrip(int(c.ConsecutiveFailures), int(c.Requests), int(c.TotalFailures))
		},
		IsExcluded: func(err error) bool { return errors.Is(err, errNotCounted) },
		// Called under the breaker's lock, on the request path: the
		// observer must not block.
		OnStateChange: func(name string, from, to gobreaker.State) {
			r.log.Info("circuit breaker "+to.String(), "service", name, "from", from.String())
			r.observer.BreakerStateChanged(name, from.String(), to.String())
		},
	})}
}

// Outcomes as the breaker sees them.
var (
	errUpstreamFailed = errors.New("upstream failed")
	errNotCounted     = errors.New("outcome not counted")
)

// breakerOutcome classifies an outcome, a request's for the breaker (after
// its retries) or an attempt's for outlier detection: 5xx answers, gRPC
// server failures, transport failures and timeouts are failures; client
// cancellations and the sidecar's own refusals (no endpoints) count for
// nothing; any other answer (2xx-4xx) is a success.
func breakerOutcome(resp *http.Response, err error) error {
	switch {
	case err != nil && (errors.Is(err, context.Canceled) || downstream.IsClientErr(err) || isLocalError(err)):
		return errNotCounted
	case err != nil:
		return errUpstreamFailed
	case resp.StatusCode >= 500:
		return errUpstreamFailed
	case isGRPCResponse(resp):
		// gRPC failures come as 200 with a grpc-status; these are the
		// server's, as 5xx are (RESOURCE_EXHAUSTED and the like are
		// answers).
		if grpcFailure(grpcStatus(resp)) {
			return errUpstreamFailed
		}
	}
	return nil
}

// grpcOutcomePending reports whether resp is a gRPC answer whose status is
// still to come, in the trailers.
func grpcOutcomePending(resp *http.Response) bool {
	return resp.StatusCode == http.StatusOK && isGRPCResponse(resp) && grpcStatus(resp) == ""
}

// grpcEnd calls end once, when the body ends or is closed, by which time
// the trailers (and the grpc-status in them) are known. Reads come from
// one goroutine; Close may come from another.
type grpcEnd struct {
	io.ReadCloser
	resp *http.Response
	once sync.Once
	end  func()
}

func (b *grpcEnd) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err == io.EOF {
		b.once.Do(b.end)
	}
	return n, err
}

func (b *grpcEnd) Close() error {
	err := b.ReadCloser.Close()
	b.once.Do(b.end)
	return err
}

// grpcFailure reports whether a grpc-status is the server's failure
// (UNAVAILABLE, INTERNAL, UNKNOWN, DATA_LOSS), as a 5xx is; the others are
// answers.
func grpcFailure(code string) bool {
	switch code {
	case "14", "13", "2", "15":
		return true
	}
	return false
}

func isLocalError(err error) bool {
	var le *forward.LocalError
	return errors.As(err, &le)
}

// stopCaller releases the caller's deadline, if the request carried one.
func stopCaller(cancel context.CancelFunc) {
	if cancel != nil {
		cancel()
	}
}

// deadlineAllows reports whether an attempt started after delay could still
// finish before ctx's deadline.
func deadlineAllows(ctx context.Context, delay time.Duration) bool {
	dl, ok := ctx.Deadline()
	return !ok || time.Until(dl) > delay
}

// endPerTry ends an attempt's per-try deadline, if it had one.
func endPerTry(perTry *deadlineCtx) {
	if perTry != nil {
		perTry.end()
	}
}

// finishBody ends the request when its response body is closed: the
// deadlines and the concurrency slots last as long as the response. For a
// stream it tells the request's deadline of every read, and marks a stream
// the chain cut (idle, or at the caller's deadline) as the client can
// see it: a gRPC answer ends with DEADLINE_EXCEEDED in its trailers, any
// other with an error, on which the forwarder aborts the body. One
// allocation holds all it needs.
type finishBody struct {
	io.ReadCloser
	once         sync.Once
	chain        *chain
	state        *serviceState
	maxInFlight  int64              // the service's limit when the request started
	ctx          *deadlineCtx       // the request's deadline
	attempt      *deadlineCtx       // the last attempt's per-try deadline; nil: none
	cancelCaller context.CancelFunc // the caller's grpc-timeout; nil: none
	resp         *http.Response
	service      string
	stream       bool // the answer is a stream, its deadline lifted
	cut          bool // the stream was cut, and told so
}

func (b *finishBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if b.stream {
		if n > 0 {
			b.ctx.touch()
		}
		if err != nil && err != io.EOF {
			err = b.cutStream(err)
		}
	}
	return n, err
}

// cutStream turns a read error that the chain caused, by ending a silent
// stream or one past the caller's deadline, into what the client is told.
// Other errors pass.
func (b *finishBody) cutStream(err error) error {
	var reason, detail string
	switch cause := context.Cause(b.ctx); cause {
	case errStreamIdle:
		reason = StreamCutIdle
		detail = "the upstream sent nothing for " + policy.FormatDuration(b.ctx.idleTime()) + " (streamIdleTimeout)"
	case errCallerDeadline:
		reason = StreamCutDeadline
		detail = "the caller's deadline (grpc-timeout) passed"
	default:
		return err
	}
	if !b.cut {
		b.cut = true
		b.chain.observer.StreamCut(b.service, reason)
		b.chain.log.Debug("stream cut", "service", b.service, "reason", reason, "detail", detail)
	}
	if isGRPCResponse(b.resp) {
		b.resp.Trailer = http.Header{"Grpc-Status": {"4"}, "Grpc-Message": {"stream cut by the sidecar: " + detail}}
		return io.EOF
	}
	return &StreamCutError{Service: b.service, Reason: reason, Detail: detail}
}

func (b *finishBody) Close() error {
	err := b.ReadCloser.Close()
	b.once.Do(b.finish)
	return err
}

func (b *finishBody) finish() {
	endPerTry(b.attempt)
	b.ctx.end()
	stopCaller(b.cancelCaller)
	b.chain.release(b.state, b.maxInFlight)
}

// Why the chain cut a stream (StreamCutError.Reason, Observer.StreamCut).
const (
	// StreamCutIdle: the upstream sent nothing for streamIdleTimeout.
	StreamCutIdle = "idle"
	// StreamCutDeadline: the caller's own deadline (grpc-timeout) passed.
	StreamCutDeadline = "deadline"
)

// StreamCutError ends the body of a stream the chain cut; the client sees
// the body aborted. gRPC answers are ended with DEADLINE_EXCEEDED instead.
type StreamCutError struct {
	Service, Reason, Detail string
}

func (e *StreamCutError) Error() string {
	return "stream to " + e.Service + " cut: " + e.Detail
}

// ServiceStatus is the resilience state of one service, for the admin API.
type ServiceStatus struct {
	Service  string `json:"service"`
	InFlight int64  `json:"inFlight"`
	Queued   int64  `json:"queued,omitempty"` // waiting for a slot (concurrency.maxQueued)
	// Limit is the service's concurrency limit in force:
	// concurrency.maxInFlight, or the adaptive limit now.
	Limit    int64           `json:"limit"`
	Adaptive *AdaptiveStatus `json:"adaptive,omitempty"` // nil: the limit is fixed
	Breaker  struct {
		State               string `json:"state"`
		Requests            uint32 `json:"requests"`
		Failures            uint32 `json:"failures"`
		ConsecutiveFailures uint32 `json:"consecutiveFailures"`
	} `json:"circuitBreaker"`
	RetryBudget struct {
		Requests int64 `json:"requests"`
		Retries  int64 `json:"retries"`
	} `json:"retryBudget"`
	Ejected []EjectedEndpoint `json:"ejected"`
	// Balancer is how the service's attempts were spread over its
	// endpoints; nil before its first attempt.
	Balancer *BalancerStatus `json:"balancer,omitempty"`
}

// EjectedEndpoint is an endpoint out of rotation.
type EjectedEndpoint struct {
	Addr      string    `json:"addr"`
	Until     time.Time `json:"until"`
	Ejections int       `json:"ejections"`
}

// Status reports the resilience state of every service called so far,
// sorted by name. It does not block the request path for long: each
// structure is locked only to copy it.
func (p *Proxy) Status() []ServiceStatus {
	now := time.Now()
	var out []ServiceStatus
	p.chain.states.states.Range(func(k, v any) bool {
		st := v.(*serviceState)
		var s ServiceStatus
		s.Service = k.(string)
		s.InFlight, s.Queued = st.limit.inFlight.Load(), st.limit.waiting()
		if cc := p.chain.policies.For(s.Service).Concurrency; cc.IsAdaptive() {
			s.Limit, s.Adaptive = st.adaptive.status(int64(cc.Floor()), int64(*cc.MaxInFlight))
		} else {
			s.Limit = int64(*cc.MaxInFlight)
		}
		br := st.breaker.Load()
		c := br.Counts()
		s.Breaker.State = br.State().String()
		s.Breaker.Requests, s.Breaker.Failures, s.Breaker.ConsecutiveFailures = c.Requests, c.TotalFailures, c.ConsecutiveFailures
		s.RetryBudget.Requests, s.RetryBudget.Retries = st.budget.usage(now)
		s.Ejected = st.outliers.ejectedList(now)
		if v, ok := p.chain.pickers.Load(s.Service); ok {
			s.Balancer = v.(*balancer).status(now)
		}
		out = append(out, s)
		return true
	})
	slices.SortFunc(out, func(a, b ServiceStatus) int { return strings.Compare(a.Service, b.Service) })
	return out
}

// grpcTimeout reads a gRPC client's deadline from its grpc-timeout header:
// at most 8 digits and a unit (H, M, S, m, u, n).
func grpcTimeout(h http.Header) (time.Duration, bool) {
	v := h["Grpc-Timeout"]
	if len(v) != 1 || len(v[0]) < 2 || len(v[0]) > 9 {
		return 0, false
	}
	n, err := strconv.ParseInt(v[0][:len(v[0])-1], 10, 64)
	if err != nil || n < 0 {
		return 0, false
	}
	var unit time.Duration
	switch v[0][len(v[0])-1] {
	case 'H':
		unit = time.Hour
	case 'M':
		unit = time.Minute
	case 'S':
		unit = time.Second
	case 'm':
		unit = time.Millisecond
	case 'u':
		unit = time.Microsecond
	case 'n':
		unit = time.Nanosecond
	}
	if unit == 0 {
		return 0, false
	}
	if n > int64(math.MaxInt64/unit) {
		return math.MaxInt64, true
	}
	return time.Duration(n) * unit, true
}
