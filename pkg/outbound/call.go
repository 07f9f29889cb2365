package outbound

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sony/gobreaker/v2"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"

	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/downstream"
	"github.com/sidecar-mesh/sidecar/pkg/forward"
	"github.com/sidecar-mesh/sidecar/pkg/metrics"
	"github.com/sidecar-mesh/sidecar/pkg/policy"
	"github.com/sidecar-mesh/sidecar/pkg/requestlog"
	"github.com/sidecar-mesh/sidecar/pkg/tracing"
	"github.com/sidecar-mesh/sidecar/pkg/upstream"
)

// call is one request from the app to a service, as route made it: the
// service it goes to and what the chain needs of it, looked up once when
// the request was routed: the endpoint set discovery had then, the policy
// in force then, and the service's state (breaker, retry budget,
// concurrency limiter, outlier detection). The chain takes it explicitly:
// nothing of it travels in the request's URL or context, and every error
// of the call is answered for its service.
type call struct {
	chain   *chain
	service string
	set     *discovery.EndpointSet
	policy  *policy.Policy
	state   *serviceState

	// The attempt under way: what the balancer knows of its endpoint, and
	// when it was picked (for the endpoint's latency).
	picked   *endpointStats
	pickedAt time.Time
	// Its number (1 for the first try), why it is a retry ("" for the
	// first), the backoff waited before it, and the endpoint of the
	// attempt before it, which the picker avoids.
	attempt int
	retryOf string
	backoff time.Duration
	avoid   string

	// What the recorder may be told of the attempts (record.go): the
	// first one's note in place, the retries' in a list made only when
	// there are retries, and why no attempt followed the last.
	first   attemptNote
	retries []attemptNote
	stop    string
}

var _ http.RoundTripper = (*call)(nil)

// RoundTrip sends the request the Forwarder prepared through the chain.
func (c *call) RoundTrip(req *http.Request) (*http.Response, error) { return c.chain.do(c, req) }

// chain is the path every call to a service takes; do is the whole of it,
// top to bottom. One per Proxy; safe for concurrent use.
//
// Where new behaviour plugs in: hedging is a second attempt started from
// attempts while the first is out; a new load-balancing policy is a case of balancer.pick
// behind chain.pick; mTLS origination is the sender's (the transport's
// dial), which is told the endpoint of each attempt.
type chain struct {
	policies Policies
	states   *stateRegistry
	observer Observer
	log      *slog.Logger
	tracer   trace.Tracer // nil: no spans
	prop     propagation.TextMapPropagator
	metrics  *metrics.Requests    // nil: no request metrics
	recorder *requestlog.Recorder // nil: no failure recorder, tap or access log
	// send sends one attempt to the endpoint in its URL host, connecting
	// within connectTimeout: the pooled transport.
	send func(req *http.Request, connectTimeout time.Duration) (*http.Response, error)

	// isOwn reports whether an endpoint is one of the sidecar's own
	// listeners: such an endpoint is never called. nil: none is.
	isOwn func(netip.AddrPort) bool
	// pickers holds a *balancer per service, rebuilt whenever discovery
	// publishes a new set (compared by pointer: sets are immutable) or
	// the policy's loadBalancer changes.
	pickers sync.Map
	// refusedLogged holds the endpoints already logged as refused.
	refusedLogged sync.Map

	// inFlight counts requests to every service; over maxInFlight a request
	// is refused.
	inFlight    atomic.Int64
	maxInFlight int64
}

// open makes the call of a request routed to service, whose endpoints
// discovery has as set.
func (ch *chain) open(service string, set *discovery.EndpointSet) *call {
	p := ch.policies.For(service)
	return &call{chain: ch, service: service, set: set, policy: p, state: ch.states.get(service, p)}
}

