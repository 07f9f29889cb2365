package outbound

import (
	"context"
	"math"
	"math/rand/v2"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/forward"
	"github.com/sidecar-mesh/sidecar/pkg/policy"
)

// adaptive is a service's adaptive concurrency limit
// (concurrency.adaptive): the gradient controller that pkg/policy's
// adaptive.go describes, with its constants. It moves lazily, as answers
// are observed: no timer, no goroutine. The limit in force is an atomic,
// read by every request; the lock is taken once per answer. The zero
// value is ready: the first request starts it, with a probe of minRTT.
// Safe for concurrent use.
type adaptive struct {
	cur atomic.Int64 // the limit in force; 0: not started

	mu        sync.Mutex      // guards what follows
	limit     float64         // the limit outside a probe, unrounded
	minRTT    time.Duration   // the latency with nothing queued; 0 until the first probe ends
	sampleRTT time.Duration   // the last window's median
	confirmed time.Time       // when minRTT was last measured or confirmed
	unconf    time.Duration   // how long minRTT may go unconfirmed before a probe (jittered)
	probe     time.Time       // when the probe under way began; zero: none
	start     time.Time       // when the window (or the probe's count) began
	rtts      []time.Duration // the window's samples, the first maxWindowSamples of them
	seen      int             // the window's samples, kept or not
	peak      int64           // the most requests in flight at an answer in the window
	pinned    time.Time       // since when the limit is at the floor; zero: it is not
}

// maxWindowSamples bounds the samples a window keeps for its median: at
// high rates the first ones of a 100ms window are plenty.
const maxWindowSamples = 256

// current is the limit in force, within [floor, ceiling] (the policy's,
// which a reload may have changed since the limit last moved).
func (a *adaptive) current(floor, ceiling int64, now time.Time) int64 {
	n := a.cur.Load()
	if n == 0 {
		a.mu.Lock()
		if a.cur.Load() == 0 {
			a.limit = policy.AdaptiveInitial
			a.rtts = make([]time.Duration, 0, maxWindowSamples)
			a.startProbe(now, floor)
		}
		a.mu.Unlock()
		n = a.cur.Load()
	}
	return min(max(n, floor), ceiling)
}

// observe takes one attempt's latency, rtt, from an attempt started at
// started that answered at now with inFlight requests to the service in
// flight, and moves the limit when a window (or a probe) is complete.
func (a *adaptive) observe(started, now time.Time, rtt time.Duration, inFlight, floor, ceiling int64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cur.Load() == 0 {
		return // adaptive since the attempt started: no request started it yet
	}
	if !a.probe.IsZero() {
		// Only attempts started under the probe's limit saw no queue.
		if started.Before(a.probe) {
			return
		}
		a.add(rtt)
		if a.seen < policy.AdaptiveProbeSamples {
			return
		}
		a.minRTT, a.sampleRTT = a.median(), 0
		a.confirmed, a.probe = now, time.Time{}
		a.set(a.limit, floor, ceiling)
		a.reset(now)
		return
	}
	a.add(rtt)
	a.peak = max(a.peak, inFlight)
	if now.Sub(a.start) < policy.AdaptiveWindow || a.seen < policy.AdaptiveWindowSamples {
		return
	}
	s := a.median()
	a.sampleRTT = s
	switch {
	case float64(s) <= float64(a.minRTT)*(1+policy.AdaptiveConfirm):
		a.confirmed, a.minRTT = now, min(a.minRTT, s)
	case a.limit <= float64(floor) && !a.pinned.IsZero() && now.Sub(a.pinned) >= policy.AdaptivePinned:
		a.confirmed, a.minRTT = now, s // nothing queued by this sidecar at the floor
	}
	next := gradientStep(a.limit, a.minRTT, s)
	if next > a.limit {
		if float64(a.peak) <= a.limit/2 {
			next = a.limit // the limit was not what held requests back
		} else {
			next = a.limit + (next-a.limit)*policy.AdaptiveSmoothing
		}
	}
	a.set(next, floor, ceiling)
	a.reset(now)
	switch {
	case a.limit > float64(floor):
		a.pinned = time.Time{}
	case a.pinned.IsZero():
		a.pinned = now
	}
	if now.Sub(a.confirmed) >= a.unconf {
		a.startProbe(now, floor)
	}
}

// gradientStep is the limit the gradient moves limit to, before smoothing
// and bounds: limit × gradient plus its square root, the gradient being
// the target latency over sampleRTT, within [0.5, 2].
func gradientStep(limit float64, minRTT, sampleRTT time.Duration) float64 {
	g := 2.0
	if sampleRTT > 0 {
		g = min(max(float64(policy.AdaptiveTarget(minRTT))/float64(sampleRTT), 0.5), 2)
	}
	next := limit * g
	return next + math.Sqrt(next)
}

