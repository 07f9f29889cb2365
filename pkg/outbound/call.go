package outbound

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/netip"
	"strconv"
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

	// last is the endpoint of the last attempt judged, which a retry
	// avoids (a slice of it, so that avoiding costs no allocation).
	last [1]string
	// body, for a request whose body streams on after the call starts,
	// says when it ended: the policy's deadlines count from there.
	body *bodyEnd

	// What the recorder may be told of the attempts (record.go): the
	// first one's note in place, the retries' in a list made only when
	// there are retries, and why no attempt followed the last.
	first   attemptNote
	retries []attemptNote
	stop    string
	judged  int // the number of the attempt judged last
}

var _ http.RoundTripper = (*call)(nil)

// RoundTrip sends the request the Forwarder prepared through the chain.
func (c *call) RoundTrip(req *http.Request) (*http.Response, error) { return c.chain.do(c, req) }

// chain is the path every call to a service takes; do is the whole of it,
// top to bottom. One per Proxy; safe for concurrent use.
//
// Where new behaviour plugs in: a new load-balancing policy is a case of
// balancer.pick behind chain.pick; mTLS origination is the sender's (the
// transport's dial), which is told the endpoint of each attempt.
type chain struct {
	policies Policies
	states   *stateRegistry
	observer Observer
	log      *slog.Logger
	tracer   trace.Tracer // nil: no spans
	prop     propagation.TextMapPropagator
	// propFields are prop's headers (tracing.Fields), replaced on every
	// attempt.
	propFields []string
	metrics    *metrics.Requests    // nil: no request metrics
	recorder   *requestlog.Recorder // nil: no failure recorder, tap or access log
	// send sends one attempt to the endpoint in its URL host, connecting
	// within connectTimeout: the pooled transport.
	send func(req *http.Request, connectTimeout time.Duration) (*http.Response, error)
	// meshSend sends one attempt to an endpoint of the mesh over mutual
	// TLS, as an instance of the service must answer it; nil outside the
	// mesh.
	meshSend func(req *http.Request, service string, connectTimeout time.Duration) (*http.Response, error)
	// rand draws the chain's random choices; nil: the global source.
	rand *rand.Rand
	// modelled: send is Config.Send's (simulation), not the transport:
	// the engine's loops do not drive it.
	modelled bool

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
		if upstream.IsGRPC(req) && e.Reason != forward.ReasonClientClosed {
			// A gRPC caller is answered a grpc-status for it.
			series.GRPC(strconv.Itoa(forward.GRPCCode(e.Status)))
		}
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
	ctx := newDeadlineCtxOnEnd(caller, p.Timeout.D()-wait, p.StreamIdleTimeout.D(), errTimeout, c.body)
	resp, attempt, err := ch.attempts(c, ctx, req)
	fb := &finishBody{chain: ch, state: st, maxInFlight: maxInFlight, ctx: ctx, attempt: attempt, cancelCaller: cancelCaller}
	if err != nil {
		// Told by the context, not the error: a dial cut short by the
		// deadline reports only that it was canceled.
		expired := ctx.Err() == context.DeadlineExceeded
		fb.finish()
		if expired && req.Context().Err() == nil && !isPerTryTimeout(err) {
			return nil, timeoutRefusal(c.service, timeout)
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

// timeoutRefusal is the local error of a call to service that got no
// answer within timeout.
func timeoutRefusal(service string, timeout time.Duration) *forward.LocalError {
	return forward.Refuse(forward.ReasonUpstreamTimeout, service, "no response within the timeout of "+timeout.String())
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

// try is one attempt of a call: its number (1 for the first), why it was
// sent (the retry.on condition of a retry, Hedge for a hedge, "" for the
// first), the backoff waited before it, the endpoints it avoids, and once
// picked its endpoint and what the balancer knows of it. Each attempt has
// its own, so that hedges can run side by side.
type try struct {
	n       int
	retryOf string
	backoff time.Duration
	avoid   []string

	endpoint string
	mesh     bool           // the endpoint is the mesh's: mutual TLS
	picked   *endpointStats // nil unless the balancer learns from outcomes
	pickedAt time.Time
}

// tried is an attempt's outcome: its answer or error, under its per-try
// deadline (nil without one), and how long it took.
type tried struct {
	try
	resp   *http.Response
	err    error
	perTry *deadlineCtx
	took   time.Duration
	lost   bool // cancelled: another attempt's answer won
}

// attempts asks the breaker, then runs the retry loop: retries only on the
// policy's conditions, for idempotent requests (or any request on a
// connect failure), with a replayable body, within the retry budget,
// preferring another endpoint, never into an open breaker, and never
// starting an attempt the overall deadline can't cover. An attempt of a
// request that can be hedged races hedges (hedge.go). With a response it
// returns the winning attempt's per-try deadline (nil without one), for
// the caller to lift for a stream and to end once the response is done.
func (ch *chain) attempts(c *call, ctx *deadlineCtx, req *http.Request) (*http.Response, *deadlineCtx, error) {
	r, st := c.policy.Retry, c.state
	st.budget.request(time.Now())
	br := st.breaker.Load()
	cur := req
	hedging := ch.hedgeable(c, req)
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
	next := try{n: 1}
	for {
		var t tried
		if hedging && next.n < *r.Attempts {
			t = ch.race(c, ctx, req, cur, next)
		} else {
			t = ch.attempt(c, ctx, req, cur, next, nil)
		}
		resp, err := t.resp, t.err
		// The attempts sent so far: a race may have sent hedges.
		attempt := max(t.n, c.noted())

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
		if t.endpoint != "" {
			n := c.note(t.n)
			n.err, n.breaker, n.judged = err, bs, judged
			c.judged = t.n
		} else {
			cause = "" // no endpoint to try: the local error says why
		}
		var (
			delay time.Duration
			again *http.Request
			ok    bool
		)
		if reason != "" {
			delay = backoffDelay(r.Backoff, attempt, resp, ch.rand)
			cause = requestlog.StopDeadline
			if deadlineAllows(ctx, delay) {
				again, ok = upstream.Rewound(req) // only bodies held in memory replay
				cause = requestlog.StopBodyNotReplayable
			}
		}
		if ok && !st.budget.allowRetry(time.Now(), *r.Budget.Ratio, *r.Budget.MinPerSecond) {
			ch.observer.RetryBudgetExhausted(c.service)
			ok, cause = false, requestlog.StopBudgetExhausted
		}
		if !ok {
			c.stop = cause
			if again != nil && again != req {
				upstream.CloseBody(again)
			}
			if err != nil {
				done(breakerOutcome(nil, err))
				endPerTry(t.perTry)
				return nil, nil, err
			}
			if grpcOutcomePending(resp) {
				// A gRPC answer whose status was not settled above is
				// judged by its trailers, when its body ends.
				resp.Body = &grpcEnd{ReadCloser: resp.Body, resp: resp, end: func() { done(breakerOutcome(resp, nil)) }}
			} else {
				done(breakerOutcome(resp, nil))
			}
			return resp, t.perTry, nil
		}
		if resp != nil {
			discard(resp)
		}
		endPerTry(t.perTry)
		ch.observer.Retried(c.service, reason)
		if !sleep(ctx, delay) {
			c.stop = requestlog.StopDeadline
			upstream.CloseBody(again)
			err := ctx.Err()
			done(breakerOutcome(nil, err))
			return nil, nil, err
		}
		c.last[0] = t.endpoint
		next = try{n: attempt + 1, retryOf: reason, backoff: delay, avoid: c.last[:]}
		cur = again
	}
}

// attempt sends one attempt of the call, as t says, with cur (req, or a
// copy of it whose body reads from the start again) under its per-try
// deadline, to the endpoint t names or else one the picker chooses, and
// feeds its outcome to outlier detection: at once, or, for a gRPC answer
// whose status comes in its trailers, when its body ends. It notes the
// attempt in the call, unless it runs in a race (race is the context the
// race cancels it by, with errHedgeLost), which notes its attempts itself.
func (ch *chain) attempt(c *call, ctx *deadlineCtx, req, cur *http.Request, t try, race context.Context) tried {
	start := time.Now()
	if t.endpoint == "" {
		if lerr := ch.pick(c, &t, start); lerr != nil {
			upstream.CloseBody(cur)
			return tried{try: t, err: lerr}
		}
	}
	r := c.policy.Retry
	var actx context.Context = ctx
	if race != nil {
		actx = race
	}
	var perTry *deadlineCtx
	if pt := r.PerTryTimeout.D(); pt > 0 {
		perTry = newDeadlineCtxOnEnd(actx, pt, c.policy.StreamIdleTimeout.D(), errPerTryTimeout, c.body)
		actx = perTry
	}
	var span trace.Span
	sctx := actx
	if ch.tracer != nil {
		sctx, span = ch.startAttempt(c, &t, actx, cur)
	}
	// The attempt's request: one copy, with the attempt's context and a
	// URL of its own (the endpoint goes in its host).
	out := cur.WithContext(sctx)
	u := *out.URL
	u.Host = t.endpoint
	out.URL = &u
	if req.ProtoMajor == 2 || race != nil {
		// Each HTTP/2 attempt writes its own header map: the HTTP/2
		// transport may still be encoding an abandoned attempt's
		// headers when the next one sets its trace headers. So does each
		// of a race's attempts, which run side by side.
		out.Header = cur.Header.Clone()
	}
	if upstream.IsGRPC(req) {
		// The upstream learns the time left of the caller's own
		// deadline, which bounds a stream too; not the policy's, which
		// bound only the wait for a stream's headers: told them, the
		// server would end its stream there.
		if dl, ok := ctx.callerDeadline(); ok {
			out.Header.Set("Grpc-Timeout", encodeGRPCTimeout(time.Until(dl)))
		}
	}
	ch.observer.Attempted(c.service)
	if span != nil {
		// The upstream's spans hang under this attempt's.
		tracing.Replace(ch.prop, ch.propFields, sctx, out.Header)
	}
	var resp *http.Response
	var err error
	if t.mesh && ch.meshSend != nil {
		resp, err = ch.meshSend(out, c.service, c.policy.ConnectTimeout.D())
	} else {
		resp, err = ch.send(out, c.policy.ConnectTimeout.D())
	}
	ch.sampleLatency(c, actx, start, resp, err)
	switch {
	case err == nil || ctx.Err() != nil:
	case race != nil && context.Cause(race) == errHedgeLost:
		err = errHedgeLost
	case perTryExpired(actx, r.PerTryTimeout.D() > 0, time.Now()):
		err = fmt.Errorf("%w: %w", errPerTryTimeout, context.DeadlineExceeded)
	}
	res := tried{try: t, resp: resp, err: err, perTry: perTry, took: time.Since(start)}
	end := attemptEnd{chain: ch, span: span, call: c, try: t}
	if err == nil && grpcOutcomePending(resp) {
		later := end // only this path puts the judge on the heap
		resp.Body = &grpcEnd{ReadCloser: resp.Body, resp: resp, end: func() { later.record(resp, nil) }}
	} else {
		end.record(resp, err)
	}
	if err == nil && upstream.IsGRPC(req) && t.n < *r.Attempts && ctx.Err() == nil {
		dl, ok := actx.Deadline()
		if res.resp, res.err = settleGRPC(r, req, resp, dl, ok); res.err != nil {
			res.took = time.Since(start)
		}
	}
	if race == nil {
		c.noteTried(&res)
	}
	return res
}

// noteTried notes an attempt's outcome in the call, for the recorder.
func (c *call) noteTried(t *tried) {
	if t.endpoint == "" {
		return
	}
	n := c.note(t.n)
	n.endpoint, n.took, n.resp, n.err, n.lost = t.endpoint, t.took, t.resp, t.err, t.lost
	n.retryOf, n.backoff = t.retryOf, t.backoff
}

// pick chooses the endpoint of an attempt: by the service's balancer over
// the call's endpoint set, less the sidecar's own listeners and the
// ejected endpoints, not one the attempt avoids when there is another. It
// never blocks and never does I/O.
func (ch *chain) pick(c *call, t *try, now time.Time) *forward.LocalError {
	if len(c.set.Endpoints) == 0 {
		return forward.Refuse(forward.ReasonNoHealthyEndpoints, c.service,
			"the service is known but has no healthy endpoint")
	}
	b := ch.balancer(c)
	if len(b.eps) == 0 {
		return forward.Refuse(forward.ReasonLoop, c.service,
			"every endpoint discovery has for the service is one of the sidecar's own listeners")
	}
	i := b.pick(&c.state.outliers, t.avoid, now)
	if b.learns() {
		t.picked, t.pickedAt = b.stats[i], now
	}
	t.endpoint, t.mesh = b.eps[i].Addr, b.eps[i].Mesh
	return nil
}

// attemptEnd is what judging an attempt needs: its span, its call and the
// attempt, with its endpoint.
type attemptEnd struct {
	chain *chain
	span  trace.Span
	call  *call
	try   try
}

// record ends the attempt's span and feeds its outcome to outlier
// detection.
func (a attemptEnd) record(resp *http.Response, err error) {
	if a.span != nil {
		endAttempt(a.span, resp, err)
	}
	c := a.call
	if s := a.try.picked; s != nil {
		now := time.Now()
		s.inFlight.Add(-1)
		s.observe(now.Sub(a.try.pickedAt), now)
	}
	if failed := attemptFailed(resp, err); failed || err == nil {
		od := c.policy.OutlierDetection
		if c.state.outliers.record(a.try.endpoint, failed, c.set, od, time.Now()) {
			a.chain.log.Warn("endpoint ejected", "service", c.service, "endpoint", a.try.endpoint,
				"for", od.EjectionTime.String())
			a.chain.observer.EndpointEjected(c.service)
		}
	}
}
