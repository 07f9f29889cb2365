package simulate

import (
	"context"
	"io"
	"math"
	"math/rand/v2"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/upstream"
)

// requestHeader carries a simulated request's number to the model, which
// draws each attempt's fate from it: the same seed gives every request the
// same fate, in whatever order the attempts come.
const requestHeader = "X-Simulated-Request"

// instance is one modelled instance of the service.
type instance struct {
	addr  string
	n     int // its number among all instances, for its draws
	group *Instances
	// The log-normal latency's parameters (Latency.P50, P99).
	mu, sigma float64
}

// model is the service's modelled instances: its endpoint sets over time
// (discovery, for the chain) and the answers to the chain's attempts, in
// virtual time. Safe for concurrent use.
type model struct {
	s         *Scenario
	start     time.Time
	seed      uint64
	end       time.Duration // the scenario's duration
	instances map[string]*instance
	sets      []setAt // from the first change on

	mu       sync.Mutex        // guards the fields below
	tries    map[uint64]uint64 // attempts that reached an instance, by request
	executed map[uint64]int    // times an instance worked on each request
}

// setAt is the service's endpoint set from a moment on.
type setAt struct {
	from time.Duration
	set  *discovery.EndpointSet
}

func newModel(s *Scenario, start time.Time, seed uint64) *model {
	m := &model{s: s, start: start, seed: seed, end: s.Duration.D(), instances: map[string]*instance{},
		tries: map[uint64]uint64{}, executed: map[uint64]int{}}
	var all []*instance
	for g := range s.Instances {
		grp := &s.Instances[g]
		for i := range grp.Count {
			in := &instance{addr: "10.0." + strconv.Itoa(g) + "." + strconv.Itoa(i+1) + ":8080", n: len(all), group: grp}
			if p50 := grp.Latency.P50.D(); p50 > 0 {
				p99 := max(grp.Latency.P99.D(), p50)
				in.mu = math.Log(float64(p50))
				in.sigma = (math.Log(float64(p99)) - in.mu) / 2.3263478740408408 // the normal's 99th percentile
			}
			all = append(all, in)
			m.instances[in.addr] = in
		}
	}
	// The set changes when instances join or leave: one immutable set
	// for each span between changes, as discovery publishes them.
	moments := map[time.Duration]bool{0: true}
	for _, in := range all {
		moments[in.group.Join.D()] = true
		if l := in.group.Leave.D(); l > 0 {
			moments[l] = true
		}
	}
	var at []time.Duration
	for t := range moments {
		at = append(at, t)
	}
	sort.Slice(at, func(i, j int) bool { return at[i] < at[j] })
	for _, t := range at {
		set := &discovery.EndpointSet{Service: s.Service, Source: "simulated", UpdatedAt: start.Add(t), Endpoints: []discovery.Endpoint{}}
		for _, in := range all {
			if in.present(t) {
				set.Endpoints = append(set.Endpoints, discovery.Endpoint{Addr: in.addr, Weight: 1})
			}
		}
		m.sets = append(m.sets, setAt{from: t, set: set})
	}
	return m
}

// present reports whether the instance is in the service's set at t.
func (in *instance) present(t time.Duration) bool {
	g := in.group
	return t >= g.Join.D() && (g.Leave == 0 || t < g.Leave.D())
}

// failing reports whether the instance's failure window holds t.
func (in *instance) failing(t time.Duration) bool {
	g := in.group
	return g.FailureRate > 0 && t >= g.From.D() && (g.To == 0 || t < g.To.D())
}

// latency draws how long the instance takes to answer.
func (in *instance) latency(r *rand.Rand) time.Duration {
	if h := in.group.Latency.Histogram; len(h) > 0 {
		x, lo := r.Float64(), time.Duration(0)
		for _, b := range h {
			if x < b.Share {
				return lo + time.Duration(r.Float64()*float64(b.UpTo.D()-lo))
			}
			x -= b.Share
			lo = b.UpTo.D()
		}
		return lo
	}
	return time.Duration(math.Exp(in.mu + in.sigma*r.NormFloat64()))
}

// Resolve is discovery's: the set in effect now.
func (m *model) Resolve(_ context.Context, service string) (*discovery.EndpointSet, error) {
	if service != m.s.Service {
		return nil, discovery.ErrUnknownService
	}
	return m.setAt(time.Since(m.start)), nil
}

// Services lists the service, as its set is now.
func (m *model) Services() []*discovery.EndpointSet {
	return []*discovery.EndpointSet{m.setAt(time.Since(m.start))}
}

func (m *model) setAt(t time.Duration) *discovery.EndpointSet {
	i := sort.Search(len(m.sets), func(i int) bool { return m.sets[i].from > t }) - 1
	return m.sets[max(i, 0)].set
}

// send answers one attempt, as the transport would: the instance in the
// request's URL host works on it for a drawn latency and answers, or
// fails as its group says while its failure window lasts. An instance
// gone from the set refuses connections. The attempt's context ends the
// wait, as it ends a real one.
func (m *model) send(req *http.Request, _ time.Duration) (*http.Response, error) {
	now := time.Since(m.start)
	in := m.instances[req.URL.Host]
	if in == nil || !in.present(now) {
		return nil, &upstream.ConnectError{Addr: req.URL.Host, Err: syscall.ECONNREFUSED}
	}
	id, _ := strconv.ParseUint(req.Header.Get(requestHeader), 10, 64)
	m.mu.Lock()
	m.tries[id]++
	try := m.tries[id]
	m.mu.Unlock()
	// The attempt's fate: from the seed, the request, its attempt and the
	// instance, whatever the order attempts come in.
	r := rand.New(rand.NewPCG(m.seed^id*0x9e3779b97f4a7c15, try<<20|uint64(in.n)))
	wait := in.latency(r)
	fails := in.failing(now) && r.Float64() < in.group.FailureRate
	kind := in.group.Failure
	if fails && kind == FailRefused {
		return nil, &upstream.ConnectError{Addr: in.addr, Err: syscall.ECONNREFUSED}
	}
	m.mu.Lock()
	m.executed[id]++
	m.mu.Unlock()
	ctx := req.Context()
	if fails && kind == FailStall {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	t := time.NewTimer(wait)
	select {
	case <-t.C:
	case <-ctx.Done():
		t.Stop()
		return nil, ctx.Err()
	}
	status := http.StatusOK
	if fails {
		if kind == FailReset {
			return nil, &upstream.UpstreamError{Addr: in.addr, Op: "read response", Written: true, Err: syscall.ECONNRESET}
		}
		status = 503
		if kind != "" {
			status, _ = strconv.Atoi(kind)
		}
	}
	body := "ok"
	if status != http.StatusOK {
		body = ""
	}
	return &http.Response{
		Status: strconv.Itoa(status) + " " + http.StatusText(status), StatusCode: status,
		Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
		Header:        http.Header{"Content-Length": {strconv.Itoa(len(body))}},
		ContentLength: int64(len(body)),
		Body:          io.NopCloser(strings.NewReader(body)),
		Request:       req,
	}, nil
}

// executions returns how many times an instance worked on request id.
func (m *model) executions(id uint64) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.executed[id]
}
