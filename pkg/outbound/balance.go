package outbound

import (
	"math"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/policy"
)

// balancer picks the endpoint of an attempt from one endpoint set under
// one load-balancing policy (loadBalancer in the policy):
//
//   - round-robin: in turn; smoothly weighted (nginx's algorithm: each
//     endpoint gains its weight, the one with the most is picked and pays
//     the total) when weights differ or a slow start is under way;
//   - least-request: of two endpoints drawn at random, the one with fewer
//     requests in flight per unit of weight (power of two choices, as
//     Envoy's);
//   - p2c-ewma: of two drawn at random, the lower peak-EWMA latency times
//     requests in flight, per unit of weight (Linkerd's balancer).
//
// Every policy skips ejected endpoints and the endpoint of the attempt
// before (when there is another), and honours the endpoints' weights and
// slow start. A balancer is built for each new endpoint set or policy;
// what it learns of each endpoint (requests in flight, latency, when it
// appeared) lives in the service's state, so that it outlives both. It
// never blocks but on its own short locks, and never does I/O.
type balancer struct {
	set       *discovery.EndpointSet
	lb        *policy.LoadBalancer // the settings it was built for
	policy    string
	slowStart time.Duration
	eps       []discovery.Endpoint // the set's callable endpoints
	stats     []*endpointStats     // theirs, in the same order
	weights   []int                // theirs, each at least 1
	weighted  bool                 // weights differ: round robin is weighted
	// rampUntil is when the last of its endpoints' slow starts ends.
	rampUntil time.Time

	next atomic.Uint64 // round robin's turn
	rand *rand.Rand    // its draws; nil: the global source
	// smooth is weighted round robin's running state, one per endpoint.
	mu     sync.Mutex // guards smooth
	smooth []float64
}

// endpointStats is what the balancers learn of one endpoint of a service.
// Safe for concurrent use.
type endpointStats struct {
	picks    atomic.Int64 // attempts sent to it, for the admin API
	inFlight atomic.Int64 // attempts picked and not yet judged (policies that learn)
	since    time.Time    // when the endpoint joined the service's set (slow start)

	mu       sync.Mutex // guards the latency estimate
	rtt      float64    // peak-EWMA latency in ns, as of updated
	updated  time.Time
	observed bool // rtt has been measured at least once
}

// ewmaDecay is the time constant of the latency estimate (Linkerd's and
// tower's default): an observation's weight halves in about 7 s, and an
// endpoint not picked for a while looks faster and faster until it is
// tried again.
const ewmaDecay = 10 * time.Second

// defaultRTT is the estimate of an endpoint not measured yet (Linkerd's
// default): not so low that a new endpoint takes every request, not so
// high that it waits for the others to be loaded.
const defaultRTT = 30 * time.Millisecond

// slowStartFloor is the share of its weight a new endpoint starts from.
const slowStartFloor = 0.1

// latency is the endpoint's estimate at now: the last one, decayed.
func (s *endpointStats) latency(now time.Time) float64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.observed {
		return float64(defaultRTT)
	}
	return s.rtt * math.Exp(-float64(now.Sub(s.updated))/float64(ewmaDecay))
}

// observe folds one latency into the estimate: a peak replaces it, a
// lower one is averaged in by how long ago the estimate was made.
func (s *endpointStats) observe(rtt time.Duration, now time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	v := float64(rtt)
	decay := math.Exp(-float64(now.Sub(s.updated)) / float64(ewmaDecay))
	if cur := s.rtt * decay; !s.observed || v >= cur {
		s.rtt = v
	} else {
		// The estimate as it has decayed since, and the new latency by
		// the weight that time gives it (tower's and Linkerd's peak EWMA).
		s.rtt = cur + v*(1-decay)
	}
	s.updated, s.observed = now, true
}

// endpointRegistry holds the endpointStats of a service's endpoints, by
// address, for as long as they stay in its set.
type endpointRegistry struct {
	mu    sync.Mutex // guards stats
	stats map[string]*endpointStats
}

// of returns the stats of eps, in order, making those of endpoints new to
// the set. With keep, eps is the service's set from now on: the registry
// keeps their stats and forgets those of endpoints no longer in it (one
// that comes back is new again, and starts slowly again). Without, the
// registry is left as it is.
func (r *endpointRegistry) of(eps []discovery.Endpoint, now time.Time, keep bool) []*endpointStats {
	r.mu.Lock()
	defer r.mu.Unlock()
	var next map[string]*endpointStats
	if keep {
		next = make(map[string]*endpointStats, len(eps))
	}
	out := make([]*endpointStats, len(eps))
	for i, ep := range eps {
		s := r.stats[ep.Addr]
		if s == nil {
			s = &endpointStats{since: now}
		}
		if keep {
			next[ep.Addr] = s
		}
		out[i] = s
	}
	if keep {
		r.stats = next
	}
	return out
}

