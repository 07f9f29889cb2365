package outbound_test

import (
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// An open breaker answers 503 circuit_open without any upstream attempt;
// after openDuration, half-open lets exactly halfOpenRequests probes through.
func TestCircuitBreaker(t *testing.T) {
	var mu sync.Mutex
	status := http.StatusServiceUnavailable
	release := make(chan struct{})
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/probe" {
			<-release // hold probes so they overlap
		}
		mu.Lock()
		defer mu.Unlock()
		w.WriteHeader(status)
	})
	sc := startSidecar(t, options{static: map[string][]string{"svc": {up.addr()}}, policies: `
service: svc
retry: {attempts: 1}
circuitBreaker: {consecutiveFailures: 5, openDuration: 300ms, halfOpenRequests: 2, minRequests: 1000}
`})
	c := sc.client(t)
	for i := range 5 {
		if resp, _ := sc.get(t, c, "svc", "/"); resp.StatusCode != 503 || resp.Header.Get("X-Sidecar-Error") != "" {
			t.Fatalf("call %d: %d %q, want the upstream's own 503", i, resp.StatusCode, resp.Header.Get("X-Sidecar-Error"))
		}
	}
	before := up.requests.Load()
	for i := range 20 {
		resp, _ := sc.get(t, c, "svc", "/")
		if resp.StatusCode != 503 || resp.Header.Get("X-Sidecar-Error") != "circuit_open" {
			t.Fatalf("call %d after 5 failures: %d %q, want 503 circuit_open", i, resp.StatusCode, resp.Header.Get("X-Sidecar-Error"))
		}
	}
	if n := up.requests.Load() - before; n != 0 {
		t.Fatalf("an open breaker let %d requests reach the upstream, want 0", n)
	}

	mu.Lock()
	status = http.StatusOK
	mu.Unlock()
	time.Sleep(400 * time.Millisecond) // past openDuration: half-open
	before = up.requests.Load()
	var wg sync.WaitGroup
	codes := make(chan string, 10)
	for range 10 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, _ := sc.get(t, c, "svc", "/probe")
			codes <- resp.Header.Get("X-Sidecar-Error")
		}()
	}
	// Eight of the ten are refused at once; two are held at the upstream.
	refused := 0
	for refused < 8 {
		if reason := <-codes; reason == "circuit_open" {
			refused++
		} else {
			t.Fatalf("a half-open breaker answered %q before its probes finished", reason)
		}
	}
	close(release)
	wg.Wait()
	close(codes)
	for reason := range codes {
		if reason != "" {
			t.Fatalf("probe answered %q, want the upstream's 200", reason)
		}
	}
	if n := up.requests.Load() - before; n != 2 {
		t.Fatalf("half-open let %d probes through, want exactly 2", n)
	}
	if resp, _ := sc.get(t, c, "svc", "/"); resp.StatusCode != 200 {
		t.Fatalf("after successful probes: %d, want the breaker closed and 200", resp.StatusCode)
	}
}

// A 200 ms policy timeout against a 1 s upstream gives 504 upstream_timeout
// after one attempt.
func TestPolicyTimeout(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-time.After(time.Second):
		case <-r.Context().Done():
		}
	})
	sc := startSidecar(t, options{static: map[string][]string{"svc": {up.addr()}}, policies: "service: svc\ntimeout: 200ms\n"})
	resp, body := sc.get(t, sc.client(t), "svc", "/")
	if resp.StatusCode != 504 || resp.Header.Get("X-Sidecar-Error") != "upstream_timeout" {
		t.Fatalf("got %d %q %s, want 504 upstream_timeout", resp.StatusCode, resp.Header.Get("X-Sidecar-Error"), body)
	}
	if n := up.requests.Load(); n != 1 {
		t.Fatalf("%d upstream attempts, want 1", n)
	}
}

// Over concurrency.maxInFlight with no line (maxQueued: 0), a request is
// refused at once with 503 overloaded.
func TestConcurrencyLimit(t *testing.T) {
	hold := make(chan struct{})
	arrived := make(chan struct{}, 2)
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		arrived <- struct{}{}
		<-hold
	})
	sc := startSidecar(t, options{static: map[string][]string{"svc": {up.addr()}}, policies: "service: svc\nconcurrency: {maxInFlight: 2, maxQueued: 0}\n"})
	c := sc.client(t)
	var wg sync.WaitGroup
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if resp, _ := sc.get(t, c, "svc", "/"); resp.StatusCode != 200 {
				t.Errorf("held request: %d", resp.StatusCode)
			}
		}()
	}
	<-arrived
	<-arrived
	resp, _ := sc.get(t, c, "svc", "/")
	if resp.StatusCode != 503 || resp.Header.Get("X-Sidecar-Error") != "overloaded" {
		t.Fatalf("third concurrent request: %d %q, want 503 overloaded", resp.StatusCode, resp.Header.Get("X-Sidecar-Error"))
	}
	close(hold)
	wg.Wait()
	if resp, _ := sc.get(t, c, "svc", "/"); resp.StatusCode != 200 {
		t.Fatalf("after the held requests finished: %d, want 200 (slots released)", resp.StatusCode)
	}
	if n := up.requests.Load(); n != 3 {
		t.Fatalf("upstream saw %d requests, want 3", n)
	}
}

// With concurrency.maxQueued, requests over the limit wait for a slot in
// line and all get through; past the line's room they are refused at once.
func TestConcurrencyQueue(t *testing.T) {
	hold := make(chan struct{})
	var arrived atomic.Int32
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if arrived.Add(1) == 1 {
			<-hold
		}
	})
	sc := startSidecar(t, options{static: map[string][]string{"svc": {up.addr()}},
		policies: "service: svc\nconcurrency: {maxInFlight: 1, maxQueued: 3, queueTimeout: 30s}\n"})
	c := sc.client(t)
	var wg sync.WaitGroup
	var ok atomic.Int32
	get := func() {
		defer wg.Done()
		if resp, _ := sc.get(t, c, "svc", "/"); resp.StatusCode == 200 {
			ok.Add(1)
		} else {
			t.Errorf("queued request: %d %s", resp.StatusCode, resp.Header.Get("X-Sidecar-Error"))
		}
	}
	wg.Add(1)
	go get()
	for arrived.Load() == 0 {
		time.Sleep(time.Millisecond) // the first request holds the slot
	}
	for range 3 {
		wg.Add(1)
		go get()
	}
	for sc.proxy.Status()[0].Queued != 3 {
		time.Sleep(time.Millisecond) // three wait in line
	}
	resp, _ := sc.get(t, c, "svc", "/")
	if resp.StatusCode != 503 || resp.Header.Get("X-Sidecar-Error") != "overloaded" {
		t.Fatalf("fifth request with the line full: %d %q, want 503 overloaded", resp.StatusCode, resp.Header.Get("X-Sidecar-Error"))
	}
	close(hold)
	wg.Wait()
	if ok.Load() != 4 || up.requests.Load() != 4 {
		t.Fatalf("%d of 4 requests succeeded, upstream saw %d; want 4 and 4", ok.Load(), up.requests.Load())
	}
}