// do runs one call, in this order:
//
//	the request's span (under the caller's trace context) and metrics
//	-> concurrency limits: the sidecar's, then the service's (its line)
//	-> the overall deadline (lifted for a stream once its headers come:
//	   streamIdleTimeout then)
//	-> the circuit breaker: asked once, told the outcome after retries
//	-> the retry loop; each attempt under its per-try deadline:
//	   pick (round robin over non-ejected endpoints, not the last one)
//	   -> the attempt's span -> send -> its outcome to outlier detection
//	-> the local-reply mapper: a failure becomes the LocalError the app is
//	   answered with, for the call's service
//	-> the recorder, told of a failed call (and of every call while
//	   someone taps or the access log writes them all)
func (ch *chain) do(c *call, req *http.Request) (*http.Response, error) {
	start := time.Now()
	series := ch.metrics.For(metrics.Outbound, c.service, req.Method)
	sent, span := ch.startRequest(c, req)
	resp, err := ch.limit(c, sent)
	if err != nil {
		// The client's own failure, if its body broke, is what it is
		// answered for (downstream.Cause).
		e := forward.LocalReply(c.service, downstream.Cause(req, err))
		endRequest(span, series, start, e.Status, e.Reason, e.Error())
		if ch.recorder != nil {
			ch.record(c, req, span, start, nil, e)
		}
		return nil, e
	}
	// A gRPC answer's outcome is known when its trailers come: it is
	// recorded when its body is closed.
	recordAtEnd := false
	if ch.recorder != nil {
		grpc := isGRPCResponse(resp)
		if grpc && resp.StatusCode == http.StatusOK && grpcStatus(resp) == "" {
			recordAtEnd = true
		} else if grpc || resp.StatusCode >= 500 || ch.recorder.Wants() {
			ch.record(c, req, span, start, resp, nil)
		}
	}
	if series == nil && span == nil && !recordAtEnd {
		return resp, nil
	}
	if resp.StatusCode == http.StatusSwitchingProtocols {
		endRequest(span, series, start, resp.StatusCode, "", "")
		return resp, nil
	}
	tb := &telemetryBody{ReadCloser: resp.Body, span: span, series: series, start: start, resp: resp}
	if recordAtEnd {
		tb.chain, tb.call, tb.req = ch, c, req
	}
	resp.Body = tb
	return resp, nil
}

// limit applies the concurrency limits and the overall deadline around
// the call's attempts. The caller's own deadline (a gRPC client's
// grpc-timeout, or its disconnect) bounds everything, a stream too; the
// policy's timeout bounds the wait for a slot, every attempt and backoff
// and, unless the answer is a stream, its body. The sooner wins.
func (ch *chain) limit(c *call, req *http.Request) (*http.Response, error) {
	p, st := c.policy, c.state
	caller, cancelCaller := req.Context(), context.CancelFunc(nil)
	timeout := p.Timeout.D()
	if d, ok := grpcTimeout(req.Header); ok {
		caller, cancelCaller = context.WithTimeoutCause(caller, d, errCallerDeadline)
		timeout = min(timeout, d)
	}

	// Over the sidecar's limit a request is refused at once; over the
	// service's it waits in the service's bounded line
	// (concurrency.maxQueued) for at most concurrency.queueTimeout, else it
	// is refused; over an adaptive limit it is refused at once, told when
	// to come back (adaptive.go says why). Memory stays bounded however
	// hard the app pushes.
	if n := ch.inFlight.Add(1); n > ch.maxInFlight {
		ch.inFlight.Add(-1)
		stopCaller(cancelCaller)
		return nil, ch.shed(c, req, "the sidecar's limit on outbound requests in flight (limits.outboundMaxInFlight)")
	}
	cc := p.Concurrency
	maxInFlight, maxQueued := st.concurrency(cc) // with concurrency.adaptive, no line
	ok, wait := st.limit.acquire(caller, maxInFlight, maxQueued, min(cc.QueueTimeout.D(), timeout))
	if !ok {
		ch.inFlight.Add(-1)
		stopCaller(cancelCaller)
		if cc.IsAdaptive() {
			return nil, ch.shedAdaptive(c, req, maxInFlight)
		}
		if *cc.MaxQueued > 0 {
			return nil, ch.shed(c, req, "concurrency limit of the service reached and no slot within concurrency.queueTimeout or room in its line (concurrency.maxQueued)")
		}
		return nil, ch.shed(c, req, "concurrency limit of the service reached (concurrency.maxInFlight)")
	}
	ctx := newDeadlineCtx(caller, p.Timeout.D()-wait, errTimeout)
	resp, attempt, err := ch.attempts(c, ctx, req)
	fb := &finishBody{chain: ch, state: st, maxInFlight: maxInFlight, ctx: ctx, attempt: attempt, cancelCaller: cancelCaller}
	if err != nil {
		// Told by the context, not the error: a dial cut short by the
		// deadline reports only that it was canceled.
		expired := ctx.Err() == context.DeadlineExceeded
		fb.finish()
		if expired && req.Context().Err() == nil && !isPerTryTimeout(err) {
			return nil, forward.Refuse(forward.ReasonUpstreamTimeout, c.service, "no response within the timeout of "+timeout.String())
		}
		return nil, err
	}
	if resp.StatusCode == http.StatusSwitchingProtocols {
		// An upgraded connection lives on its own: no deadline, no slot.
		fb.finish()
		return resp, nil
	}
	fb.ReadCloser, fb.resp, fb.service = resp.Body, resp, c.service
	if forward.IsStream(resp) {
		// A stream runs as long as it keeps sending: the policy's
		// deadlines, which bounded the wait for its headers, give way to
		// streamIdleTimeout (the caller's own deadline stays).
		fb.stream = ctx.lift(p.StreamIdleTimeout.D()) && (attempt == nil || attempt.lift(0))
	}
	resp.Body = fb
	return resp, nil
}

