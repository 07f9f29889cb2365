package outbound_test

import (
	"math/rand/v2"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// noBreaker keeps the circuit breaker out of tests about retries.
const noBreaker = "circuitBreaker: {consecutiveFailures: 100000, minRequests: 1000000}\n"

// noOutliers keeps outlier ejection out of tests that need a flaky instance
// to stay in rotation.
const noOutliers = "outlierDetection: {consecutiveFailures: 100000}\n"

// fastRetries keeps backoff from dominating the tests' run time.
const fastRetries = "retry: {backoff: {base: 1ms, max: 2ms}}\n"

// flaky returns an upstream that answers 503 to a share of GETs and POSTs,
// counting every request it executes.
func flaky(t *testing.T, failShare float64) *upstream {
	return newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if rand.Float64() < failShare {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("ok"))
	})
}

func successRate(t *testing.T, sc *sidecar, method string, calls int) (ok int) {
	t.Helper()
	c := sc.client(t)
	for range calls {
		var req *http.Request
		if method == http.MethodGet {
			req, _ = http.NewRequest(method, "http://svc/", nil)
		} else {
			req, _ = http.NewRequest(method, "http://svc/", strings.NewReader("x"))
		}
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode == 200 {
			ok++
		}
	}
	return ok
}

// Three instances, one failing half its calls: retries lift GET success
// from about 83% to at least 99.9%.
func TestRetriesMaskAFlakyInstance(t *testing.T) {
	bad, good1, good2 := flaky(t, 0.5), flaky(t, 0), flaky(t, 0)
	addrs := []string{bad.addr(), good1.addr(), good2.addr()}
	const calls = 5000

	with := startSidecar(t, options{static: map[string][]string{"svc": addrs}, policies: "service: svc\n" + fastRetries + noBreaker})
	if ok := successRate(t, with, http.MethodGet, calls); ok < calls*999/1000 {
		t.Fatalf("with retries: %d of %d GETs succeeded, want at least 99.9%%", ok, calls)
	}
	without := startSidecar(t, options{static: map[string][]string{"svc": addrs}, policies: "service: svc\nretry: {attempts: 1}\n" + noBreaker + noOutliers})
	if ok := successRate(t, without, http.MethodGet, calls); ok > calls*90/100 {
		t.Fatalf("without retries: %d of %d GETs succeeded; want about 83%%, or the flaky instance isn't flaky", ok, calls)
	}
}

// A POST without an Idempotency-Key is executed exactly once per request,
// however its attempt failed; with the key it is retried.
func TestPOSTNotRetriedWithoutIdempotencyKey(t *testing.T) {
	bad := flaky(t, 0.5)
	sc := startSidecar(t, options{static: map[string][]string{"svc": {bad.addr()}}, policies: "service: svc\n" + noBreaker})
	const calls = 1000
	successRate(t, sc, http.MethodPost, calls)
	if n := bad.requests.Load(); n != calls {
		t.Fatalf("upstream executed %d POSTs for %d requests, want exactly %d", n, calls, calls)
	}

	c := sc.client(t)
	ok := 0
	for range 200 {
		req, _ := http.NewRequest(http.MethodPost, "http://svc/", strings.NewReader("x"))
		req.Header.Set("Idempotency-Key", "k")
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode == 200 {
			ok++
		}
	}
	if ok < 150 { // 1 - 0.5^3 = 87.5% expected
		t.Fatalf("POST with an Idempotency-Key: %d of 200 succeeded, want retries to lift it near 87%%", ok)
	}
}

// A retry goes to another endpoint: with one instance always failing and
// two attempts, every call succeeds.
func TestRetryPrefersAnotherEndpoint(t *testing.T) {
	bad, good := flaky(t, 1), flaky(t, 0)
	sc := startSidecar(t, options{static: map[string][]string{"svc": {bad.addr(), good.addr()}},
		policies: "service: svc\nretry: {attempts: 2, budget: {ratio: 1}, backoff: {base: 1ms, max: 2ms}}\n" + noBreaker})
	if ok := successRate(t, sc, http.MethodGet, 500); ok != 500 {
		t.Fatalf("%d of 500 succeeded, want all: a retry must not return to the failed endpoint", ok)
	}
}

// A slow attempt is cut by the per-try timeout and retried elsewhere.
func TestPerTryTimeoutRetries(t *testing.T) {
	slow := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-time.After(2 * time.Second):
		case <-r.Context().Done():
		}
	})
	fast := flaky(t, 0)
	sc := startSidecar(t, options{static: map[string][]string{"svc": {slow.addr(), fast.addr()}},
		policies: "service: svc\ntimeout: 5s\nretry: {attempts: 2, perTryTimeout: 100ms, on: [timeout, reset], budget: {ratio: 1}}\n" + noBreaker})
	if ok := successRate(t, sc, http.MethodGet, 20); ok != 20 {
		t.Fatalf("%d of 20 succeeded, want all", ok)
	}
}

// With every instance refusing connections, retries stay within the
// budget: attempts <= requests * (1 + ratio) + the floor of the window.
func TestRetryBudgetWhenAllDown(t *testing.T) {
	var dead []string
	for range 3 {
		ln, _ := net.Listen("tcp", "127.0.0.1:0")
		dead = append(dead, ln.Addr().String())
		ln.Close()
	}
	sc := startSidecar(t, options{static: map[string][]string{"svc": dead},
		policies: "service: svc\nretry: {attempts: 5, backoff: {base: 1ms, max: 2ms}, budget: {ratio: 0.2, minPerSecond: 10}}\n" + noBreaker})
	c := sc.client(t)
	var requests atomic.Int64
	for end := time.Now().Add(2 * time.Second); time.Now().Before(end); {
		resp, err := c.Get("http://svc/")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		requests.Add(1)
		if resp.StatusCode != http.StatusBadGateway {
			t.Fatalf("status %d, want 502", resp.StatusCode)
		}
	}
	n, attempts := requests.Load(), sc.dials.Load()
	limit := n + (n+4)/5 + 10*10 // a retry is allowed while under the bound
	t.Logf("%d requests, %d attempts (limit %d)", n, attempts, limit)
	if attempts > limit {
		t.Fatalf("%d attempts for %d requests, want at most %d: retries multiplied the load", attempts, n, limit)
	}
}
