package outbound

// Policy reloads under the resilience chain, on a fake clock: the state of
// a service (breaker, ejections, budget) outlives a reload, and only a
// change of the circuitBreaker values replaces the breaker.

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/forward"
	"github.com/sidecar-mesh/sidecar/pkg/policy"
)

// reload replaces the store's policy file with doc, which must be accepted.
func reload(t *testing.T, store *policy.Store, doc string) {
	t.Helper()
	gen := store.Generation()
	if err := store.SetFile("policies.yaml", []byte(doc)); err != nil {
		t.Fatalf("reload rejected: %v", err)
	}
	if store.Generation() != gen+1 {
		t.Fatalf("reload left the generation at %d, want %d", store.Generation(), gen+1)
	}
}

// A reload of unrelated fields (and of the breaker's values written
// another way) keeps an open breaker open; a new openDuration gives a
// fresh breaker that uses it.
func TestReloadKeepsBreakerUnlessItsSettingsChange(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		store := policy.NewStore(policy.StoreOptions{})
		reload(t, store, `
service: svc
timeout: 5s
retry: {attempts: 1}
circuitBreaker: {consecutiveFailures: 3, openDuration: 30s, minRequests: 1000}
`)
		c := newTestChainWith(t, store, []string{"10.0.0.1:80"}, func(r *http.Request) (*http.Response, error) {
			return answer(503), nil
		})
		ctx := context.Background()
		expect := func(when, wantReason string, wantCalls int64) {
			t.Helper()
			code, reason := c.do(ctx, "GET", nil)
			if code != 503 || reason != wantReason {
				t.Fatalf("%s: %d %q, want 503 %q", when, code, reason, wantReason)
			}
			if n := c.calls.Load(); n != wantCalls {
				t.Fatalf("%s: %d transport calls in all, want %d", when, n, wantCalls)
			}
		}
		for range 3 {
			expect("tripping the breaker", "", c.calls.Load()+1)
		}
		expect("breaker open", forward.ReasonCircuitOpen, 3)

		reload(t, store, `
service: svc
timeout: 4s
retry: {attempts: 1, perTryTimeout: 2s}
circuitBreaker: {consecutiveFailures: 3, openDuration: 30000ms, minRequests: 1000}
`)
		expect("after a reload of timeout and retry", forward.ReasonCircuitOpen, 3)
		time.Sleep(10 * time.Second)
		expect("10s later, openDuration 30s", forward.ReasonCircuitOpen, 3)

		reload(t, store, `
service: svc
timeout: 4s
retry: {attempts: 1}
circuitBreaker: {consecutiveFailures: 3, openDuration: 10s, minRequests: 1000}
`)
		expect("after openDuration changed: a fresh, closed breaker", "", 4)
		expect("second failure", "", 5)
		expect("third failure", "", 6)
		expect("the fresh breaker open", forward.ReasonCircuitOpen, 6)
		time.Sleep(10*time.Second + time.Millisecond)
		expect("10s later: half-open lets a probe through", "", 7)

		want := "closed>open open>closed closed>open open>half-open half-open>open"
		if got := strings.Join(c.observer.transitions, " "); got != want {
			t.Fatalf("transitions %q, want %q", got, want)
		}
	})
}

// Ejections and the retry budget are the service's, not the policy's: a
// reload that replaces the breaker keeps them.
func TestReloadKeepsEjectionsAndBudget(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		store := policy.NewStore(policy.StoreOptions{})
		reload(t, store, `
service: svc
retry: {attempts: 1}
circuitBreaker: {consecutiveFailures: 100000, minRequests: 1000000}
outlierDetection: {consecutiveFailures: 2, ejectionTime: 1m}
`)
		bad := 0
		c := newTestChainWith(t, store, []string{"10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"}, func(r *http.Request) (*http.Response, error) {
			if r.URL.Host == "10.0.0.1:80" {
				bad++
				return answer(503), nil
			}
			return answer(200), nil
		})
		for range 6 {
			c.do(context.Background(), "GET", nil)
		}
		st := c.states.get("svc", nil)
		if bad != 2 || c.observer.ejections != 1 {
			t.Fatalf("the failing endpoint was called %d times and ejected %d times, want 2 and 1", bad, c.observer.ejections)
		}
		requests, _ := st.budget.usage(time.Now())

		reload(t, store, `
service: svc
timeout: 3s
retry: {attempts: 1}
circuitBreaker: {consecutiveFailures: 50000, minRequests: 1000000}
outlierDetection: {consecutiveFailures: 2, ejectionTime: 1m}
`)
		for range 30 {
			c.do(context.Background(), "GET", nil)
		}
		if got := c.states.get("svc", nil); got != st {
			t.Fatal("a reload replaced the service's state")
		}
		if bad != 2 {
			t.Fatalf("after the reload the ejected endpoint was called %d more times, want 0", bad-2)
		}
		if ej := st.outliers.ejectedList(time.Now()); len(ej) != 1 || ej[0].Addr != "10.0.0.1:80" {
			t.Fatalf("ejected after the reload: %+v, want 10.0.0.1:80", ej)
		}
		if after, _ := st.budget.usage(time.Now()); after != requests+30 {
			t.Fatalf("retry budget counts %d requests after 30 more, want %d: its window was reset", after, requests+30)
		}
		if got := *st.breaker.Load().settings.ConsecutiveFailures; got != 50000 {
			t.Fatalf("breaker built with consecutiveFailures %d, want the reloaded 50000", got)
		}
	})
}

// A request keeps the policy it started with: a reload that shortens the
// timeout does not cut a request already in flight, and applies to the
// next one.
func TestReloadSparesRequestsInFlight(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		store := policy.NewStore(policy.StoreOptions{})
		reload(t, store, "service: svc\ntimeout: 5s\nretry: {attempts: 1}\n")
		c := newTestChainWith(t, store, []string{"10.0.0.1:80"}, func(r *http.Request) (*http.Response, error) {
			select {
			case <-time.After(time.Second):
				return answer(200), nil
			case <-r.Context().Done():
				return nil, r.Context().Err()
			}
		})
		inFlight := make(chan string, 1)
		go func() {
			code, reason := c.do(context.Background(), "GET", nil)
			inFlight <- http.StatusText(code) + " " + reason
		}()
		synctest.Wait() // the request waits at the upstream
		reload(t, store, "service: svc\ntimeout: 200ms\nretry: {attempts: 1}\n")
		if got := <-inFlight; got != "OK " {
			t.Fatalf("the request in flight during the reload got %q, want the upstream's OK after 1s", got)
		}
		start := time.Now()
		if code, reason := c.do(context.Background(), "GET", nil); code != 504 || reason != forward.ReasonUpstreamTimeout || time.Since(start) != 200*time.Millisecond {
			t.Fatalf("the next request: %d %q after %v, want 504 upstream_timeout after 200ms", code, reason, time.Since(start))
		}
	})
}
