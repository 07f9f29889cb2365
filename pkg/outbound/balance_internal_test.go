package outbound

import (
	"math/rand/v2"
	"testing"
	"testing/synctest"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/policy"
)

func lbPolicy(name string, slowStart time.Duration) *policy.LoadBalancer {
	ss := policy.Duration(slowStart)
	return &policy.LoadBalancer{Policy: &name, SlowStart: &ss}
}

func endpoints(weights ...int) *discovery.EndpointSet {
	set := &discovery.EndpointSet{Service: "svc"}
	for i, w := range weights {
		set.Endpoints = append(set.Endpoints, discovery.Endpoint{Addr: "10.0.0." + string(rune('1'+i)) + ":80", Weight: w})
	}
	return set
}

// Weights 3 and 1 split round robin exactly 3 to 1, without bursts: the
// light endpoint's turns are spread out.
func TestSmoothWeightedRoundRobin(t *testing.T) {
	set := endpoints(3, 1)
	var reg endpointRegistry
	b := newBalancer(set, set.Endpoints, lbPolicy(policy.RoundRobin, 0), &reg, time.Now(), true, nil)
	var o outliers
	counts := make([]int, 2)
	lastLight := -10
	for n := range 400 {
		i := b.pick(&o, nil, time.Now())
		counts[i]++
		if i == 1 {
			if n-lastLight < 4 {
				t.Fatalf("the weight-1 endpoint picked at %d and %d: a burst", lastLight, n)
			}
			lastLight = n
		}
	}
	if counts[0] != 300 || counts[1] != 100 {
		t.Fatalf("picks %v for weights 3 and 1, want [300 100]", counts)
	}
}

// Equal weights keep plain round robin; an ejected endpoint and the one to
// avoid are skipped.
func TestRoundRobinSkipsEjectedAndAvoided(t *testing.T) {
	set := endpoints(0, 0, 0)
	var reg endpointRegistry
	b := newBalancer(set, set.Endpoints, lbPolicy(policy.RoundRobin, 0), &reg, time.Now(), true, nil)
	var o outliers
	now := time.Now()
	o.endpoints = map[string]*endpointHealth{set.Endpoints[1].Addr: {ejectedUntil: now.Add(time.Hour)}}
	for range 30 {
		i := b.pick(&o, []string{set.Endpoints[0].Addr}, now)
		if i != 2 {
			t.Fatalf("picked %s; want the one neither ejected nor avoided", set.Endpoints[i].Addr)
		}
	}
}

// least-request sends to the endpoint with fewer requests in flight.
func TestLeastRequest(t *testing.T) {
	set := endpoints(0, 0)
	var reg endpointRegistry
	b := newBalancer(set, set.Endpoints, lbPolicy(policy.LeastRequest, 0), &reg, time.Now(), true, nil)
	b.stats[0].inFlight.Store(10)
	var o outliers
	for range 50 {
		if i := b.pick(&o, nil, time.Now()); i != 1 {
			t.Fatalf("picked the endpoint with 10 in flight over one with none")
		}
		b.stats[1].inFlight.Add(-1)
	}
}

// p2c-ewma sends a slow endpoint (50 ms) under 10% of the requests of a
// fast one (1 ms), with requests completing in their latency, and tries
// it again once its estimate has decayed.
func TestP2CEWMAAvoidsTheSlowEndpoint(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		set := endpoints(0, 0)
		var reg endpointRegistry
		b := newBalancer(set, set.Endpoints, lbPolicy(policy.P2CEWMA, 0), &reg, time.Now(), true, nil)
		latency := []time.Duration{time.Millisecond, 50 * time.Millisecond}
		var o outliers
		type pending struct {
			i   int
			end time.Time
		}
		var inflight []pending
		counts := make([]int, 2)
		// 8 requests in flight at a time, for 20 s of virtual time.
		for end := time.Now().Add(20 * time.Second); time.Now().Before(end); {
			for len(inflight) < 8 {
				i := b.pick(&o, nil, time.Now())
				counts[i]++
				inflight = append(inflight, pending{i, time.Now().Add(latency[i])})
			}
			// The first to finish.
			first := 0
			for k := range inflight {
				if inflight[k].end.Before(inflight[first].end) {
					first = k
				}
			}
			p := inflight[first]
			time.Sleep(time.Until(p.end))
			b.stats[p.i].inFlight.Add(-1)
			b.stats[p.i].observe(latency[p.i], time.Now())
			inflight = append(inflight[:first], inflight[first+1:]...)
		}
		total := counts[0] + counts[1]
		if share := float64(counts[1]) / float64(total); share >= 0.10 || counts[1] == 0 {
			t.Fatalf("the slow endpoint got %d of %d requests (%.1f%%); want some, under 10%%", counts[1], total, 100*share)
		}
	})
}

