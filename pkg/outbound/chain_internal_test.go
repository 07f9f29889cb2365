package outbound

// Unit tests of the resilience chain on a fake clock: each runs in a
// testing/synctest bubble, where time.Now, timers and context deadlines
// (the breaker's too) are virtual and move only when every goroutine of the
// bubble is blocked. The transport is a function; everything above it is
// the real chain.

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/forward"
	"github.com/sidecar-mesh/sidecar/pkg/policy"
)

type rtFunc func(*http.Request) (*http.Response, error)

func (f rtFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

func answer(status int) *http.Response {
	return &http.Response{StatusCode: status, Header: http.Header{}, Body: io.NopCloser(strings.NewReader(""))}
}

// countingObserver counts what the chain reports.
type countingObserver struct {
	mu          sync.Mutex
	retries     map[string]int
	exhausted   int
	transitions []string
	ejections   int
	shed        map[string]int
	cut         map[string]int // streams cut, by reason
	hedges      int
	hedgesWon   int
}

func (o *countingObserver) Retried(_, reason string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.retries[reason]++
}
func (o *countingObserver) RetryBudgetExhausted(string) { o.mu.Lock(); o.exhausted++; o.mu.Unlock() }
func (o *countingObserver) BreakerStateChanged(_, from, to string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.transitions = append(o.transitions, from+">"+to)
}
func (o *countingObserver) EndpointEjected(string)      { o.mu.Lock(); o.ejections++; o.mu.Unlock() }
func (o *countingObserver) Attempted(string)            {}
func (o *countingObserver) EndpointRefused(_, _ string) {}

func (o *countingObserver) Shed(_, reason string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.shed[reason]++
}

func (o *countingObserver) Hedged(string)   { o.mu.Lock(); o.hedges++; o.mu.Unlock() }
func (o *countingObserver) HedgeWon(string) { o.mu.Lock(); o.hedgesWon++; o.mu.Unlock() }

func (o *countingObserver) StreamCut(_, reason string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.cut[reason]++
}

// testChain is the chain of calls to service "svc" on the given endpoints,
// from the concurrency limits on (no telemetry, no local-reply mapping),
// over a fake transport.
type testChain struct {
	rt       http.RoundTripper
	chain    *chain
	states   *stateRegistry
	observer *countingObserver
	calls    atomic.Int64
	// connectTimeout is the connect timeout the transport was last given.
	connectTimeout atomic.Int64
}

func newTestChain(t *testing.T, policies string, endpoints []string, transport rtFunc) *testChain {
	t.Helper()
	ps, err := policy.Parse([]byte(policies), "test")
	if err != nil {
		t.Fatal(err)
	}
	return newTestChainWith(t, NewStaticPolicies(ps), endpoints, transport)
}

// newTestChainWith is newTestChain with the policies given as a source.
func newTestChainWith(t *testing.T, policies Policies, endpoints []string, transport rtFunc) *testChain {
	t.Helper()
	static, err := discovery.NewStatic(map[string][]string{"svc": endpoints})
	if err != nil {
		t.Fatal(err)
	}
	c := &testChain{observer: &countingObserver{retries: map[string]int{}, shed: map[string]int{}, cut: map[string]int{}}}
	c.states = &stateRegistry{observer: c.observer, log: slog.New(slog.DiscardHandler), policies: policies}
	c.chain = &chain{policies: policies, states: c.states, observer: c.observer, log: slog.New(slog.DiscardHandler),
		maxInFlight: DefaultMaxInFlight,
		send: func(r *http.Request, connectTimeout time.Duration) (*http.Response, error) {
			c.calls.Add(1)
			c.connectTimeout.Store(int64(connectTimeout))
			return transport(r)
		}}
	c.rt = rtFunc(func(r *http.Request) (*http.Response, error) {
		set, err := static.Resolve(r.Context(), "svc")
		if err != nil {
			return nil, err
		}
		return c.chain.limit(c.chain.open("svc", set), r)
	})
	return c
}

// do sends a GET for svc and returns the status, or the local error's reason.
func (c *testChain) do(ctx context.Context, method string, header http.Header) (int, string) {
	req, _ := http.NewRequestWithContext(ctx, method, "http://svc/", nil)
	for k, v := range header {
		req.Header[k] = v
	}
	resp, err := c.rt.RoundTrip(req)
	if err != nil {
		var le *forward.LocalError
		if errors.As(err, &le) {
			return le.Status, le.Reason
		}
		return 0, err.Error()
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	_ = resp.Body.Close()
	return resp.StatusCode, ""
}

// The breaker opens after consecutiveFailures, answers circuit_open without
// a transport call for exactly openDuration, then admits exactly
// halfOpenRequests probes, and closes when they succeed.
func TestBreakerCycle(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var healthy atomic.Bool
		hold := make(chan struct{})
		c := newTestChain(t, `
service: svc
retry: {attempts: 1}
circuitBreaker: {consecutiveFailures: 5, openDuration: 30s, halfOpenRequests: 2}
`, []string{"10.0.0.1:80"}, func(r *http.Request) (*http.Response, error) {
			if healthy.Load() {
				<-hold
				return answer(200), nil
			}
			return answer(503), nil
		})
		ctx := context.Background()
		for range 5 {
			if code, reason := c.do(ctx, "GET", nil); code != 503 || reason != "" {
				t.Fatalf("before tripping: %d %q, want the upstream's 503", code, reason)
			}
		}
		time.Sleep(30 * time.Second)
		if code, reason := c.do(ctx, "GET", nil); code != 503 || reason != forward.ReasonCircuitOpen {
			t.Fatalf("when openDuration ends: %d %q, want 503 circuit_open", code, reason)
		}
		if n := c.calls.Load(); n != 5 {
			t.Fatalf("%d transport calls, want 5: an open breaker must not touch the network", n)
		}

		time.Sleep(time.Millisecond)
		healthy.Store(true)
		results := make(chan string, 10)
		for range 10 {
			go func() {
				_, reason := c.do(ctx, "GET", nil)
				results <- reason
			}()
		}
		synctest.Wait() // every request has been refused or is held at the transport
		if n := c.calls.Load() - 5; n != 2 {
			t.Fatalf("half-open let %d probes through, want exactly 2", n)
		}
		for range 8 {
			if reason := <-results; reason != forward.ReasonCircuitOpen {
				t.Fatalf("a request beyond the probes got %q, want circuit_open", reason)
			}
		}
		close(hold)
		for range 2 {
			if reason := <-results; reason != "" {
				t.Fatalf("probe: %q, want the upstream's answer", reason)
			}
		}
		if code, _ := c.do(ctx, "GET", nil); code != 200 {
			t.Fatalf("after two good probes: %d, want the breaker closed", code)
		}
		want := "closed>open open>half-open half-open>closed"
		if got := strings.Join(c.observer.transitions, " "); got != want {
			t.Fatalf("transitions %q, want %q", got, want)
		}
		if c.observer.shed[forward.ReasonCircuitOpen] != 9 {
			t.Fatalf("%d requests counted as shed by the breaker, want 9", c.observer.shed[forward.ReasonCircuitOpen])
		}
	})
}

