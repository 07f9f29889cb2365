package outbound

// The call's chain driven from the engine's event loops (pkg/engine): the
// same steps as chain.do, limit and attempts, in the same order and with
// the same state (slots, breaker, budget, picker, outlier detection,
// metrics, spans, recorder), written as a state machine: a deadline, a
// backoff and an answer being waited for are timers and callbacks of the
// loop, not a parked goroutine. What it does not drive it hands off before
// anything of the call began (the listener's server then serves it on the
// goroutine path, as it serves every request without the engine): a
// request the edge checks would refuse or route elsewhere than to a
// service, one whose service has no free slot at once (its line waits on
// the goroutine path), hedging, an adaptive limit, the mesh's endpoints,
// gRPC over HTTP/1.1.

import (
	"context"
	"fmt"
	"net/http"
	"net/netip"
	"strings"
	"time"

	"github.com/sony/gobreaker/v2"
	"go.opentelemetry.io/otel/trace"

	"github.com/sidecar-mesh/sidecar/pkg/engine"
	"github.com/sidecar-mesh/sidecar/pkg/forward"
	"github.com/sidecar-mesh/sidecar/pkg/metrics"
	"github.com/sidecar-mesh/sidecar/pkg/requestlog"
	"github.com/sidecar-mesh/sidecar/pkg/tracing"
)

// LoopHandler is the outbound proxy as the engine's handler: the requests
// its loops read are served by the chain driven from the loop, or handed
// off to the listener's server.
func (p *Proxy) LoopHandler() engine.Handler { return loopHandler{p} }

type loopHandler struct{ p *Proxy }

// noWait is a context already done: discovery answers with what it knows,
// without waiting for Consul (a service not known yet is handed off).
var noWait = func() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}()

func (h loopHandler) Serve(x *engine.Exchange) {
	p, r := h.p, x.Request
	host := strings.ToLower(r.Host)
	if host == "" || r.URL.Scheme != "" && r.URL.Scheme != "http" || r.URL.User != nil {
		x.Handoff() // answered by ServeHTTP's checks
		return
	}
	if hops, ok := r.Header[forward.HopHeader]; ok && p.sentBefore(hops) {
		x.Handoff()
		return
	}
	c, _, lerr := p.route(noWait, r, host)
	ch := p.chain
	if lerr != nil || c == nil || !ch.loopDrives(c, r) {
		x.Handoff()
		return
	}
	// Admission without waiting: the sidecar's limit, then a free slot of
	// the service's; a request that would wait in its line goes to the
	// goroutine path, which waits.
	maxInFlight, _ := c.state.concurrency(c.policy.Concurrency)
	if n := ch.inFlight.Add(1); n > ch.maxInFlight {
		ch.inFlight.Add(-1)
		x.Handoff()
		return
	}
	if !c.state.limit.tryAcquire(maxInFlight) {
		ch.inFlight.Add(-1)
		x.Handoff()
		return
	}
	// As ServeHTTP and the Forwarder prepare it.
	p.markHop(r.Header)
	out, _ := forward.Prepare(r, "")
	lc := &loopCall{ch: ch, c: c, x: x, req: r, out: out, maxInFlight: maxInFlight, start: time.Now()}
	lc.begin()
}

// loopDrives reports whether the loop's chain drives c: no hedging, no
// adaptive limit, not gRPC, every endpoint an IP address and port, none
// the mesh's.
func (ch *chain) loopDrives(c *call, r *http.Request) bool {
	if c.policy.Concurrency.IsAdaptive() || ch.hedgeable(c, r) || ch.modelled {
		return false
	}
	// gRPC over HTTP/1.1 (gRPC-Web): its deadline (grpc-timeout) and its
	// outcome (a grpc-status, often in the trailers) are the goroutine
	// path's to read.
	if _, ok := r.Header["Grpc-Timeout"]; ok || strings.HasPrefix(r.Header.Get("Content-Type"), "application/grpc") {
		return false
	}
	for _, ep := range c.set.Endpoints {
		// The loops dial addresses, never names: a host name is the
		// transport's to resolve and to check what it resolves to.
		if _, err := netip.ParseAddrPort(ep.Addr); ep.Mesh || err != nil {
			return false
		}
	}
	return true
}