// A new endpoint's share ramps up over the slow start, from a tenth of
// its weight: not all at once.
func TestSlowStartRamps(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var reg endpointRegistry
		old := endpoints(0)
		newBalancer(old, old.Endpoints, lbPolicy(policy.RoundRobin, 0), &reg, time.Now(), true, nil)
		time.Sleep(time.Minute) // the first endpoint is long established
		set := endpoints(0, 0)
		b := newBalancer(set, set.Endpoints, lbPolicy(policy.RoundRobin, 10*time.Second), &reg, time.Now(), true, nil)
		var o outliers
		shares := make([]float64, 10)
		for s := range 10 {
			n := 0
			for range 1000 {
				if b.pick(&o, nil, time.Now()) == 1 {
					n++
				}
			}
			shares[s] = float64(n) / 1000
			time.Sleep(time.Second)
		}
		t.Logf("the new endpoint's share in each second of a 10s slow start: %v", shares)
		if shares[0] > 0.12 || shares[9] < 0.45 {
			t.Fatalf("the new endpoint's share per second %v: want about 0.09 at first, about half at the end", shares)
		}
		for s := 1; s < 10; s++ {
			if shares[s] < shares[s-1]-0.01 {
				t.Fatalf("share fell from %.3f to %.3f in second %d: %v", shares[s-1], shares[s], s, shares)
			}
			if shares[s]-shares[s-1] > 0.1 {
				t.Fatalf("share jumped from %.3f to %.3f in second %d: a step, not a ramp: %v", shares[s-1], shares[s], s, shares)
			}
		}
	})
}

// The balancers never pick an ejected endpoint while another is there,
// whatever the policy.
func TestBalancersSkipEjected(t *testing.T) {
	for _, name := range policy.LoadBalancers {
		set := endpoints(1, 2, 3, 1)
		var reg endpointRegistry
		b := newBalancer(set, set.Endpoints, lbPolicy(name, 0), &reg, time.Now(), true, nil)
		now := time.Now()
		var o outliers
		o.endpoints = map[string]*endpointHealth{set.Endpoints[2].Addr: {ejectedUntil: now.Add(time.Hour)}}
		for range 200 {
			i := b.pick(&o, []string{set.Endpoints[rand.IntN(4)].Addr}, now)
			if i == 2 {
				t.Fatalf("%s picked the ejected endpoint", name)
			}
			if b.learns() {
				b.stats[i].inFlight.Add(-1)
			}
		}
	}
}

// A retry of a call routed before discovery's last change is served on a
// balancer of its own: the service's current balancer stays, and so does
// when its endpoints joined (a slow start is not begun again).
func TestOlderSetLeavesTheBalancerAlone(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ch := &chain{}
		st := &serviceState{}
		p := policy.Effective("svc", map[string]policy.Policy{"svc": {Service: "svc", LoadBalancer: lbPolicy(policy.RoundRobin, 10*time.Second)}})
		old := endpoints(0)
		old.UpdatedAt = time.Now()
		time.Sleep(time.Second)
		cur := endpoints(0, 0)
		cur.UpdatedAt = time.Now()
		current := ch.balancer(&call{service: "svc", set: cur, policy: &p, state: st})
		joined := current.stats[1].since
		time.Sleep(time.Second)
		if b := ch.balancer(&call{service: "svc", set: old, policy: &p, state: st}); b == current || len(b.eps) != 1 {
			t.Fatalf("the older set's call got the current balancer")
		}
		if b := ch.balancer(&call{service: "svc", set: cur, policy: &p, state: st}); b != current || !b.stats[1].since.Equal(joined) {
			t.Fatalf("the current balancer was replaced, or its new endpoint's slow start begun again")
		}
	})
}

// A retry's (or a hedge's) pick takes no turn: with two endpoints and every
// request needing a second attempt, the first attempts still alternate,
// plain and weighted, instead of all starting at the same endpoint.
func TestRetryPicksTakeNoTurn(t *testing.T) {
	for _, weights := range [][]int{{0, 0}, {2, 2}} {
		set := endpoints(weights...)
		var reg endpointRegistry
		b := newBalancer(set, set.Endpoints, lbPolicy(policy.RoundRobin, 0), &reg, time.Now(), true, nil)
		var o outliers
		firsts := make([]int, 2)
		for range 40 {
			i := b.pick(&o, nil, time.Now())
			firsts[i]++
			if j := b.pick(&o, []string{set.Endpoints[i].Addr}, time.Now()); j == i {
				t.Fatalf("weights %v: the retry picked the endpoint it avoids", weights)
			}
		}
		if firsts[0] != 20 || firsts[1] != 20 {
			t.Errorf("weights %v: first attempts %v, want [20 20]", weights, firsts)
		}
	}
}