// A result that comes back after the breaker moved on (from an attempt
// started in an older generation) changes nothing; client cancellations and
// 4xx answers are not failures.
func TestBreakerIgnoresLateAndClientOutcomes(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		slow := make(chan struct{})
		var mode atomic.Value
		mode.Store("fail")
		c := newTestChain(t, `
service: svc
retry: {attempts: 1}
circuitBreaker: {consecutiveFailures: 3, openDuration: 10s, halfOpenRequests: 1}
`, []string{"10.0.0.1:80"}, func(r *http.Request) (*http.Response, error) {
			switch r.URL.Path {
			case "/slow":
				<-slow
				return answer(503), nil
			case "/wait":
				<-r.Context().Done()
				return nil, r.Context().Err()
			}
			switch mode.Load() {
			case "ok":
				return answer(200), nil
			case "4xx":
				return answer(404), nil
			}
			return answer(503), nil
		})
		ctx := context.Background()
		late := make(chan struct{})
		go func() {
			defer close(late)
			req, _ := http.NewRequest("GET", "http://svc/slow", nil)
			if resp, err := c.rt.RoundTrip(req); err == nil {
				resp.Body.Close()
			}
		}()
		synctest.Wait()
		for range 3 {
			c.do(ctx, "GET", nil)
		}
		time.Sleep(10*time.Second + time.Millisecond)
		mode.Store("ok")
		if code, _ := c.do(ctx, "GET", nil); code != 200 {
			t.Fatalf("half-open probe: %d, want 200 and the breaker closed", code)
		}
		close(slow) // the old generation's failure arrives now
		<-late
		st := c.states.get("svc", nil)
		if got := st.breaker.Load().Counts().ConsecutiveFailures; got != 0 || st.breaker.Load().State().String() != "closed" {
			t.Fatalf("after a late failure: %s with %d consecutive failures, want closed with 0", st.breaker.Load().State(), got)
		}

		mode.Store("4xx")
		for range 10 {
			c.do(ctx, "GET", nil)
		}
		cctx, cancel := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() {
			defer close(done)
			req, _ := http.NewRequestWithContext(cctx, "GET", "http://svc/wait", nil)
			_, _ = c.rt.RoundTrip(req)
		}()
		synctest.Wait()
		cancel()
		<-done
		if got := st.breaker.Load().Counts().TotalFailures; got != 0 {
			t.Fatalf("404s and a client cancellation counted %d failures, want 0", got)
		}
	})
}

