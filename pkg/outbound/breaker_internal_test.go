package outbound

// The default breaker (policy.Defaults(), no document for the service) in
// virtual time: it counts requests after their retries, so it never opens
// where a service without the sidecar would answer most requests, and it
// opens, bounded, where every request fails.

import (
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/forward"
	"github.com/sidecar-mesh/sidecar/pkg/policy"
)

var threeEndpoints = []string{"10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"}

// get sends a GET for path and returns the status and the local error's
// reason, if any.
func (c *testChain) get(path string) (int, string) {
	req, _ := http.NewRequest("GET", "http://svc"+path, nil)
	resp, err := c.rt.RoundTrip(req)
	if err != nil {
		le := forward.LocalReply("svc", err)
		return le.Status, le.Reason
	}
	discard(resp)
	return resp.StatusCode, ""
}

// load sends requests from workers at once, each a GET of path(rng) every
// 10ms after its answer, and counts the answers by path and outcome:
// "200", "503" (the upstream's own) or a local error's reason.
func load(c *testChain, workers, each int, path func(*rand.Rand) string) map[string]map[string]int {
	var mu sync.Mutex
	out := map[string]map[string]int{}
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 7))
			for range each {
				p := path(rng)
				code, reason := c.get(p)
				if reason == "" {
					reason = strconv.Itoa(code)
				}
				mu.Lock()
				if out[p] == nil {
					out[p] = map[string]int{}
				}
				out[p][reason]++
				mu.Unlock()
				time.Sleep(10 * time.Millisecond)
			}
		}()
	}
	wg.Wait()
	return out
}

// slow answers after 5ms, so that the attempts of concurrent requests end
// interleaved, as they do on the wire.
func slow(resp *http.Response) (*http.Response, error) {
	time.Sleep(5 * time.Millisecond)
	return resp, nil
}

// (a) One path that always answers 503 among healthy ones, 1 request in 10
// at random, 20000 requests from 10 clients at once: the default breaker
// never opens, every good request gets 200 and every bad one the
// upstream's own 503 (never circuit_open).
func TestDefaultBreakerIgnoresAFailingPath(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := newTestChain(t, "", threeEndpoints, func(r *http.Request) (*http.Response, error) {
			if r.URL.Path == "/bad" {
				return slow(answer(503))
			}
			return slow(answer(200))
		})
		got := load(c, 10, 2000, func(rng *rand.Rand) string {
			if rng.IntN(10) == 0 {
				return "/bad"
			}
			return "/"
		})
		t.Logf("answers by path %v; %d attempts, %d ejections, breaker transitions %v",
			got, c.calls.Load(), c.observer.ejections, c.observer.transitions)
		if len(c.observer.transitions) != 0 || c.observer.shed[forward.ReasonCircuitOpen] != 0 {
			t.Fatalf("the breaker moved %v and refused %d requests, want it closed throughout", c.observer.transitions, c.observer.shed[forward.ReasonCircuitOpen])
		}
		if len(got["/"]) != 1 || len(got["/bad"]) != 1 || got["/"]["200"]+got["/bad"]["503"] != 20000 {
			t.Fatalf("answers by path %v, want only 200 for / and only the upstream's 503 for /bad", got)
		}
	})
}

// (b) One instance of three answering 503 to half its calls, 20000 GETs
// from 10 clients at once: at least 99.9% succeed (retries go to another
// instance, outlier detection ejects the bad one) and the default breaker
// never opens.
func TestDefaultBreakerIgnoresAFailingInstance(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var mu sync.Mutex
		rng := rand.New(rand.NewPCG(3, 4))
		c := newTestChain(t, "", threeEndpoints, func(r *http.Request) (*http.Response, error) {
			mu.Lock()
			fail := r.URL.Host == "10.0.0.1:80" && rng.IntN(2) == 0
			mu.Unlock()
			if fail {
				return slow(answer(503))
			}
			return slow(answer(200))
		})
		got := load(c, 10, 2000, func(*rand.Rand) string { return "/" })["/"]
		t.Logf("answers %v (%.3f%% 200); %d attempts, %d ejections, breaker transitions %v",
			got, 100*float64(got["200"])/20000, c.calls.Load(), c.observer.ejections, c.observer.transitions)
		if got["200"] < 20000*999/1000 {
			t.Fatalf("%d of 20000 GETs succeeded (%v), want at least 99.9%%", got["200"], got)
		}
		if len(c.observer.transitions) != 0 {
			t.Fatalf("the breaker moved %v, want it closed throughout", c.observer.transitions)
		}
	})
}

// (c) Every instance answering 503: the default breaker opens after
// RunToTrip failed requests, so the upstream sees at most that many
// requests' attempts (retry.attempts each, fewer by the budget); while
// open, no attempt; once healed, the first half-open probe after
// openDuration closes it.
func TestDefaultBreakerOpensWhenAllFail(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var healthy bool
		var mu sync.Mutex
		c := newTestChain(t, "", threeEndpoints, func(r *http.Request) (*http.Response, error) {
			mu.Lock()
			defer mu.Unlock()
			if healthy {
				return answer(200), nil
			}
			return answer(503), nil
		})
		d := policy.Defaults()
		cb := d.CircuitBreaker
		bound := int64(cb.RunToTrip() * *d.Retry.Attempts)

		// 100 requests a second for 3s: the first RunToTrip reach the
		// upstream and fail, every later one is refused without a call.
		var reasons []string
		for range 300 {
			_, reason := c.get("/")
			reasons = append(reasons, reason)
			time.Sleep(10 * time.Millisecond)
		}
		upstream := 0
		for _, r := range reasons {
			if r != "" {
				break
			}
			upstream++
		}
		attempts := c.calls.Load()
		t.Logf("%d requests reached the upstream (%d attempts, bound %d) before the breaker opened; transitions %v",
			upstream, attempts, bound, c.observer.transitions)
		if upstream != cb.RunToTrip() || strings.Count(strings.Join(reasons, ","), forward.ReasonCircuitOpen) != 300-upstream {
			t.Fatalf("%d requests answered by the upstream, then %v; want %d, then circuit_open only", upstream, reasons[upstream:upstream+3], cb.RunToTrip())
		}
		if attempts > bound {
			t.Fatalf("%d upstream attempts before the breaker opened, want at most %d (%d requests × %d attempts)", attempts, bound, cb.RunToTrip(), *d.Retry.Attempts)
		}

		// Still down at the first probe, past openDuration: it fails and
		// opens the breaker again.
		time.Sleep(cb.OpenDuration.D())
		if code, reason := c.get("/"); code != 503 || reason != "" {
			t.Fatalf("half-open probe while down: %d %q, want the upstream's 503", code, reason)
		}
		if code, reason := c.get("/"); reason != forward.ReasonCircuitOpen {
			t.Fatalf("after a failed probe: %d %q, want circuit_open", code, reason)
		}
		mu.Lock()
		healthy = true
		mu.Unlock()
		time.Sleep(cb.OpenDuration.D() + time.Millisecond)
		for i := range 100 {
			if code, reason := c.get("/"); code != 200 {
				t.Fatalf("request %d after healing: %d %q, want 200", i, code, reason)
			}
		}
		want := "closed>open open>half-open half-open>open open>half-open half-open>closed"
		if got := strings.Join(c.observer.transitions, " "); got != want {
			t.Fatalf("transitions %q, want %q", got, want)
		}
	})
}