// newBalancer builds the balancer of set's callable endpoints eps under lb,
// with what reg learned of them; keep makes set the service's current one
// in reg (see endpointRegistry.of).
func newBalancer(set *discovery.EndpointSet, eps []discovery.Endpoint, lb *policy.LoadBalancer, reg *endpointRegistry, now time.Time, keep bool, r *rand.Rand) *balancer {
	b := &balancer{set: set, lb: lb, policy: policy.RoundRobin, eps: eps, weights: make([]int, len(eps)), rand: r}
	if lb != nil {
		if lb.Policy != nil {
			b.policy = *lb.Policy
		}
		if lb.SlowStart != nil {
			b.slowStart = lb.SlowStart.D()
		}
	}
	for i, ep := range eps {
		b.weights[i] = max(ep.Weight, 1)
		if b.weights[i] != b.weights[0] {
			b.weighted = true
		}
	}
	b.stats = reg.of(eps, now, keep)
	if b.slowStart > 0 {
		for _, st := range b.stats {
			if end := st.since.Add(b.slowStart); end.After(b.rampUntil) {
				b.rampUntil = end
			}
		}
	}
	b.smooth = make([]float64, len(eps))
	// A random start keeps a fleet of sidecars from marching in step onto
	// the same first endpoint.
	b.next.Store(b.uint64())
	return b
}

// share is endpoint i's weight at now: its weight, less while it starts
// slowly.
func (b *balancer) share(i int, now time.Time) float64 {
	w := float64(b.weights[i])
	if b.slowStart > 0 {
		if age := now.Sub(b.stats[i].since); age < b.slowStart {
			w *= max(slowStartFloor, float64(age)/float64(b.slowStart))
		}
	}
	return w
}

func (b *balancer) intN(n int) int {
	if b.rand == nil {
		return rand.IntN(n)
	}
	return b.rand.IntN(n)
}

func (b *balancer) uint64() uint64 {
	if b.rand == nil {
		return rand.Uint64()
	}
	return b.rand.Uint64()
}

// slowStarting reports whether an endpoint is still ramping up at now.
func (b *balancer) slowStarting(now time.Time) bool { return now.Before(b.rampUntil) }

// pick chooses an endpoint for an attempt. A policy that learns counts
// it in flight there; the attempt's judge (attemptEnd.record) takes it out
// and reports its latency. o says which endpoints are
// ejected; avoid holds the endpoints of the attempt before (a retry's) or
// of the attempts still out (a hedge's).
func (b *balancer) pick(o *outliers, avoid []string, now time.Time) int {
	var i int
	switch {
	case b.learns():
		i = b.p2c(o, avoid, now)
		b.stats[i].inFlight.Add(1)
	case b.weighted || b.slowStarting(now):
		i = b.smoothWeighted(o, avoid, now)
	default:
		i = b.roundRobin(o, avoid, now)
	}
	b.stats[i].picks.Add(1)
	return i
}

// learns reports whether the policy weighs requests in flight and
// latency: only then is an attempt's outcome reported to its endpoint.
func (b *balancer) learns() bool {
	return b.policy == policy.LeastRequest || b.policy == policy.P2CEWMA
}

// eligible reports whether endpoint i may take the attempt: not ejected,
// and not one to avoid when there is another.
func (b *balancer) eligible(i int, o *outliers, avoid []string, now time.Time) bool {
	addr := b.eps[i].Addr
	return !o.ejected(addr, now) && (len(b.eps) == 1 || !slices.Contains(avoid, addr))
}

// roundRobin takes the endpoints in turn, skipping ineligible ones; if
// every endpoint is ejected it picks one anyway (panic mode: better some
// traffic than none).
//
// A retry's or a hedge's pick (avoid set) takes no turn: it goes to the
// next endpoint in line without moving the line, so that the next request
// still starts where it would have. Taking a turn, every request to two
// endpoints would start at the same one, a failing or slow one included,
// whenever each needed two attempts.
func (b *balancer) roundRobin(o *outliers, avoid []string, now time.Time) int {
	n := uint64(len(b.eps))
	var first int
	if len(avoid) > 0 {
		first = int((b.next.Load() + 1) % n)
	} else {
		first = int(b.next.Add(1) % n)
	}
	for k := 0; k < len(b.eps); k++ {
		i := (first + k) % len(b.eps)
		if b.eligible(i, o, avoid, now) {
			if k > 0 && len(avoid) == 0 {
				b.next.Add(uint64(k))
			}
			return i
		}
	}
	return first
}