// The overall timeout covers every attempt and backoff: with a 200 ms
// timeout, a 150 ms per-try timeout and an upstream that never answers, the
// request ends in 504 at 200 ms and no attempt starts once the deadline
// can't be met.
func TestDeadlineAcrossAttempts(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		start := time.Now()
		var starts []time.Duration
		c := newTestChain(t, `
service: svc
timeout: 200ms
retry: {attempts: 5, perTryTimeout: 150ms, on: [timeout], backoff: {base: 25ms, max: 25ms}}
`, []string{"10.0.0.1:80", "10.0.0.2:80"}, func(r *http.Request) (*http.Response, error) {
			starts = append(starts, time.Since(start))
			<-r.Context().Done()
			return nil, r.Context().Err()
		})
		code, reason := c.do(context.Background(), "GET", nil)
		if code != 504 || reason != forward.ReasonUpstreamTimeout {
			t.Fatalf("got %d %q, want 504 upstream_timeout", code, reason)
		}
		if d := time.Since(start); d != 200*time.Millisecond {
			t.Fatalf("answered after %v, want exactly the 200ms timeout", d)
		}
		if len(starts) != 2 || starts[0] != 0 || starts[1] < 150*time.Millisecond || starts[1] > 175*time.Millisecond {
			t.Fatalf("attempts started at %v, want two: at 0 and after the first per-try timeout plus at most 25ms backoff", starts)
		}
		time.Sleep(time.Second)
		if len(starts) != 2 {
			t.Fatalf("an attempt started after the deadline: %v", starts)
		}
	})
}

