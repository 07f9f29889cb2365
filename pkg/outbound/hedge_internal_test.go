package outbound

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/requestlog"
)

// Hedging is tested in testing/synctest bubbles: the delays are virtual,
// so each attempt's start and end are exact.

// endpointLatencies is a transport whose endpoints answer 200 after their
// latency (or with their status), or when the attempt is cancelled, with
// its error. It records each attempt's endpoint, start and end.
type endpointLatencies struct {
	latency map[string]time.Duration
	status  map[string]int
	mu      sync.Mutex
	log     []string // "endpoint start end outcome", in order of ending
}

func (e *endpointLatencies) send(r *http.Request) (*http.Response, error) {
	start := time.Now()
	host := r.URL.Host
	t := time.NewTimer(e.latency[host])
	defer t.Stop()
	note := func(outcome string) {
		e.mu.Lock()
		defer e.mu.Unlock()
		e.log = append(e.log, host+" "+start.Format("05.000")+" "+time.Now().Format("05.000")+" "+outcome)
	}
	select {
	case <-t.C:
		status := e.status[host]
		if status == 0 {
			status = 200
		}
		note(http.StatusText(status))
		return answer(status), nil
	case <-r.Context().Done():
		note("cancelled")
		return nil, r.Context().Err()
	}
}

// hedgeChain is a chain over the fake endpoints, and a way to send one
// request through it and see its call.
func hedgeChain(t *testing.T, doc string, e *endpointLatencies, endpoints ...string) (*testChain, func(method string, h http.Header) (*call, int, error)) {
	t.Helper()
	c := newTestChain(t, doc, endpoints, e.send)
	set := &discovery.EndpointSet{}
	for _, ep := range endpoints {
		set.Endpoints = append(set.Endpoints, discovery.Endpoint{Addr: ep, Weight: 1})
	}
	started := false
	send := func(method string, h http.Header) (*call, int, error) {
		req, _ := http.NewRequest(method, "http://svc/", nil)
		for k, v := range h {
			req.Header[k] = v
		}
		cl := c.chain.open("svc", set)
		if !started {
			// Round robin starts at the first endpoint, not at random.
			c.chain.balancer(cl).next.Store(^uint64(0))
			started = true
		}
		resp, err := c.chain.limit(cl, req)
		if err != nil {
			return cl, 0, err
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		_ = resp.Body.Close()
		return cl, resp.StatusCode, nil
	}
	return c, send
}

// notes lists a call's attempts as "endpoint outcome [reason]".
func notes(c *call) string {
	var out []string
	for i := range c.noted() {
		n := c.note(i + 1)
		s := n.endpoint + " " + outcome(n)
		if n.retryOf != "" {
			s += " [" + n.retryOf + "]"
		}
		out = append(out, s)
	}
	return strings.Join(out, "; ")
}

const hedgePolicy = `
service: svc
hedge: {delay: 20ms}
retry: {budget: {ratio: 1}}
loadBalancer: {policy: round-robin}
`

// A request to an endpoint that stalls is sent to another one after
// hedge.delay; the hedge's answer wins, and the stalled attempt is
// cancelled at that moment, not left to run.
func TestHedgeWinsOverAStall(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e := &endpointLatencies{latency: map[string]time.Duration{"10.0.0.1:80": 500 * time.Millisecond, "10.0.0.2:80": 5 * time.Millisecond}}
		c, send := hedgeChain(t, hedgePolicy, e, "10.0.0.1:80", "10.0.0.2:80")
		start := time.Now()
		cl, status, err := send("GET", nil)
		if err != nil || status != 200 {
			t.Fatalf("got %d %v, want the hedge's 200", status, err)
		}
		if took := time.Since(start); took != 25*time.Millisecond {
			t.Fatalf("answered after %v, want 25ms: the 20ms delay, then the other endpoint's 5ms", took)
		}
		want := "10.0.0.1:80 cancelled: another attempt answered first; 10.0.0.2:80 200 [hedge]"
		if got := notes(cl); got != want {
			t.Fatalf("attempts %q, want %q", got, want)
		}
		synctest.Wait()
		wantLog := "10.0.0.2:80 00.020 00.025 OK|10.0.0.1:80 00.000 00.025 cancelled"
		if got := strings.Join(e.log, "|"); got != wantLog {
			t.Fatalf("transport saw %q, want %q", got, wantLog)
		}
		if c.observer.hedges != 1 || c.observer.hedgesWon != 1 {
			t.Fatalf("hedges sent %d, won %d; want 1 and 1", c.observer.hedges, c.observer.hedgesWon)
		}
		if n := len(c.observer.retries); n != 0 {
			t.Fatalf("%d retries counted, want none: a hedge is no retry", n)
		}
		// A cancelled loser is no failure of its endpoint.
		if c.states.get("svc", c.chain.policies.For("svc")).outliers.ejected("10.0.0.1:80", time.Now()) {
			t.Fatal("the cancelled endpoint was ejected")
		}
	})
}

