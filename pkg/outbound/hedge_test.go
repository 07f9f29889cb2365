package outbound_test

import (
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sidecar-mesh/sidecar/internal/faultserver"
	"github.com/sidecar-mesh/sidecar/pkg/outbound"
)

// hedgeCounter counts the hedges the chain reports.
type hedgeCounter struct {
	outbound.NopObserver
	sent, won, exhausted atomic.Int64
}

func (h *hedgeCounter) Hedged(string)               { h.sent.Add(1) }
func (h *hedgeCounter) HedgeWon(string)             { h.won.Add(1) }
func (h *hedgeCounter) RetryBudgetExhausted(string) { h.exhausted.Add(1) }

// tailRun is one run of TestHedgingCutsTheTail: the latencies of every
// request, sorted, and what the chain and the upstreams counted.
type tailRun struct {
	latencies             []time.Duration
	failed                int
	hedges, won           int64
	attempts              int64
	stalled, stallsServed int64
	took                  time.Duration
}

func (r tailRun) quantile(q float64) time.Duration {
	return r.latencies[min(len(r.latencies)-1, int(q*float64(len(r.latencies))))]
}

// runTail sends requests GETs from workers clients at once to three real
// upstreams, one of which stalls a tenth of its requests for 500ms.
func runTail(t *testing.T, policies string, requests, workers int) tailRun {
	t.Helper()
	good1, good2 := faultserver.New(t, faultserver.Faults{}), faultserver.New(t, faultserver.Faults{})
	staller := faultserver.New(t, faultserver.Faults{StallRatio: 0.1, Stall: 500 * time.Millisecond})
	obs := &hedgeCounter{}
	sc := startSidecar(t, options{static: map[string][]string{"svc": addrs(good1, staller, good2)},
		policies: policies, observer: obs})
	c := sc.client(t)
	var (
		mu  sync.Mutex
		run tailRun
		wg  sync.WaitGroup
	)
	next := atomic.Int64{}
	start := time.Now()
	for range workers {
		wg.Go(func() {
			for next.Add(1) <= int64(requests) {
				t0 := time.Now()
				resp, err := c.Get("http://svc/")
				d := time.Since(t0)
				ok := err == nil && resp.StatusCode == 200
				if err == nil {
					resp.Body.Close()
				}
				mu.Lock()
				run.latencies = append(run.latencies, d)
				if !ok {
					run.failed++
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	run.took = time.Since(start)
	slices.Sort(run.latencies)
	run.hedges, run.won = obs.sent.Load(), obs.won.Load()
	run.attempts = executed(good1, good2, staller)
	run.stalled, run.stallsServed = staller.Stalls()
	return run
}

// One instance of three pauses a tenth of its requests for 500ms (1 request
// in 30 overall): without hedging those requests wait the pause out, and
// they are the p99 and p99.9. With hedge.delay 20ms each gets a second
// attempt at another instance, which answers; the paused attempt is
// cancelled, no request waits the pause out, and the hedges stay within
// the retry budget (each is one more attempt at an upstream).
func TestHedgingCutsTheTail(t *testing.T) {
	const requests, workers = 1500, 6
	base := "service: svc\nloadBalancer: {policy: round-robin}\n"
	without := runTail(t, base, requests, workers)
	with := runTail(t, base+"hedge: {delay: 20ms}\n", requests, workers)
	for _, r := range []struct {
		name string
		run  tailRun
	}{{"without hedging", without}, {"hedge.delay 20ms", with}} {
		t.Logf("%s: p50 %v, p99 %v, p99.9 %v, max %v; %d stalls (%d waited out), %d hedges (%d won), %d attempts for %d requests in %v",
			r.name, r.run.quantile(0.5), r.run.quantile(0.99), r.run.quantile(0.999), r.run.latencies[len(r.run.latencies)-1],
			r.run.stalled, r.run.stallsServed, r.run.hedges, r.run.won, r.run.attempts, requests, r.run.took.Round(time.Millisecond))
		if r.run.failed != 0 {
			t.Errorf("%s: %d requests failed, want none", r.name, r.run.failed)
		}
	}
	if without.stalled == 0 || without.stallsServed != without.stalled || without.hedges != 0 || without.attempts != requests {
		t.Fatalf("without hedging: %d stalls, %d waited out, %d hedges, %d attempts; want stalls all waited out, one attempt per request",
			without.stalled, without.stallsServed, without.hedges, without.attempts)
	}
	if with.stalled == 0 || with.stallsServed != 0 {
		t.Fatalf("with hedging: %d of %d stalls waited out, want none: a hedge answers first and the stalled attempt is cancelled",
			with.stallsServed, with.stalled)
	}
	// Every hedge is one attempt more (one cancelled while it was being
	// sent may never reach its upstream; every one that won did), and no
	// more hedges go than the budget gives: 20% of the requests plus 10 a
	// second.
	if with.attempts > requests+with.hedges || with.attempts < requests+with.won || with.won == 0 || with.won > with.hedges {
		t.Fatalf("with hedging: %d attempts at the upstreams, %d hedges (%d won) for %d requests; want one per request and per hedge that got there",
			with.attempts, with.hedges, with.won, requests)
	}
	if budget := int64(0.2*requests + 10*(with.took.Seconds()+1)); with.hedges > budget {
		t.Fatalf("%d hedges for %d requests, over the retry budget's %d", with.hedges, requests, budget)
	}
}