// An upstream told the attempt's deadline (grpc-timeout) resets the stream
// when it passes, and its reset can arrive before this side's timer runs:
// the attempt still failed for its per-try timeout, and is retried as one
// (the policy does not retry resets).
func TestUpstreamResetAtThePerTryDeadline(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		reset := errors.New("stream error: stream ID 1; CANCEL; received from peer")
		var calls atomic.Int64
		c := newTestChain(t, "service: svc\nretry: {attempts: 2, perTryTimeout: 150ms, on: [timeout]}\n",
			[]string{"10.0.0.1:80", "10.0.0.2:80"}, func(r *http.Request) (*http.Response, error) {
				dl, _ := r.Context().Deadline()
				if calls.Add(1) == 1 {
					time.Sleep(time.Until(dl)) // the upstream's own timer
					return nil, reset
				}
				return answer(200), nil
			})
		code, reason := c.do(context.Background(), "GET", nil)
		if code != 200 {
			t.Fatalf("got %d %q, want 200 from the retry", code, reason)
		}
		if n := c.calls.Load(); n != 2 {
			t.Fatalf("%d attempts, want 2", n)
		}
		if got := c.observer.retries["timeout"]; got != 1 {
			t.Fatalf("retries by reason %v, want one for timeout", c.observer.retries)
		}
	})
}

// The caller's own deadline wins over the policy's: a grpc-timeout of
// 100 ms against a 15 s policy timeout ends the request at 100 ms.
func TestCallerDeadlineWins(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := newTestChain(t, "service: svc\ntimeout: 15s\n", []string{"10.0.0.1:80"}, func(r *http.Request) (*http.Response, error) {
			<-r.Context().Done()
			return nil, r.Context().Err()
		})
		start := time.Now()
		code, reason := c.do(context.Background(), "GET", http.Header{"Grpc-Timeout": {"100m"}})
		if code != 504 || reason != forward.ReasonUpstreamTimeout || time.Since(start) != 100*time.Millisecond {
			t.Fatalf("got %d %q after %v, want 504 upstream_timeout after 100ms", code, reason, time.Since(start))
		}
		if n := c.calls.Load(); n != 1 {
			t.Fatalf("%d attempts, want 1", n)
		}
	})
}

func TestGRPCTimeout(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want time.Duration
		ok   bool
	}{
		{"100m", 100 * time.Millisecond, true},
		{"1S", time.Second, true},
		{"2H", 2 * time.Hour, true},
		{"5M", 5 * time.Minute, true},
		{"7u", 7 * time.Microsecond, true},
		{"99999999n", 99999999, true},
		{"99999999H", 1<<63 - 1, true},
		{"123456789S", 0, false},
		{"10", 0, false},
		{"S", 0, false},
		{"-1S", 0, false},
		{"1x", 0, false},
	} {
		got, ok := grpcTimeout(http.Header{"Grpc-Timeout": {tc.in}})
		if got != tc.want || ok != tc.ok {
			t.Errorf("grpcTimeout(%q) = %v, %v; want %v, %v", tc.in, got, ok, tc.want, tc.ok)
		}
	}
}

// With every instance failing for 10 s at 100 requests a second, retries
// stay within the budget: attempts <= requests * (1 + ratio) + the floor
// over the window. Without the budget it would be 3 attempts a request.
func TestRetryBudgetAllDown(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := newTestChain(t, `
service: svc
retry: {attempts: 3, backoff: {base: 1ms, max: 1ms}, budget: {ratio: 0.2, minPerSecond: 10}}
circuitBreaker: {consecutiveFailures: 100000, minRequests: 1000000}
outlierDetection: {consecutiveFailures: 100000}
`, []string{"10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"}, func(r *http.Request) (*http.Response, error) {
			return answer(503), nil
		})
		requests := 0
		start := time.Now()
		for end := start.Add(10 * time.Second); time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
			c.do(context.Background(), "GET", nil) // about 100 a second
			requests++
		}
		attempts := c.calls.Load()
		// A retry is taken while under the bound: ratio x requests, plus the
		// floor of every second the run touched (the last request's retries
		// can fall into an 11th).
		seconds := int64(time.Since(start)/time.Second) + 1
		limit := int64(requests) + int64(requests+4)/5 + 10*seconds
		t.Logf("%d requests, %d attempts (%.3f a request; limit %d), %d retries refused by the budget",
			requests, attempts, float64(attempts)/float64(requests), limit, c.observer.exhausted)
		if attempts > limit {
			t.Fatalf("%d attempts for %d requests, want at most %d", attempts, requests, limit)
		}
		if int(attempts)-requests != c.observer.retries["503"] || c.observer.exhausted == 0 {
			t.Fatalf("observer saw %d retries and %d exhausted, want %d retries and some exhausted",
				c.observer.retries["503"], c.observer.exhausted, int(attempts)-requests)
		}
	})
}