// smoothWeighted is weighted round robin without bursts: nginx's smooth
// algorithm over the eligible endpoints' shares.
// A retry's or a hedge's pick (avoid set) takes no turn, as in roundRobin:
// it goes to the eligible endpoint next in line, the shares unchanged.
func (b *balancer) smoothWeighted(o *outliers, avoid []string, now time.Time) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	turn := len(avoid) == 0
	best, total, bestVal := -1, 0.0, 0.0
	for i := range b.eps {
		if !b.eligible(i, o, avoid, now) {
			continue
		}
		w := b.share(i, now)
		v := b.smooth[i] + w
		if turn {
			b.smooth[i] = v
		}
		total += w
		if best < 0 || v > bestVal {
			best, bestVal = i, v
		}
	}
	if best < 0 {
		return b.roundRobin(o, avoid, now) // none eligible: panic mode
	}
	if turn {
		b.smooth[best] -= total
	}
	return best
}

// p2c draws two eligible endpoints at random and takes the cheaper:
// requests in flight (least-request), or latency times requests in flight
// (p2c-ewma), per unit of share.
func (b *balancer) p2c(o *outliers, avoid []string, now time.Time) int {
	n := len(b.eps)
	if n == 1 {
		return 0
	}
	// draw is an eligible endpoint other than not, at random: a few
	// tries, then a scan from a random start; -1 if there is none.
	draw := func(not int) int {
		for range 4 {
			if i := b.intN(n); i != not && b.eligible(i, o, avoid, now) {
				return i
			}
		}
		start := b.intN(n)
		for k := range n {
			if i := (start + k) % n; i != not && b.eligible(i, o, avoid, now) {
				return i
			}
		}
		return -1
	}
	i := draw(-1)
	if i < 0 {
		return b.roundRobin(o, avoid, now) // none eligible: panic mode
	}
	j := draw(i)
	if j < 0 {
		return i
	}
	if b.cost(j, now) < b.cost(i, now) {
		return j
	}
	return i
}

// cost is what p2c minimises for endpoint i.
func (b *balancer) cost(i int, now time.Time) float64 {
	c := float64(b.stats[i].inFlight.Load() + 1)
	if b.policy == policy.P2CEWMA {
		c *= max(b.stats[i].latency(now), 1)
	}
	return c / b.share(i, now)
}

// BalancerStatus is what a service's balancer knows of its endpoints, for
// the admin API.
type BalancerStatus struct {
	Policy    string             `json:"policy"`
	Endpoints []BalancedEndpoint `json:"endpoints"`
}

// BalancedEndpoint is one endpoint as the balancer sees it.
type BalancedEndpoint struct {
	Addr   string `json:"addr"`
	Weight int    `json:"weight"`
	// Picks are the attempts sent to it since it joined the set; Share is
	// their part of all the set's picks.
	Picks int64   `json:"picks"`
	Share float64 `json:"share"`
	// InFlight and LatencyMs are what least-request and p2c-ewma weigh.
	InFlight  int64   `json:"inFlight,omitempty"`
	LatencyMs float64 `json:"latencyMs,omitempty"`
	// SlowStartUntil is when its slow start ends, while it lasts.
	SlowStartUntil *time.Time `json:"slowStartUntil,omitempty"`
}

// status reports the balancer's view at now.
func (b *balancer) status(now time.Time) *BalancerStatus {
	st := &BalancerStatus{Policy: b.policy, Endpoints: make([]BalancedEndpoint, len(b.eps))}
	var total int64
	for i, ep := range b.eps {
		s := b.stats[i]
		e := BalancedEndpoint{Addr: ep.Addr, Weight: b.weights[i], Picks: s.picks.Load()}
		total += e.Picks
		if b.learns() {
			e.InFlight = s.inFlight.Load()
		}
		if b.policy == policy.P2CEWMA {
			e.LatencyMs = math.Round(s.latency(now)/float64(time.Microsecond)) / 1000
		}
		if end := s.since.Add(b.slowStart); b.slowStart > 0 && now.Before(end) {
			e.SlowStartUntil = &end
		}
		st.Endpoints[i] = e
	}
	for i := range st.Endpoints {
		if total > 0 {
			st.Endpoints[i].Share = math.Round(1000*float64(st.Endpoints[i].Picks)/float64(total)) / 1000
		}
	}
	return st
}