// shed refuses a call over a concurrency limit.
func (ch *chain) shed(c *call, req *http.Request, detail string) error {
	upstream.CloseBody(req)
	ch.observer.Shed(c.service, forward.ReasonOverloaded)
	return forward.Refuse(forward.ReasonOverloaded, c.service, detail)
}

// release gives back a request's concurrency slots, the service's to the
// first request waiting for one.
func (ch *chain) release(st *serviceState, maxInFlight int64) {
	st.limit.release(maxInFlight)
	ch.inFlight.Add(-1)
}

// attempts asks the breaker, then runs the retry loop: retries only on the
// policy's conditions, for idempotent requests (or any request on a
// connect failure), with a replayable body, within the retry budget,
// preferring another endpoint, never into an open breaker, and never
// starting an attempt the overall deadline can't cover. With a response it
// returns the last attempt's per-try deadline (nil without one), for the
// caller to lift for a stream and to end once the response is done.
func (ch *chain) attempts(c *call, ctx *deadlineCtx, req *http.Request) (*http.Response, *deadlineCtx, error) {
	r, st := c.policy.Retry, c.state
	st.budget.request(time.Now())
	br := st.breaker.Load()
	cur := req
	grpc := upstream.IsGRPC(req)
	// The breaker counts requests, by their outcome after retries: a
	// request it lets through is one call of done, whatever its attempts.
	// An instance that fails is outlier detection's to eject, and a
	// request that fails everywhere one failure.
	done, berr := br.Allow()
	if berr != nil {
		c.stop = requestlog.StopBreakerOpen
		upstream.CloseBody(cur)
		ch.observer.Shed(c.service, forward.ReasonCircuitOpen)
		return nil, nil, forward.Refuse(forward.ReasonCircuitOpen, c.service, "circuit breaker "+br.State().String())
	}
	for attempt := 1; ; attempt++ {
		var actx context.Context = ctx
		var perTry *deadlineCtx
		if pt := r.PerTryTimeout.D(); pt > 0 {
			perTry = newDeadlineCtx(ctx, pt, errPerTryTimeout)
			actx = perTry
		}
		c.attempt = attempt
		areq := cur.WithContext(actx)
		if req.ProtoMajor == 2 {
			// Each HTTP/2 attempt writes its own header map: the HTTP/2
			// transport may still be encoding an abandoned attempt's
			// headers when the next one sets its trace headers.
			areq.Header = cur.Header.Clone()
		}
		if grpc {
			// The upstream learns the time left of the caller's own
			// deadline, which bounds a stream too; not the policy's, which
			// bound only the wait for a stream's headers: told them, the
			// server would end its stream there.
			if dl, ok := ctx.callerDeadline(); ok {
				areq.Header.Set("Grpc-Timeout", encodeGRPCTimeout(time.Until(dl)))
			}
		}
		resp, picked, err := ch.attempt(c, areq)
		if err != nil && ctx.Err() == nil && perTryExpired(actx, r.PerTryTimeout.D() > 0, time.Now()) {
			err = fmt.Errorf("%w: %w", errPerTryTimeout, context.DeadlineExceeded)
		}
		if grpc && err == nil && attempt < *r.Attempts && ctx.Err() == nil {
			resp = settleGRPC(r, req, resp)
		}

		// reason is why the outcome is tried again; cause why it is not,
		// should it be a failure (for the recorder).
		reason, cause := "", ""
		var bs gobreaker.State
		judged := false
		switch {
		case attempt >= *r.Attempts:
			cause = requestlog.StopAttemptsUsedUp
		case ctx.Err() != nil:
			cause = requestlog.StopDeadline
		default:
			bs, judged = br.State(), true
			if bs == gobreaker.StateOpen {
				cause = requestlog.StopBreakerOpen
			} else if reason = retryReason(r, req, resp, err); reason == "" {
				cause = requestlog.StopNotRetryable
			}
		}
		if picked != "" {
			n := c.note(attempt)
			n.err, n.breaker, n.judged = err, bs, judged
		} else {
			cause = "" // no endpoint to try: the local error says why
		}
		var (
			delay time.Duration
			next  *http.Request
			ok    bool
		)
		if reason != "" {
			delay = backoffDelay(r.Backoff, attempt, resp)
			cause = requestlog.StopDeadline
			if deadlineAllows(ctx, delay) {
				next, ok = upstream.Rewound(req) // only bodies held in memory replay
				cause = requestlog.StopBodyNotReplayable
			}
		}
		if ok && !st.budget.allowRetry(time.Now(), *r.Budget.Ratio, *r.Budget.MinPerSecond) {
			ch.observer.RetryBudgetExhausted(c.service)
			ok, cause = false, requestlog.StopBudgetExhausted
		}
		if !ok {
			c.stop = cause
			if next != nil && next != req {
				upstream.CloseBody(next)
			}
			if err != nil {
				done(breakerOutcome(nil, err))
				endPerTry(perTry)
				return nil, nil, err
			}
			if grpcOutcomePending(resp) {
				// A gRPC answer whose status was not settled above is
				// judged by its trailers, when its body ends.
				resp.Body = &grpcEnd{ReadCloser: resp.Body, resp: resp, end: func() { done(breakerOutcome(resp, nil)) }}
			} else {
				done(breakerOutcome(resp, nil))
			}
			return resp, perTry, nil
		}
		if resp != nil {
			discard(resp)
		}
		endPerTry(perTry)
		ch.observer.Retried(c.service, reason)
		if !sleep(ctx, delay) {
			c.stop = requestlog.StopDeadline
			upstream.CloseBody(next)
			err := ctx.Err()
			done(breakerOutcome(nil, err))
			return nil, nil, err
		}
		c.avoid, c.retryOf, c.backoff = picked, reason, delay
		cur = next
	}
}