// An endpoint is ejected after consecutive failures, for ejectionTime times
// the number of its ejections; it comes back when the time is up.
func TestEjectionTimeGrows(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		start := time.Now()
		var badCalls []time.Duration // when the failing endpoint was called
		c := newTestChain(t, `
service: svc
retry: {attempts: 1}
circuitBreaker: {consecutiveFailures: 100000, minRequests: 1000000}
outlierDetection: {consecutiveFailures: 2, ejectionTime: 10s}
`, []string{"10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"}, func(r *http.Request) (*http.Response, error) {
			if r.URL.Host == "10.0.0.1:80" {
				badCalls = append(badCalls, time.Since(start))
				return answer(503), nil
			}
			return answer(200), nil
		})
		for time.Since(start) < 45*time.Second { // ten requests a second
			c.do(context.Background(), "GET", nil)
			time.Sleep(100 * time.Millisecond)
		}
		// Two calls, ejected for 10s, two calls, ejected for 20s, two calls;
		// round robin over three returns to it within 300ms of its return.
		if len(badCalls) != 6 {
			t.Fatalf("the failing endpoint was called at %v, want 6 calls", badCalls)
		}
		for i, want := range map[int]time.Duration{2: 10 * time.Second, 4: 20 * time.Second} {
			if gap := badCalls[i] - badCalls[i-1]; gap < want || gap > want+300*time.Millisecond {
				t.Fatalf("calls at %v: gap before call %d is %v, want an ejection of %v", badCalls, i+1, gap, want)
			}
		}
		if c.observer.ejections != 3 {
			t.Fatalf("observer saw %d ejections, want 3", c.observer.ejections)
		}
	})
}

// Over the overall limit (all services together) a request is shed at once.
func TestOverallConcurrencyLimit(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		hold := make(chan struct{})
		c := newTestChain(t, "service: svc\n", []string{"10.0.0.1:80"}, func(r *http.Request) (*http.Response, error) {
			<-hold
			return answer(200), nil
		})
		c.chain.maxInFlight = 3
		codes := make(chan int, 5)
		for range 5 {
			go func() {
				code, _ := c.do(context.Background(), "GET", nil)
				codes <- code
			}()
		}
		synctest.Wait()
		if n := c.calls.Load(); n != 3 {
			t.Fatalf("%d requests reached the transport, want 3", n)
		}
		for range 2 {
			if code := <-codes; code != 503 {
				t.Fatalf("request over the limit: %d, want 503", code)
			}
		}
		close(hold)
		for range 3 {
			<-codes
		}
		if c.observer.shed[forward.ReasonOverloaded] != 2 || c.chain.inFlight.Load() != 0 {
			t.Fatalf("shed %d, in flight %d; want 2 and 0", c.observer.shed[forward.ReasonOverloaded], c.chain.inFlight.Load())
		}
	})
}

// The policy's connect timeout reaches the transport with each attempt.
func TestConnectTimeoutFromPolicy(t *testing.T) {
	c := newTestChain(t, "service: svc\nconnectTimeout: 250ms\n", []string{"10.0.0.1:80"}, func(r *http.Request) (*http.Response, error) {
		return answer(200), nil
	})
	c.do(context.Background(), "GET", nil)
	if got := time.Duration(c.connectTimeout.Load()); got != 250*time.Millisecond {
		t.Fatalf("the transport saw connect timeout %v, want 250ms", got)
	}
}