// An answer within the delay sends no hedge; the first attempt's answer
// wins over a hedge still out when it comes.
func TestHedgeOnlyAfterTheDelay(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e := &endpointLatencies{latency: map[string]time.Duration{"10.0.0.1:80": 19 * time.Millisecond, "10.0.0.2:80": 19 * time.Millisecond}}
		c, send := hedgeChain(t, hedgePolicy, e, "10.0.0.1:80", "10.0.0.2:80")
		for range 10 {
			if _, status, err := send("GET", nil); status != 200 || err != nil {
				t.Fatalf("got %d %v", status, err)
			}
		}
		if c.observer.hedges != 0 || c.calls.Load() != 10 {
			t.Fatalf("%d hedges, %d attempts for 10 answers within the delay; want 0 and 10", c.observer.hedges, c.calls.Load())
		}

		e.latency["10.0.0.1:80"] = 30 * time.Millisecond
		e.latency["10.0.0.2:80"] = 30 * time.Millisecond
		start := time.Now()
		cl, status, _ := send("GET", nil)
		if status != 200 || time.Since(start) != 30*time.Millisecond {
			t.Fatalf("got %d after %v, want the first attempt's 200 at 30ms", status, time.Since(start))
		}
		// Round robin: the eleventh request's first attempt goes to the
		// first endpoint, its hedge to the second.
		want := "10.0.0.1:80 200; 10.0.0.2:80 cancelled: another attempt answered first [hedge]"
		if got := notes(cl); got != want {
			t.Fatalf("attempts %q, want %q", got, want)
		}
		if c.observer.hedges != 1 || c.observer.hedgesWon != 0 {
			t.Fatalf("hedges sent %d, won %d; want 1 and 0", c.observer.hedges, c.observer.hedgesWon)
		}
	})
}

// Only idempotent requests are hedged, and only when there is another
// endpoint, the retry budget has a retry to give and retry.attempts has
// an attempt left.
func TestHedgeOnlyWhereARetryCouldGo(t *testing.T) {
	slow := map[string]time.Duration{"10.0.0.1:80": 100 * time.Millisecond, "10.0.0.2:80": 100 * time.Millisecond}
	for _, tc := range []struct {
		name      string
		doc       string
		method    string
		header    http.Header
		endpoints []string
		hedges    int
	}{
		{"GET", hedgePolicy, "GET", nil, []string{"10.0.0.1:80", "10.0.0.2:80"}, 1},
		{"POST", hedgePolicy, "POST", nil, []string{"10.0.0.1:80", "10.0.0.2:80"}, 0},
		{"POST with an Idempotency-Key", hedgePolicy, "POST", http.Header{"Idempotency-Key": {"k1"}}, []string{"10.0.0.1:80", "10.0.0.2:80"}, 1},
		{"one endpoint", hedgePolicy, "GET", nil, []string{"10.0.0.1:80"}, 0},
		{"no budget", "service: svc\nhedge: {delay: 20ms}\nretry: {budget: {ratio: 0, minPerSecond: 0}}", "GET", nil, []string{"10.0.0.1:80", "10.0.0.2:80"}, 0},
		{"retry.attempts 1", "service: svc\nhedge: {delay: 20ms}\nretry: {attempts: 1, budget: {ratio: 1}}", "GET", nil, []string{"10.0.0.1:80", "10.0.0.2:80"}, 0},
		{"hedge off", "service: svc\nretry: {budget: {ratio: 1}}", "GET", nil, []string{"10.0.0.1:80", "10.0.0.2:80"}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				e := &endpointLatencies{latency: slow}
				c, send := hedgeChain(t, tc.doc, e, tc.endpoints...)
				if _, status, err := send(tc.method, tc.header); status != 200 || err != nil {
					t.Fatalf("got %d %v", status, err)
				}
				if c.observer.hedges != tc.hedges || int(c.calls.Load()) != 1+tc.hedges {
					t.Fatalf("%d hedges, %d attempts; want %d and %d", c.observer.hedges, c.calls.Load(), tc.hedges, 1+tc.hedges)
				}
			})
		})
	}
}

