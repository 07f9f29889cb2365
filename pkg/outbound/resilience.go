package outbound

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sony/gobreaker/v2"

	"github.com/sidecar-mesh/sidecar/pkg/policy"
	"github.com/sidecar-mesh/sidecar/pkg/proxyhttp"
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

// serviceState is what outlives a request for one service: its breaker and
// in-flight count. It lives in a registry keyed by service, not in the
// policy, so that it survives policy reloads.
type serviceState struct {
	inFlight atomic.Int64
	breaker  *gobreaker.TwoStepCircuitBreaker[struct{}]
	budget   budget
	outliers outliers
}

type stateRegistry struct {
	states sync.Map // service -> *serviceState
}

func (r *stateRegistry) get(service string, p *policy.Policy) *serviceState {
	if s, ok := r.states.Load(service); ok {
		return s.(*serviceState)
	}
	s, _ := r.states.LoadOrStore(service, &serviceState{breaker: newBreaker(service, p.CircuitBreaker)})
	return s.(*serviceState)
}

// newBreaker maps the policy's breaker onto sony/gobreaker, whose state
// machine is ours exactly: one mutex, lazy state moves, generations that
// drop late results, a rolling window in buckets, and a half-open state that
// admits MaxRequests probes.
func newBreaker(service string, cb *policy.CircuitBreaker) *gobreaker.TwoStepCircuitBreaker[struct{}] {
	window := cb.Window.D()
	consecutive, minRequests := uint32(*cb.ConsecutiveFailures), uint32(*cb.MinRequests)
	ratio := *cb.FailureRatio
	return gobreaker.NewTwoStepCircuitBreaker[struct{}](gobreaker.Settings{
		Name:         service,
		MaxRequests:  uint32(*cb.HalfOpenRequests),
		Interval:     window,
		BucketPeriod: window / 10,
		Timeout:      cb.OpenDuration.D(),
		ReadyToTrip: func(c gobreaker.Counts) bool {
			return c.ConsecutiveFailures >= consecutive ||
				(c.Requests >= minRequests && float64(c.TotalFailures) >= ratio*float64(c.Requests))
		},
		IsExcluded: func(err error) bool { return errors.Is(err, errNotCounted) },
	})
}

// Outcomes as the breaker sees them.
var (
	errUpstreamFailed = errors.New("upstream failed")
	errNotCounted     = errors.New("outcome not counted")
)

// breakerOutcome classifies an attempt: 5xx answers and transport failures
// count against the breaker; client cancellations and the sidecar's own
// refusals (no endpoints) count for nothing; any other answer (2xx-4xx) is
// a success.
func breakerOutcome(resp *http.Response, err error) error {
	var local *proxyhttp.LocalError
	switch {
	case err != nil && (errors.Is(err, context.Canceled) || proxyhttp.IsClientErr(err) || errors.As(err, &local)):
		return errNotCounted
	case err != nil:
		return errUpstreamFailed
	case resp.StatusCode >= 500:
		return errUpstreamFailed
	}
	return nil
}

// resilienceLayer applies the service's policy around the rest of the
// chain: concurrency limit, overall deadline, then the retry loop, each
// attempt under its per-try deadline and the circuit breaker.
type resilienceLayer struct {
	policies Policies
	states   *stateRegistry
	next     http.RoundTripper
}

var _ http.RoundTripper = (*resilienceLayer)(nil)

func (l *resilienceLayer) RoundTrip(req *http.Request) (*http.Response, error) {
	service := req.URL.Host
	p := l.policies.For(service)
	st := l.states.get(service, p)

	// Concurrency: over the limit is refused at once; nothing queues.
	if n := st.inFlight.Add(1); n > int64(*p.Concurrency.MaxInFlight) {
		st.inFlight.Add(-1)
		proxyhttp.CloseBody(req)
		return nil, &proxyhttp.LocalError{Status: http.StatusServiceUnavailable, Reason: proxyhttp.ReasonOverloaded,
			Service: service, Detail: "concurrency limit reached (concurrency.maxInFlight)"}
	}
	release := func() { st.inFlight.Add(-1) }

	// Overall deadline over every attempt and backoff; the caller's own
	// deadline, if sooner, still wins.
	ctx, cancel := context.WithTimeout(req.Context(), p.Timeout.D())
	resp, endAttempt, err := l.attempts(ctx, req, service, p, st)
	if err != nil {
		cancel()
		release()
		if errors.Is(err, context.DeadlineExceeded) && req.Context().Err() == nil && !isPerTryTimeout(err) {
			return nil, &proxyhttp.LocalError{Status: http.StatusGatewayTimeout, Reason: proxyhttp.ReasonUpstreamTimeout,
				Service: service, Detail: "no response within the policy timeout of " + p.Timeout.String()}
		}
		return nil, err
	}
	finish := func() { endAttempt(); cancel(); release() }
	if resp.StatusCode == http.StatusSwitchingProtocols {
		// An upgraded connection lives on its own: no deadline, no slot.
		finish()
		return resp, nil
	}
	resp.Body = &finishBody{ReadCloser: resp.Body, finish: finish}
	return resp, nil
}