// loopCall is one call the loop drives, from admission to its answer.
type loopCall struct {
	ch          *chain
	c           *call
	x           *engine.Exchange
	req         *http.Request // as the app sent it (its header prepared)
	out         *http.Request // what each attempt sends, its URL host the endpoint
	maxInFlight int64
	start       time.Time
	series      *metrics.Series
	span        trace.Span
	ctx         context.Context // the request span's, for the attempts'
	done        func(error)     // the breaker's
	deadline    time.Time       // the policy's timeout
	timer       *engine.Timer   // the overall deadline, then a stream's silence
	perTry      *engine.Timer
	backoff     *engine.Timer
	attempt     *engine.Attempt
	t           try // the attempt out
	tStart      time.Time
	aspan       trace.Span
	last        *engine.Attempt // the attempt judged last: its answer is passed on
	expired     bool            // the overall deadline passed
	answering   bool            // the answer is being written
	released    bool            // the slots were given back
}

func (lc *loopCall) begin() {
	ch, c := lc.ch, lc.c
	lc.series = ch.metrics.For(metrics.Outbound, c.service, lc.req.Method)
	lc.ctx = lc.req.Context()
	if ch.tracer != nil {
		lc.ctx, lc.span = ch.startSpan(c, lc.req)
	}
	timeout := c.policy.Timeout.D()
	lc.deadline = lc.start.Add(timeout)
	lc.timer = lc.x.AfterFunc(timeout, lc.timedOut)
	lc.x.OnGone(lc.gone)
	c.state.budget.request(time.Now())
	br := c.state.breaker.Load()
	done, berr := br.Allow()
	if berr != nil {
		c.stop = requestlog.StopBreakerOpen
		ch.observer.Shed(c.service, forward.ReasonCircuitOpen)
		lc.fail(forward.Refuse(forward.ReasonCircuitOpen, c.service, "circuit breaker "+br.State().String()))
		return
	}
	lc.done = done
	lc.send(try{n: 1})
}

// send starts attempt t: pick, per-try deadline, span, the request out.
func (lc *loopCall) send(t try) {
	ch, c := lc.ch, lc.c
	lc.tStart = time.Now()
	if lerr := ch.pick(c, &t, lc.tStart); lerr != nil {
		lc.t = t
		lc.judge(nil, lerr)
		return
	}
	lc.t = t
	addr, _ := netip.ParseAddrPort(t.endpoint) // every endpoint is one (loopDrives)
	if pt := c.policy.Retry.PerTryTimeout.D(); pt > 0 {
		lc.perTry = lc.x.AfterFunc(pt, lc.perTryTimedOut)
	}
	out := lc.out
	out.URL.Host = t.endpoint
	lc.aspan = nil
	if ch.tracer != nil {
		sctx, span := ch.startAttempt(c, &t, lc.ctx, out)
		lc.aspan = span
		tracing.Replace(ch.prop, ch.propFields, sctx, out.Header)
	}
	ch.observer.Attempted(c.service)
	lc.attempt = lc.x.Send(addr, out, lc.x.Body, c.policy.ConnectTimeout.D(), lc.answered)
}

// answered is the attempt's outcome: its answer's head, or its failure.
func (lc *loopCall) answered(a *engine.Attempt, resp *http.Response, err error) {
	if a != lc.attempt {
		return
	}
	lc.perTry.Stop()
	lc.last = a
	lc.judge(resp, err)
}

func (lc *loopCall) perTryTimedOut() {
	lc.attempt.Cancel()
	lc.judge(nil, fmt.Errorf("%w: %w", errPerTryTimeout, context.DeadlineExceeded))
}

