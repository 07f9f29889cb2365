package outbound_test

import (
	"net/http"
	"testing"

	"github.com/sidecar-mesh/sidecar/internal/faultserver"
)

const noRetries = "retry: {attempts: 1}\n"

// An endpoint failing consecutiveFailures times in a row is ejected: it gets
// no more traffic while the others serve every call.
func TestOutlierEjection(t *testing.T) {
	bad, good1, good2 := flaky(t, 1), flaky(t, 0), flaky(t, 0)
	sc := startSidecar(t, options{static: map[string][]string{"svc": {bad.Addr(), good1.Addr(), good2.Addr()}},
		policies: "service: svc\n" + noRetries + noBreaker + "outlierDetection: {consecutiveFailures: 5, ejectionTime: 1m}\n"})
	ok := successRate(t, sc, http.MethodGet, 300, "")
	if n := bad.Requests(); n != 5 {
		t.Fatalf("the failing endpoint got %d requests, want exactly 5 before its ejection", n)
	}
	if ok != 300-5 {
		t.Fatalf("%d of 300 succeeded, want all but the 5 that ejected the endpoint", ok)
	}
	st := sc.proxy.Status()
	if len(st) != 1 || st[0].Service != "svc" || len(st[0].Ejected) != 1 || st[0].Ejected[0].Addr != bad.Addr() ||
		st[0].Breaker.State != "closed" || st[0].RetryBudget.Requests != 300 || st[0].InFlight != 0 {
		t.Fatalf("Status() = %+v, want svc with %s ejected, breaker closed, 300 requests, none in flight", st, bad.Addr())
	}
}

// Never more than maxEjectionPercent is ejected, and never the last
// endpoint: with all four failing and a 50% cap, two keep taking traffic.
func TestOutlierEjectionCap(t *testing.T) {
	var ups []*faultserver.Server
	var addrs []string
	for range 4 {
		u := flaky(t, 1)
		ups = append(ups, u)
		addrs = append(addrs, u.Addr())
	}
	sc := startSidecar(t, options{static: map[string][]string{"svc": addrs},
		policies: "service: svc\n" + noRetries + noBreaker + "outlierDetection: {consecutiveFailures: 3, ejectionTime: 1m, maxEjectionPercent: 50}\n"})
	successRate(t, sc, http.MethodGet, 200, "")
	ejected, serving := 0, 0
	for _, u := range ups {
		switch n := u.Requests(); {
		case n == 3:
			ejected++
		case n > 3:
			serving++
		}
	}
	if ejected != 2 || serving != 2 {
		t.Fatalf("%d endpoints ejected and %d serving, want 2 and 2 under a 50%% cap", ejected, serving)
	}

	one := flaky(t, 1)
	sc1 := startSidecar(t, options{static: map[string][]string{"svc": {one.Addr()}},
		policies: "service: svc\n" + noRetries + noBreaker + "outlierDetection: {consecutiveFailures: 1, maxEjectionPercent: 100}\n"})
	successRate(t, sc1, http.MethodGet, 20, "")
	if n := one.Requests(); n != 20 {
		t.Fatalf("a lone failing endpoint got %d of 20 calls, want all: the last endpoint is never ejected", n)
	}
}