// attempts runs the retry loop: retries only on the policy's conditions,
// for idempotent requests (or any request on a connect failure), with a
// replayable body, within the retry budget, preferring another endpoint,
// and never starting an attempt the overall deadline can't cover. With a
// response it returns what ends the last attempt's per-try deadline, for
// the caller to run once the response is done.
func (l *resilienceLayer) attempts(ctx context.Context, req *http.Request, service string, p *policy.Policy, st *serviceState) (*http.Response, context.CancelFunc, error) {
	r := p.Retry
	st.budget.request(time.Now())
	info := &attemptInfo{}
	ctx = context.WithValue(ctx, attemptKey{}, info)
	cur := req
	for attempt := 1; ; attempt++ {
		done, berr := st.breaker.Allow()
		if berr != nil {
			proxyhttp.CloseBody(cur)
			return nil, nil, &proxyhttp.LocalError{Status: http.StatusServiceUnavailable, Reason: proxyhttp.ReasonCircuitOpen,
				Service: service, Detail: "circuit breaker " + st.breaker.State().String()}
		}
		actx, acancel := ctx, context.CancelFunc(func() {})
		if pt := r.PerTryTimeout.D(); pt > 0 {
			actx, acancel = context.WithTimeoutCause(ctx, pt, errPerTryTimeout)
		}
		resp, err := l.next.RoundTrip(cur.WithContext(actx))
		if err != nil && ctx.Err() == nil && errors.Is(context.Cause(actx), errPerTryTimeout) {
			err = fmt.Errorf("%w: %w", errPerTryTimeout, context.DeadlineExceeded)
		}
		done(breakerOutcome(resp, err))

		reason := ""
		if attempt < *r.Attempts && ctx.Err() == nil {
			reason = retryReason(r, req, resp, err)
		}
		var (
			delay time.Duration
			next  *http.Request
			ok    bool
		)
		if reason != "" {
			delay = backoffDelay(r.Backoff, attempt, resp)
			if deadlineAllows(ctx, delay) {
				next, ok = proxyhttp.Rewound(req) // only bodies held in memory replay
			}
		}
		if !ok || !st.budget.allowRetry(time.Now(), *r.Budget.Ratio, *r.Budget.MinPerSecond) {
			if next != nil && next != req {
				proxyhttp.CloseBody(next)
			}
			if err != nil {
				acancel()
				return nil, nil, err
			}
			return resp, acancel, nil
		}
		if resp != nil {
			discard(resp)
		}
		acancel()
		if !sleep(ctx, delay) {
			proxyhttp.CloseBody(next)
			return nil, nil, ctx.Err()
		}
		info.avoid = info.picked
		cur = next
	}
}

// deadlineAllows reports whether an attempt started after delay could still
// finish before ctx's deadline.
func deadlineAllows(ctx context.Context, delay time.Duration) bool {
	dl, ok := ctx.Deadline()
	return !ok || time.Until(dl) > delay
}

// finishBody runs finish once, when the body is closed: the request's
// deadline and its concurrency slot last as long as its response.
type finishBody struct {
	io.ReadCloser
	once   sync.Once
	finish func()
}

func (b *finishBody) Close() error {
	err := b.ReadCloser.Close()
	b.once.Do(b.finish)
	return err
}

// ServiceStatus is the resilience state of one service, for the admin API.
type ServiceStatus struct {
	Service  string `json:"service"`
	InFlight int64  `json:"inFlight"`
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
	p.states.states.Range(func(k, v any) bool {
		st := v.(*serviceState)
		var s ServiceStatus
		s.Service = k.(string)
		s.InFlight = st.inFlight.Load()
		c := st.breaker.Counts()
		s.Breaker.State = st.breaker.State().String()
		s.Breaker.Requests, s.Breaker.Failures, s.Breaker.ConsecutiveFailures = c.Requests, c.TotalFailures, c.ConsecutiveFailures
		s.RetryBudget.Requests, s.RetryBudget.Retries = st.budget.usage(now)
		s.Ejected = st.outliers.ejectedList(now)
		out = append(out, s)
		return true
	})
	slices.SortFunc(out, func(a, b ServiceStatus) int { return strings.Compare(a.Service, b.Service) })
	return out
}