func (lc *loopCall) timedOut() {
	if lc.answering {
		// The answer is being written: the timeout bounds it too, unless
		// it is a stream (whose timer watches its silence instead).
		lc.x.Abort()
		return
	}
	lc.expired = true
	if lc.attempt == nil {
		// Between attempts (a backoff): no attempt to judge.
		lc.backoff.Stop()
		lc.c.stop = requestlog.StopDeadline
		lc.done(breakerOutcome(nil, context.DeadlineExceeded))
		lc.fail(lc.localError(context.DeadlineExceeded))
		return
	}
	lc.perTry.Stop()
	lc.attempt.Cancel()
	lc.judge(nil, context.DeadlineExceeded)
}

// judge decides on an attempt's outcome, as chain.attempts does: the
// answer, or a retry after its backoff, or the failure.
func (lc *loopCall) judge(resp *http.Response, err error) {
	ch, c := lc.ch, lc.c
	r, st := c.policy.Retry, c.state
	t := lc.t
	lc.attempt = nil
	lc.endAttempt(resp, err)
	attempt := t.n
	reason, cause := "", ""
	var bs gobreaker.State
	judged := false
	br := st.breaker.Load()
	switch {
	case lc.done == nil: // the breaker refused: no attempt
	case attempt >= *r.Attempts:
		cause = requestlog.StopAttemptsUsedUp
	case lc.expired:
		cause = requestlog.StopDeadline
	default:
		bs, judged = br.State(), true
		if bs == gobreaker.StateOpen {
			cause = requestlog.StopBreakerOpen
		} else if reason = retryReason(r, lc.req, resp, err); reason == "" {
			cause = requestlog.StopNotRetryable
		}
	}
	if t.endpoint != "" {
		n := c.note(t.n)
		n.err, n.breaker, n.judged = err, bs, judged
		c.judged = t.n
	} else {
		cause = ""
	}
	var delay time.Duration
	ok := false
	if reason != "" {
		delay = backoffDelay(r.Backoff, attempt, resp, ch.rand)
		cause = requestlog.StopDeadline
		if time.Until(lc.deadline) > delay {
			ok = true // the body is held: it always replays
		}
	}
	if ok && !st.budget.allowRetry(time.Now(), *r.Budget.Ratio, *r.Budget.MinPerSecond) {
		ch.observer.RetryBudgetExhausted(c.service)
		ok, cause = false, requestlog.StopBudgetExhausted
	}
	if !ok {
		c.stop = cause
		if err != nil {
			if lc.done != nil {
				lc.done(breakerOutcome(nil, err))
			}
			lc.fail(lc.localError(err))
			return
		}
		lc.done(breakerOutcome(resp, nil))
		lc.respond(resp)
		return
	}
	ch.observer.Retried(c.service, reason)
	c.last[0] = t.endpoint
	next := try{n: attempt + 1, retryOf: reason, backoff: delay, avoid: c.last[:]}
	if resp != nil {
		// Its answer dropped: a short rest of its body is read so that
		// the connection serves again, as the goroutine path reads it.
		lc.last.Drop(time.Until(lc.deadline))
	}
	lc.backoff = lc.x.AfterFunc(delay, func() { lc.send(next) })
}

// endAttempt ends the attempt out (its span, the endpoint's count of
// requests in flight, outlier detection) and notes its outcome.
func (lc *loopCall) endAttempt(resp *http.Response, err error) {
	t, c := lc.t, lc.c
	if t.endpoint == "" {
		return // the picker found no endpoint: nothing went out
	}
	(attemptEnd{chain: lc.ch, span: lc.aspan, call: c, try: t}).record(resp, err)
	n := c.note(t.n)
	n.endpoint, n.took, n.resp, n.err = t.endpoint, time.Since(lc.tStart), resp, err
	n.retryOf, n.backoff = t.retryOf, t.backoff
}