// hedge.maxHedges hedges go one delay apart, each to an endpoint without an
// attempt out, and never past retry.attempts.
func TestHedgesOneDelayApart(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e := &endpointLatencies{latency: map[string]time.Duration{
			"10.0.0.1:80": time.Second, "10.0.0.2:80": time.Second, "10.0.0.3:80": time.Second, "10.0.0.4:80": 10 * time.Millisecond}}
		doc := "service: svc\nhedge: {delay: 20ms, maxHedges: 3}\nretry: {attempts: 3, budget: {ratio: 1}}"
		c, send := hedgeChain(t, doc, e, "10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80")
		start := time.Now()
		cl, status, _ := send("GET", nil)
		if status != 200 || time.Since(start) != time.Second {
			t.Fatalf("got %d after %v, want 200 after 1s: retry.attempts 3 allows two hedges, to the slow endpoints", status, time.Since(start))
		}
		synctest.Wait()
		want := "10.0.0.2:80 00.020 01.000 cancelled|10.0.0.3:80 00.040 01.000 cancelled|10.0.0.1:80 00.000 01.000 OK"
		if got := strings.Join(e.log, "|"); !sameSet(got, want) {
			t.Fatalf("transport saw %q, want %q", got, want)
		}
		if c.observer.hedges != 2 || cl.noted() != 3 {
			t.Fatalf("%d hedges, %d attempts noted; want 2 and 3", c.observer.hedges, cl.noted())
		}
	})
}

func sameSet(a, b string) bool {
	x, y := strings.Split(a, "|"), strings.Split(b, "|")
	if len(x) != len(y) {
		return false
	}
	seen := map[string]int{}
	for _, s := range x {
		seen[s]++
	}
	for _, s := range y {
		if seen[s]--; seen[s] < 0 {
			return false
		}
	}
	return true
}

// A failure that could be retried does not win while another attempt is
// out: the first attempt's 200 wins over the hedge's quick 503. Once no
// attempt is out, a retryable failure is retried as any attempt's.
func TestHedgeRetryableFailureWaitsForTheOthers(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e := &endpointLatencies{
			latency: map[string]time.Duration{"10.0.0.1:80": 100 * time.Millisecond, "10.0.0.2:80": time.Millisecond},
			status:  map[string]int{"10.0.0.2:80": 503},
		}
		c, send := hedgeChain(t, hedgePolicy, e, "10.0.0.1:80", "10.0.0.2:80")
		start := time.Now()
		cl, status, _ := send("GET", nil)
		if status != 200 || time.Since(start) != 100*time.Millisecond {
			t.Fatalf("got %d after %v, want the first attempt's 200 at 100ms", status, time.Since(start))
		}
		if want := "10.0.0.1:80 200; 10.0.0.2:80 503 [hedge]"; notes(cl) != want {
			t.Fatalf("attempts %q, want %q", notes(cl), want)
		}

		// Both fail: the last failure is retried (attempt 3), and the
		// retry is no hedge.
		e.status["10.0.0.1:80"] = 503
		e.latency["10.0.0.1:80"] = 30 * time.Millisecond
		cl, status, _ = send("GET", nil)
		if status != 503 || cl.noted() != 3 || c.observer.retries["503"] != 1 {
			t.Fatalf("got %d with attempts %q and %d retries; want 503 after 3 attempts, one a retry", status, notes(cl), c.observer.retries["503"])
		}
	})
}

