package outbound_test

import (
	"fmt"
	"io"
	"net/http"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/sidecar-mesh/sidecar/internal/faultserver"
	"github.com/sidecar-mesh/sidecar/pkg/policy"
)

// overloadRun is what an open-loop run through a sidecar got back.
type overloadRun struct {
	sent, ok, shed, timedOut, breakerOpen, other int
	retryAfter                                   int // answers with a Retry-After header
	shedRetryAfter                               int // sheds with Retry-After: 1
	okLatency                                    []time.Duration
}

func (r *overloadRun) p99() time.Duration {
	if len(r.okLatency) == 0 {
		return 0
	}
	slices.Sort(r.okLatency)
	return r.okLatency[len(r.okLatency)*99/100]
}

// openLoop sends rate GET requests per second to service through the
// sidecar for d, each on schedule whatever became of those before it
// (open loop), and sorts the answers. Latency counts from each request's
// scheduled time.
func openLoop(t *testing.T, sc *sidecar, service string, rate int, d time.Duration) *overloadRun {
	t.Helper()
	client := sc.client(t)
	var (
		mu  sync.Mutex
		run overloadRun
		wg  sync.WaitGroup
	)
	start := time.Now()
	every := time.Second / time.Duration(rate)
	for n := 0; ; n++ {
		due := start.Add(time.Duration(n) * every)
		if due.Sub(start) >= d {
			break
		}
		time.Sleep(time.Until(due))
		run.sent++
		wg.Go(func() {
			resp, err := client.Get("http://" + service + "/")
			if err == nil {
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
			took := time.Since(due)
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err != nil:
				run.other++
			case resp.StatusCode == http.StatusOK:
				run.ok++
				run.okLatency = append(run.okLatency, took)
			case resp.StatusCode == http.StatusServiceUnavailable && resp.Header.Get("X-Sidecar-Error") == "overloaded":
				run.shed++
				if resp.Header.Get("Retry-After") == "1" {
					run.shedRetryAfter++
				}
			case resp.StatusCode == http.StatusGatewayTimeout:
				run.timedOut++
			case resp.Header.Get("X-Sidecar-Error") == "circuit_open":
				run.breakerOpen++
			default:
				run.other++
			}
			if err == nil && resp.Header.Get("Retry-After") != "" {
				run.retryAfter++
			}
		})
	}
	wg.Wait()
	return &run
}

// Overload at twice a real upstream's capacity, open loop: the upstream
// (faultserver) works on 4 requests at once for 20ms each, 200 requests
// per second, the rest waiting in its own queue, worked on even after
// their caller gave up; the app offers 400 per second, with a timeout of
// 1s. With the fixed default limit (1024, a line of 1024) the upstream's
// queue grows until answers take longer than the timeout, and from then on
// its whole capacity goes to requests nobody waits for (until the timeouts
// open the breaker, which then refuses nearly everything). With
// concurrency.adaptive the limit settles a little over the upstream's 4
// workers: nearly all its capacity answers in time, the rest is refused
// at once with Retry-After. A fixed limit tuned by hand to the upstream (8,
// no line) is the yardstick. Goodput is the 200s, all within the timeout.
func TestAdaptiveLimitUnderOverload(t *testing.T) {
	if testing.Short() {
		t.Skip("runs 12s of load")
	}
	const (
		workers  = 4
		service  = 20 * time.Millisecond
		rate     = 400
		duration = 4 * time.Second
		capacity = int(workers * duration / service) // answers the upstream can give in the run
	)
	type contestant struct {
		name, policy string
		run          *overloadRun
		limit        int64
		adaptive     bool
	}
	cs := []*contestant{
		{name: "fixed (defaults)", policy: "service: up\ntimeout: 1s\nretry: {attempts: 1}\n"},
		{name: "fixed (tuned: 8, no line)", policy: "service: up\ntimeout: 1s\nretry: {attempts: 1}\nconcurrency: {maxInFlight: 8, maxQueued: 0}\n"},
		{name: "adaptive", policy: "service: up\ntimeout: 1s\nretry: {attempts: 1}\nconcurrency: {adaptive: true}\n"},
	}
	for _, c := range cs {
		up := faultserver.New(t, faultserver.Faults{Workers: workers, Latency: service})
		sc := startSidecar(t, options{static: map[string][]string{"up": {up.Addr()}}, policies: c.policy})
		c.run = openLoop(t, sc, "up", rate, duration)
		for _, s := range sc.proxy.Status() {
			if s.Service == "up" {
				c.limit, c.adaptive = s.Limit, s.Adaptive != nil
			}
		}
		up.Close() // its queue of abandoned requests goes with it
		r := c.run
		t.Logf("%-26s sent %d: 200 %d (%.0f%% of the upstream's capacity of %d), shed %d, timed out %d, circuit open %d, other %d; p99 of 200s %v; limit at the end %d",
			c.name, r.sent, r.ok, 100*float64(r.ok)/float64(capacity), capacity, r.shed, r.timedOut, r.breakerOpen, r.other, r.p99().Round(time.Millisecond), c.limit)
	}
	fixed, tuned, adaptive := cs[0], cs[1], cs[2]

	// The machine's own load (other packages' tests run beside this one)
	// takes from every variant alike: the adaptive limit is judged against
	// the others of the same run, with a floor for itself.
	if got := adaptive.run.ok; got < capacity*6/10 || got <= fixed.run.ok {
		t.Errorf("adaptive: %d answered of a capacity of %d, the default fixed limit %d; want at least 60%% and more than the fixed limit",
			got, capacity, fixed.run.ok)
	}
	if got := fixed.run.ok; got > capacity*6/10 {
		t.Errorf("fixed default limit: %d answered of a capacity of %d; want under 60%% (the upstream's queue past the timeout)", got, capacity)
	}
	if got, want := adaptive.run.ok, tuned.run.ok*3/4; got < want {
		t.Errorf("adaptive: %d answered, the hand-tuned fixed limit %d; want at least 75%% of it", got, tuned.run.ok)
	}
	if a := adaptive.run; a.shed == 0 || a.shedRetryAfter != a.shed || a.retryAfter != a.shed {
		t.Errorf("adaptive: %d shed, %d of them with Retry-After: 1, %d answers with a Retry-After; want every shed and only sheds with it",
			a.shed, a.shedRetryAfter, a.retryAfter)
	}
	for _, c := range []*contestant{fixed, tuned} {
		if c.run.retryAfter != 0 || c.adaptive {
			t.Errorf("%s: %d answers with a Retry-After, adaptive status %v; want none (only adaptive sheds carry it)", c.name, c.run.retryAfter, c.adaptive)
		}
	}
	if tuned.run.shed == 0 {
		t.Errorf("fixed (tuned): nothing shed at twice the capacity; want sheds")
	}
	if !adaptive.adaptive || adaptive.limit < policy.AdaptiveFloor || adaptive.limit > 4*workers {
		t.Errorf("adaptive: limit %d at the end (status adaptive: %v), want it adaptive, between %d and %d", adaptive.limit, adaptive.adaptive, policy.AdaptiveFloor, 4*workers)
	}
	if fixed.limit != 1024 {
		t.Errorf("fixed: limit %d in the status, want 1024", fixed.limit)
	}
	if t.Failed() {
		for _, c := range cs {
			t.Log(c.name, fmt.Sprintf("%+v", *c.run))
		}
	}
}