// localError is the local reply to err, as limit maps it.
func (lc *loopCall) localError(err error) *forward.LocalError {
	if lc.expired {
		return timeoutRefusal(lc.c.service, lc.c.policy.Timeout.D())
	}
	return forward.LocalReply(lc.c.service, err)
}

// fail answers the call with the local error e: its timers stop, so
// that nothing of the call runs again while the answer waits for the
// client.
func (lc *loopCall) fail(e *forward.LocalError) {
	ch, c := lc.ch, lc.c
	lc.answering = true
	lc.timer.Stop()
	lc.perTry.Stop()
	lc.backoff.Stop()
	endRequest(lc.span, lc.series, lc.start, e.Status, e.Reason, e.Error())
	if ch.recorder != nil {
		ch.record(c, lc.req, lc.span, lc.start, nil, e)
	}
	lc.release()
	var w replyWriter
	forward.WriteError(&w, lc.req, e)
	lc.x.Reply(w.status, w.header, w.body, nil)
}

// respond passes the answer on, its body as it comes.
func (lc *loopCall) respond(resp *http.Response) {
	ch, c := lc.ch, lc.c
	if ch.recorder != nil && (resp.StatusCode >= 500 || ch.recorder.Wants()) {
		ch.record(c, lc.req, lc.span, lc.start, resp, nil)
	}
	forward.PrepareAnswer(resp)
	if forward.IsStream(resp) {
		// A stream runs as long as it keeps sending: the timeout gives
		// way to streamIdleTimeout, watched on the loop.
		lc.timer.Stop()
		lc.watchSilence(c.policy.StreamIdleTimeout.D(), -1)
	}
	lc.answering = true
	status := resp.StatusCode
	lc.x.Respond(lc.last, resp, func(err error) {
		lc.timer.Stop()
		endRequest(lc.span, lc.series, lc.start, status, "", "")
		lc.release()
	})
}

// watchSilence ends a stream that sent nothing for idle.
func (lc *loopCall) watchSilence(idle time.Duration, seen int64) {
	if idle <= 0 {
		return
	}
	lc.timer = lc.x.AfterFunc(idle, func() {
		if now := lc.x.Sent(); now != seen {
			lc.watchSilence(idle, now)
			return
		}
		lc.ch.observer.StreamCut(lc.c.service, StreamCutIdle)
		lc.x.Abort()
	})
}

// release gives back the call's slots, once.
func (lc *loopCall) release() {
	if lc.released {
		return
	}
	lc.released = true
	lc.ch.release(lc.c.state, lc.maxInFlight)
}

// gone is the client leaving before the answer: the call ends, its
// slots given back, counted as nginx's 499 and recorded as the goroutine
// path records it; an attempt out (the engine cancelled it) ends with it.
func (lc *loopCall) gone() {
	ch, c := lc.ch, lc.c
	if lc.attempt != nil {
		lc.attempt = nil
		lc.endAttempt(nil, context.Canceled)
	}
	c.stop = requestlog.StopDeadline
	e := forward.LocalReply(c.service, context.Canceled)
	if lc.done != nil {
		lc.done(breakerOutcome(nil, context.Canceled))
	}
	endRequest(lc.span, lc.series, lc.start, e.Status, e.Reason, e.Error())
	if ch.recorder != nil {
		ch.record(c, lc.req, lc.span, lc.start, nil, e)
	}
	lc.release()
}

// replyWriter is a ResponseWriter that keeps what forward.WriteError
// writes, for the engine to send.
type replyWriter struct {
	header http.Header
	status int
	body   []byte
}

func (w *replyWriter) Header() http.Header {
	if w.header == nil {
		w.header = make(http.Header, 4)
	}
	return w.header
}

func (w *replyWriter) WriteHeader(status int) {
	if w.status == 0 {
		w.status = status
	}
}

func (w *replyWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	w.body = append(w.body, p...)
	return len(p), nil
}