// Hedging never sends more than the retry budget allows: at a ratio of
// 0.1 and no floor, 1,000 requests to a service whose every first attempt
// stalls send about 100 hedges, and no more.
func TestHedgesWithinTheBudget(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var mu sync.Mutex
		n := 0
		c := newTestChain(t, "service: svc\nhedge: {delay: 20ms}\nretry: {budget: {ratio: 0.1, minPerSecond: 0}}",
			[]string{"10.0.0.1:80", "10.0.0.2:80"}, func(r *http.Request) (*http.Response, error) {
				mu.Lock()
				n++
				mu.Unlock()
				select {
				case <-time.After(50 * time.Millisecond):
					return answer(200), nil
				case <-r.Context().Done():
					return nil, r.Context().Err()
				}
			})
		var wg sync.WaitGroup
		for range 1000 {
			wg.Go(func() { c.do(context.Background(), "GET", nil) })
			time.Sleep(time.Millisecond)
		}
		wg.Wait()
		// The window of 10 s holds every request: retries <= 0.1 x requests
		// seen when each hedge was asked for.
		if c.observer.hedges > 100 || c.observer.hedges < 90 || n != 1000+c.observer.hedges {
			t.Fatalf("%d hedges and %d attempts for 1000 requests; want 90 to 100 hedges, each one attempt", c.observer.hedges, n)
		}
		if c.observer.exhausted != 1000-c.observer.hedges {
			t.Fatalf("%d hedges refused by the budget, want %d", c.observer.exhausted, 1000-c.observer.hedges)
		}
	})
}

// A hedged request that failed is recorded with every attempt: the one
// cancelled as lost, the hedge with its reason; why it stopped is judged
// by the attempt whose answer the app got, not by the cancelled one.
func TestHedgedFailureRecorded(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e := &endpointLatencies{
			latency: map[string]time.Duration{"10.0.0.1:80": 500 * time.Millisecond, "10.0.0.2:80": time.Millisecond},
			status:  map[string]int{"10.0.0.2:80": 500},
		}
		c, _ := hedgeChain(t, hedgePolicy, e, "10.0.0.1:80", "10.0.0.2:80")
		rec := requestlog.New(requestlog.Config{})
		defer rec.Close()
		c.chain.recorder = rec
		set := &discovery.EndpointSet{Endpoints: []discovery.Endpoint{{Addr: "10.0.0.1:80", Weight: 1}, {Addr: "10.0.0.2:80", Weight: 1}}}
		cl := c.chain.open("svc", set)
		c.chain.balancer(cl).next.Store(^uint64(0))
		req, _ := http.NewRequest("GET", "http://svc/", nil)
		resp, err := c.chain.do(cl, req)
		if err != nil || resp.StatusCode != 500 {
			t.Fatalf("got %v %v, want the hedge's 500", resp, err)
		}
		resp.Body.Close()
		failed := rec.Failed("svc")
		if len(failed) != 1 {
			t.Fatalf("%d failed requests recorded, want 1", len(failed))
		}
		r := failed[0]
		var got []string
		for _, a := range r.Attempts {
			got = append(got, fmt.Sprintf("%s %s %q lost=%v", a.Endpoint, a.Outcome, a.Why(), a.Lost))
		}
		want := []string{
			`10.0.0.1:80 cancelled: another attempt answered first "" lost=true`,
			`10.0.0.2:80 500 "hedge: no answer yet within hedge.delay" lost=false`,
		}
		if !slices.Equal(got, want) {
			t.Fatalf("attempts\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
		}
		if w := r.StopWords(); w != "500 is not a retry.on condition" {
			t.Fatalf("stop %q, want the hedge's 500 judged", w)
		}
	})
}