// attempt sends one attempt of the call to an endpoint the picker chooses
// and feeds its outcome to outlier detection: at once, or, for a gRPC
// answer whose status comes in its trailers, when its body ends. It
// returns the endpoint picked ("" when none could be).
func (ch *chain) attempt(c *call, req *http.Request) (*http.Response, string, error) {
	start := time.Now()
	ep, lerr := ch.pick(c, start)
	if lerr != nil {
		upstream.CloseBody(req)
		return nil, "", lerr
	}
	ch.observer.Attempted(c.service)
	var span trace.Span
	if ch.tracer != nil {
		var ctx context.Context
		ctx, span = ch.startAttempt(c, req, ep.Addr)
		req = req.WithContext(ctx)
		// The upstream's spans hang under this attempt's.
		ch.prop.Inject(ctx, tracing.HeaderCarrier(req.Header))
	}
	out := forward.CopyRequest(req)
	out.URL.Host = ep.Addr
	resp, err := ch.send(out, c.policy.ConnectTimeout.D())
	ch.sampleLatency(c, req, start, resp, err)
	n := c.note(c.attempt)
	n.endpoint, n.took, n.resp = ep.Addr, time.Since(start), resp
	n.retryOf, n.backoff = c.retryOf, c.backoff
	end := attemptEnd{chain: ch, span: span, call: c, endpoint: ep.Addr}
	if err == nil && grpcOutcomePending(resp) {
		later := end
		resp.Body = &grpcEnd{ReadCloser: resp.Body, resp: resp, end: func() { later.record(resp, nil) }}
		return resp, ep.Addr, nil
	}
	end.record(resp, err)
	return resp, ep.Addr, err
}

// pick chooses the endpoint of an attempt: round robin over the call's
// endpoint set, less the sidecar's own listeners and the ejected
// endpoints, not the endpoint of the attempt before when there is
// another. It never blocks and never does I/O.
func (ch *chain) pick(c *call, now time.Time) (discovery.Endpoint, *forward.LocalError) {
	if len(c.set.Endpoints) == 0 {
		return discovery.Endpoint{}, forward.Refuse(forward.ReasonNoHealthyEndpoints, c.service,
			"the service is known but has no healthy endpoint")
	}
	b := ch.balancer(c)
	if len(b.eps) == 0 {
		return discovery.Endpoint{}, forward.Refuse(forward.ReasonLoop, c.service,
			"every endpoint discovery has for the service is one of the sidecar's own listeners")
	}
	i := b.pick(&c.state.outliers, c.avoid, now)
	if b.learns() {
		c.picked, c.pickedAt = b.stats[i], now
	}
	return b.eps[i], nil
}

// attemptEnd is what judging an attempt needs: its span, its call and the
// endpoint it went to.
type attemptEnd struct {
	chain    *chain
	span     trace.Span
	call     *call
	endpoint string
}

// record ends the attempt's span and feeds its outcome to outlier
// detection.
func (a attemptEnd) record(resp *http.Response, err error) {
	if a.span != nil {
		endAttempt(a.span, resp, err)
	}
	c := a.call
	if s := c.picked; s != nil {
		now := time.Now()
		s.inFlight.Add(-1)
		s.observe(now.Sub(c.pickedAt), now)
		c.picked = nil
	}
	if failed := attemptFailed(resp, err); failed || err == nil {
		od := c.policy.OutlierDetection
		if c.state.outliers.record(a.endpoint, failed, c.set, od, time.Now()) {
			a.chain.log.Warn("endpoint ejected", "service", c.service, "endpoint", a.endpoint,
				"for", od.EjectionTime.String())
			a.chain.observer.EndpointEjected(c.service)
		}
	}
}