// set makes limit, within [floor, ceiling], the limit; a.mu held.
func (a *adaptive) set(limit float64, floor, ceiling int64) {
	a.limit = min(max(limit, float64(floor)), float64(ceiling))
	a.cur.Store(max(int64(math.Round(a.limit)), 1))
}

// startProbe drops the limit to the floor to measure minRTT; a.mu held.
func (a *adaptive) startProbe(now time.Time, floor int64) {
	a.probe = now
	a.cur.Store(max(floor, 1))
	a.reset(now)
	jitter := rand.Float64() * policy.AdaptiveProbeJitter
	a.unconf = policy.AdaptiveProbeInterval + time.Duration(jitter*float64(policy.AdaptiveProbeInterval))
}

// add keeps a sample; a.mu held.
func (a *adaptive) add(rtt time.Duration) {
	if len(a.rtts) < cap(a.rtts) {
		a.rtts = append(a.rtts, rtt)
	}
	a.seen++
}

// reset starts a window at now; a.mu held.
func (a *adaptive) reset(now time.Time) {
	a.rtts, a.seen, a.peak, a.start = a.rtts[:0], 0, 0, now
}

// median is the median of the window's samples; a.mu held, at least one
// sample kept.
func (a *adaptive) median() time.Duration {
	slices.Sort(a.rtts)
	return a.rtts[len(a.rtts)/2]
}

// AdaptiveStatus is an adaptive limit's state, for the admin API.
type AdaptiveStatus struct {
	// MinRTTMs is the service's latency with nothing queued, as last
	// measured; 0 until the first probe ends.
	MinRTTMs float64 `json:"minRttMs"`
	// SampleRTTMs is the median latency of the last window.
	SampleRTTMs float64 `json:"sampleRttMs"`
	// Probing: the limit is at its floor while minRTT is measured.
	Probing bool `json:"probing,omitempty"`
}

// status is the limit in force, within [floor, ceiling], and the state it
// follows. Before any request started it, the limit is the floor, where
// the first request starts it, to measure minRTT.
func (a *adaptive) status(floor, ceiling int64) (int64, *AdaptiveStatus) {
	a.mu.Lock()
	defer a.mu.Unlock()
	n := a.cur.Load()
	return min(max(n, floor), ceiling), &AdaptiveStatus{MinRTTMs: millis(a.minRTT), SampleRTTMs: millis(a.sampleRTT),
		Probing: n == 0 || !a.probe.IsZero()}
}

func millis(d time.Duration) float64 { return math.Round(float64(d)/1e3) / 1e3 }

// concurrency is the service's concurrency limit in force and how many
// requests may wait in its line: the policy's fixed limit and line, or,
// with concurrency.adaptive, the adaptive limit and no line.
//
// An adaptive limit sheds at once, as Envoy's adaptive concurrency filter
// and Netflix's concurrency-limits (its SimpleLimiter) do: it exists to
// keep latency near the service's best, and a line would add back the
// wait it keeps off. The 503 says when to come back (Retry-After), which
// is what the fixed limit's line otherwise buys: an app that retried a
// refusal at once would turn it into more load.
func (st *serviceState) concurrency(cc *policy.Concurrency) (limit int64, queued int) {
	if !cc.IsAdaptive() {
		return int64(*cc.MaxInFlight), *cc.MaxQueued
	}
	return st.adaptive.current(int64(cc.Floor()), int64(*cc.MaxInFlight), time.Now()), 0
}

// shedAdaptive refuses a call over the service's adaptive limit.
func (ch *chain) shedAdaptive(c *call, req *http.Request, limit int64) error {
	err := ch.shed(c, req, "adaptive concurrency limit of the service reached ("+strconv.FormatInt(limit, 10)+
		" in flight, following its latency; concurrency.adaptive)")
	err.(*forward.LocalError).RetryAfter = policy.AdaptiveRetryAfter
	return err
}

// sampleLatency feeds an attempt's latency to the service's adaptive
// limit, when it has one: from start to the answer's headers, of an answer
// (not a 5xx, which may come fast because the service failed) or of a
// timeout (a latency at least that long). Other failures say nothing of
// latency.
func (ch *chain) sampleLatency(c *call, ctx context.Context, start time.Time, resp *http.Response, err error) {
	cc := c.policy.Concurrency
	if !cc.IsAdaptive() {
		return
	}
	if err != nil && ctx.Err() != context.DeadlineExceeded || err == nil && resp.StatusCode >= 500 {
		return
	}
	now := time.Now()
	st := c.state
	st.adaptive.observe(start, now, now.Sub(start), st.limit.inFlight.Load(), int64(cc.Floor()), int64(*cc.MaxInFlight))
}
