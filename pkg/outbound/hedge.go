package outbound

import (
	"context"
	"fmt"
	"net/http"
	"time"

	"github.com/sony/gobreaker/v2"

	"github.com/sidecar-mesh/sidecar/pkg/forward"
	"github.com/sidecar-mesh/sidecar/pkg/requestlog"
	"github.com/sidecar-mesh/sidecar/pkg/upstream"
)

// Hedge is the reason of a hedged attempt (requestlog's RetryReason, the
// attempt span's name): sent because the attempts before it had not
// answered within hedge.delay.
const Hedge = requestlog.Hedge

// errHedgeLost is what an attempt ends with when another attempt of its
// race answered first and it was cancelled. It is a context.Canceled: no
// failure of its endpoint, nor of the request.
var errHedgeLost = fmt.Errorf("%w: another attempt answered first", context.Canceled)

// hedgeable reports whether the call's request may be hedged: the policy
// hedges, the request is idempotent (retry.methods, or an
// Idempotency-Key), it upgrades nothing, and the service has another
// endpoint to send a hedge to. Whether its body can be sent twice is known
// only when a hedge is due (race).
func (ch *chain) hedgeable(c *call, req *http.Request) bool {
	return c.policy.Hedge.On() && retryableMethod(c.policy.Retry, req) &&
		req.Header.Get("Upgrade") == "" && len(c.set.Endpoints) > 1
}

// race sends attempt first and, while no answer comes, hedges it: once
// hedge.delay passes without a complete answer, the same request goes to
// another endpoint (not one with an attempt out), and again each delay,
// up to hedge.maxHedges hedges, never past retry.attempts, never with the
// breaker open or the deadline unable to cover one more delay, and each
// taking a retry from the retry budget: hedging never adds more load than
// retries could. A hedge is sent only when the body can be read again from
// memory.
//
// The first complete answer wins: a success, or a failure retry.on does not
// name. A failure that could be retried wins only when no other attempt
// is out; the retry loop then judges it as any attempt's. The others are
// cancelled and waited for (a cancelled attempt ends at once), so that
// every attempt is noted, in order, by the time race returns.
func (ch *chain) race(c *call, ctx *deadlineCtx, req, cur *http.Request, first try) tried {
	h, r := c.policy.Hedge, c.policy.Retry
	maxHedges := min(*h.MaxHedges, *r.Attempts-first.n)
	results := make(chan tried, 1+maxHedges)
	// The attempts by number from first's, each with its cancel until its
	// outcome comes; the endpoints they went to, which a hedge avoids.
	out := make([]tried, 0, 1+maxHedges)
	cancels := make([]context.CancelCauseFunc, 0, 1+maxHedges)
	endpoints := make([]string, 0, 1+maxHedges)
	launch := func(body *http.Request, t try) *forward.LocalError {
		if lerr := ch.pick(c, &t, time.Now()); lerr != nil {
			upstream.CloseBody(body)
			return lerr
		}
		endpoints = append(endpoints, t.endpoint)
		rctx, cancel := context.WithCancelCause(ctx)
		out, cancels = append(out, tried{try: t}), append(cancels, cancel)
		go func() { results <- ch.attempt(c, ctx, req, body, t, rctx) }()
		return nil
	}
	if lerr := launch(cur, first); lerr != nil {
		return tried{try: first, err: lerr}
	}
	pending, hedges := 1, 0
	timer := time.NewTimer(h.Delay.D())
	defer timer.Stop()
	winner := -1
	for winner < 0 {
		select {
		case t := <-results:
			pending--
			i := t.n - first.n
			out[i] = t
			if pending == 0 || retryReason(r, req, t.resp, t.err) == "" {
				winner = i
			} else if t.resp != nil {
				// A failure to retry, while another attempt is out.
				discard(t.resp)
				endPerTry(t.perTry)
			}
		case <-timer.C:
			if !ch.hedgeDue(c, ctx, hedges, maxHedges, len(endpoints)) {
				continue
			}
			body, ok := upstream.Rewound(cur)
			if !ok || body != cur && body.Body == cur.Body {
				continue // the body is still streaming from the app
			}
			if !c.state.budget.allowRetry(time.Now(), *r.Budget.Ratio, *r.Budget.MinPerSecond) {
				ch.observer.RetryBudgetExhausted(c.service)
				continue
			}
			hedges++
			if hedges < maxHedges {
				timer.Reset(h.Delay.D())
			}
			if launch(body, try{n: first.n + len(out), retryOf: Hedge, avoid: endpoints}) == nil {
				pending++
				ch.observer.Hedged(c.service)
			}
		}
	}
	// The others are cancelled (an attempt cancelled ends at once) and
	// waited for, their answers, should they have come meanwhile, dropped,
	// so that every attempt is noted, in order, when race returns.
	for i, cancel := range cancels {
		if i != winner {
			cancel(errHedgeLost)
		}
	}
	for ; pending > 0; pending-- {
		t := <-results
		t.lost = true
		if t.resp != nil {
			discard(t.resp)
			t.resp, t.err = nil, errHedgeLost
		}
		endPerTry(t.perTry)
		out[t.n-first.n] = t
	}
	for i := range out {
		c.noteTried(&out[i])
	}
	if out[winner].retryOf == Hedge {
		ch.observer.HedgeWon(c.service)
	}
	return out[winner]
}

// hedgeDue reports whether a hedge may go now, the delay having passed:
// fewer than maxHedges sent, time left for one more delay, the breaker not
// open, and an endpoint without an attempt out.
func (ch *chain) hedgeDue(c *call, ctx *deadlineCtx, hedges, maxHedges, out int) bool {
	return hedges < maxHedges && ctx.Err() == nil && deadlineAllows(ctx, c.policy.Hedge.Delay.D()) &&
		c.state.breaker.Load().State() != gobreaker.StateOpen && out < len(c.set.Endpoints)
}
