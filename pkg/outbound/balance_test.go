package outbound_test

import (
	"fmt"
	"io"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Two real instances, one answering in 1 ms and one in 50 ms, under 8
// concurrent clients: round robin sends the slow one half the requests,
// least-request fewer (it holds requests longer), p2c-ewma under 10%.
func TestBalancersAgainstASlowInstance(t *testing.T) {
	fast := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(time.Millisecond) // the instance's own latency
		io.WriteString(w, "fast")
	})
	slow := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(50 * time.Millisecond) // the instance's own latency
		io.WriteString(w, "slow")
	})
	shares := map[string]float64{}
	for _, lb := range []string{"round-robin", "least-request", "p2c-ewma"} {
		sc := startSidecar(t, options{static: map[string][]string{"svc": {fast.addr(), slow.addr()}},
			policies: "service: svc\nloadBalancer: {policy: " + lb + "}\n"})
		c := sc.client(t)
		before := slow.requests.Load()
		const clients, each = 8, 60
		var wg sync.WaitGroup
		var failed atomic.Int64
		var mu sync.Mutex
		var took []time.Duration
		for range clients {
			wg.Go(func() {
				for range each {
					start := time.Now()
					req, _ := http.NewRequest("GET", "http://"+sc.addr+"/", nil)
					req.Host = "svc"
					resp, err := c.Do(req)
					if err != nil {
						failed.Add(1)
						continue
					}
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode != 200 {
						failed.Add(1)
					}
					mu.Lock()
					took = append(took, time.Since(start))
					mu.Unlock()
				}
			})
		}
		wg.Wait()
		if n := failed.Load(); n > 0 {
			t.Fatalf("%s: %d requests failed", lb, n)
		}
		slices.Sort(took)
		shares[lb] = float64(slow.requests.Load()-before) / float64(clients*each)
		// The admin API's view: the policy, and every attempt counted on
		// the endpoint it went to.
		for _, st := range sc.proxy.Status() {
			if st.Service != "svc" {
				continue
			}
			b := st.Balancer
			if b == nil || b.Policy != lb || len(b.Endpoints) != 2 || b.Endpoints[0].Picks+b.Endpoints[1].Picks != clients*each {
				t.Errorf("%s: /resilience balancer %+v; want the policy and %d picks", lb, b, clients*each)
			} else if lb == "p2c-ewma" && (b.Endpoints[0].LatencyMs <= 0 || b.Endpoints[1].LatencyMs <= 0) {
				t.Errorf("p2c-ewma: /resilience shows no latency estimates: %+v", b.Endpoints)
			}
		}
		t.Logf("%s: %.1f%% of %d requests to the slow instance, p99 %v", lb, 100*shares[lb], clients*each,
			took[len(took)*99/100].Round(100*time.Microsecond))
	}
	if s := shares["round-robin"]; s < 0.4 || s > 0.6 {
		t.Errorf("round robin sent %.1f%% to the slow instance; want about half", 100*s)
	}
	if shares["least-request"] >= shares["round-robin"]-0.1 {
		t.Errorf("least-request sent %.1f%% to the slow instance, round robin %.1f%%: want clearly less", 100*shares["least-request"], 100*shares["round-robin"])
	}
	if s := shares["p2c-ewma"]; s >= 0.10 {
		t.Errorf("p2c-ewma sent %s to the slow instance; want under 10%%", fmt.Sprintf("%.1f%%", 100*s))
	}
}
