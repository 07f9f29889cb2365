package simulate

import (
	"fmt"
	"iter"
	"log/slog"
	"math"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/outbound"
	"github.com/sidecar-mesh/sidecar/pkg/policy"
)

// Policies is one policy under simulation: a name for it (its file) and
// its documents, the service's and "*" (none: the defaults).
type Policies struct {
	Name string
	Docs []policy.Policy
}

// Run simulates the scenario under each policy, one after the other, each
// from the start in a virtual time of its own. The same seed gives the
// same results: arrivals, methods, latencies and failures are drawn from
// it per request, and so are the chain's own random choices.
func Run(s *Scenario, policies []Policies, seed uint64) ([]Result, error) {
	out := make([]Result, 0, len(policies))
	for _, p := range policies {
		var r Result
		err := inBubble(func() (err error) {
			r, err = run(s, p, seed)
			return err
		})
		if err != nil {
			return nil, fmt.Errorf("%s: %w", p.Name, err)
		}
		out = append(out, r)
	}
	return out, nil
}

// outcome is one simulated request as the app saw it.
type outcome struct {
	at       time.Duration // when it was sent
	took     time.Duration
	status   int
	unsafe   bool // not safe to repeat: POST or PATCH without an Idempotency-Key
	id       uint64
	executed int
}

// run runs the scenario under one policy. It must run in a synctest
// bubble: its sleeps, and the chain's, are virtual.
func run(s *Scenario, p Policies, seed uint64) (Result, error) {
	start := time.Now()
	m := newModel(s, start, seed)
	obs := &observer{start: start, retries: map[string]int{}, shed: map[string]int{}}
	proxy, err := outbound.New(outbound.Config{
		Resolver: m,
		Policies: outbound.NewStaticPolicies(p.Docs),
		Observer: obs,
		Send:     m.send,
		Rand:     rand.New(&lockedSource{src: rand.NewPCG(seed, 0x5eed)}),
		Logger:   slog.New(slog.DiscardHandler),
		HopID:    "simulation",
	})
	if err != nil {
		return Result{}, err
	}
	defer proxy.Close()

	seconds := int(math.Ceil(s.Duration.D().Seconds()))
	ejected := make([]int, seconds)
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		// Ejected endpoints, at each second's end.
		defer close(sampled)
		for i := range seconds {
			select {
			case <-time.After(time.Until(start.Add(time.Duration(i+1) * time.Second))):
			case <-stop:
				return
			}
			for _, st := range proxy.Status() {
				ejected[i] = len(st.Ejected)
			}
		}
	}()

	var (
		mu       sync.Mutex
		outcomes []outcome
		wg       sync.WaitGroup
	)
	body := ""
	if s.Requests != nil {
		body = strings.Repeat("x", s.Requests.BodyBytes)
	}
	var n uint64
	for a := range s.Arrivals(seed) {
		n++
		id := n
		time.Sleep(time.Until(start.Add(a.At)))
		wg.Go(func() {
			o := outcome{at: a.At, id: id, unsafe: (a.Method == http.MethodPost || a.Method == http.MethodPatch) && !a.Keyed}
			o.status = send(proxy, s.Service, a.Method, id, a.Keyed, body)
			o.took = time.Since(start.Add(a.At))
			mu.Lock()
			outcomes = append(outcomes, o)
			mu.Unlock()
		})
	}
	wg.Wait()
	close(stop)
	<-sampled
	end := time.Since(start)
	for i := range outcomes {
		outcomes[i].executed = m.executions(outcomes[i].id)
	}
	r := result(s, p.Name, outcomes, obs, end)
	for i := range r.Timeline {
		r.Timeline[i].Ejected = ejected[i]
	}
	return r, nil
}

// Arrival is one request of the load a scenario offers: when the app
// sends it, from the start of the run, and what.
type Arrival struct {
	At     time.Duration
	Method string
	// Keyed says the request carries an Idempotency-Key.
	Keyed bool
}

// Arrivals is the load the scenario offers under seed, in the order sent:
// Poisson arrivals at the scenario's rate, each request's method and key
// drawn from its mix. The simulation sends exactly these; a real run can
// send them too, to compare the two request for request.
func (s *Scenario) Arrivals(seed uint64) iter.Seq[Arrival] {
	return func(yield func(Arrival) bool) {
		methods, shares := s.methodMix()
		r := rand.New(rand.NewPCG(seed, 0xa771))
		at := time.Duration(0)
		for {
			at += time.Duration(r.ExpFloat64() / s.Rate * float64(time.Second))
			if at >= s.Duration.D() {
				return
			}
			a := Arrival{At: at, Method: methods[pick(shares, r.Float64())]}
			a.Keyed = s.Requests != nil && r.Float64() < s.Requests.IdempotencyKey
			if !yield(a) {
				return
			}
		}
	}
}

// send sends one request through the proxy as the app would, and returns
// the status it was answered.
func send(proxy *outbound.Proxy, service, method string, id uint64, keyed bool, body string) int {
	var req *http.Request
	if body != "" && (method == http.MethodPost || method == http.MethodPut || method == http.MethodPatch) {
		req = httptest.NewRequest(method, "http://"+service+"/", strings.NewReader(body))
	} else {
		req = httptest.NewRequest(method, "http://"+service+"/", nil)
	}
	req.RemoteAddr = "127.0.0.1:40000"
	req.Header.Set(requestHeader, strconv.FormatUint(id, 10))
	if keyed {
		req.Header.Set("Idempotency-Key", "simulated-"+strconv.FormatUint(id, 10))
	}
	w := httptest.NewRecorder()
	proxy.ServeHTTP(w, req)
	return w.Code
}

// methodMix returns the scenario's methods, sorted, and their cumulative
// shares.
func (s *Scenario) methodMix() ([]string, []float64) {
	if s.Requests == nil || len(s.Requests.Methods) == 0 {
		return []string{http.MethodGet}, []float64{1}
	}
	var names []string
	total := 0.0
	for m, w := range s.Requests.Methods {
		names = append(names, m)
		total += w
	}
	sort.Strings(names)
	cum, acc := make([]float64, len(names)), 0.0
	for i, m := range names {
		acc += s.Requests.Methods[m] / total
		cum[i] = acc
	}
	return names, cum
}

// pick is the index of x among cumulative shares.
func pick(cum []float64, x float64) int {
	for i, c := range cum {
		if x < c {
			return i
		}
	}
	return len(cum) - 1
}

// observer counts what the chain decides, with when.
type observer struct {
	outbound.NopObserver
	start time.Time

	mu         sync.Mutex // guards the fields below
	retries    map[string]int
	shed       map[string]int
	exhausted  int
	ejections  int
	hedges     int
	hedgesWon  int
	openings   int
	open       []span // the breaker's open spans; the last one's to is 0 while open
	attemptsAt []time.Duration
}

type span struct{ from, to time.Duration }

func (o *observer) now() time.Duration { return time.Since(o.start) }

func (o *observer) Retried(_, reason string) {
	o.mu.Lock()
	o.retries[reason]++
	o.mu.Unlock()
}

func (o *observer) RetryBudgetExhausted(string) {
	o.mu.Lock()
	o.exhausted++
	o.mu.Unlock()
}

func (o *observer) BreakerStateChanged(_, from, to string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	now := o.now()
	if from == "open" && len(o.open) > 0 {
		o.open[len(o.open)-1].to = now
	}
	if to == "open" {
		o.openings++
		o.open = append(o.open, span{from: now})
	}
}

func (o *observer) EndpointEjected(string) {
	o.mu.Lock()
	o.ejections++
	o.mu.Unlock()
}

func (o *observer) Shed(_, reason string) {
	o.mu.Lock()
	o.shed[reason]++
	o.mu.Unlock()
}

func (o *observer) Attempted(string) {
	o.mu.Lock()
	o.attemptsAt = append(o.attemptsAt, o.now())
	o.mu.Unlock()
}

func (o *observer) Hedged(string) {
	o.mu.Lock()
	o.hedges++
	o.mu.Unlock()
}

func (o *observer) HedgeWon(string) {
	o.mu.Lock()
	o.hedgesWon++
	o.mu.Unlock()
}

// result sums a run up.
func result(s *Scenario, name string, outcomes []outcome, o *observer, end time.Duration) Result {
	sort.Slice(outcomes, func(i, j int) bool { return outcomes[i].id < outcomes[j].id })
	seconds := int(math.Ceil(s.Duration.D().Seconds()))
	r := Result{Policy: name, Requests: len(outcomes), Retries: o.retries, Shed: o.shed, BudgetExhausted: o.exhausted,
		Ejections: o.ejections, Hedges: o.hedges, HedgesWon: o.hedgesWon, BreakerOpenings: o.openings,
		Timeline: make([]Second, seconds)}
	lat := make([]time.Duration, 0, len(outcomes))
	perSecond := make([][]time.Duration, seconds)
	for _, oc := range outcomes {
		lat = append(lat, oc.took)
		i := min(int(oc.at/time.Second), seconds-1)
		sec := &r.Timeline[i]
		sec.Requests++
		perSecond[i] = append(perSecond[i], oc.took)
		if oc.status < 500 {
			r.Succeeded++
			sec.Succeeded++
		}
		if oc.unsafe && oc.executed > 1 {
			r.Duplicates++
		}
	}
	if r.Requests > 0 {
		r.SuccessRate = float64(r.Succeeded) / float64(r.Requests)
		r.AttemptsPerRequest = float64(len(o.attemptsAt)) / float64(r.Requests)
	}
	slices.Sort(lat)
	r.P50Ms, r.P99Ms, r.P999Ms = quantileMs(lat, 0.5), quantileMs(lat, 0.99), quantileMs(lat, 0.999)
	for _, t := range o.attemptsAt {
		r.Timeline[min(int(t/time.Second), seconds-1)].Attempts++
	}
	for i := range r.Timeline {
		r.Timeline[i].T = i
		slices.Sort(perSecond[i])
		r.Timeline[i].P99Ms = quantileMs(perSecond[i], 0.99)
	}
	for _, sp := range o.open {
		to := sp.to
		if to == 0 {
			to = end
		}
		r.BreakerOpenSeconds += (to - sp.from).Seconds()
		for i := range r.Timeline {
			lo, hi := time.Duration(i)*time.Second, time.Duration(i+1)*time.Second
			if d := min(hi, to) - max(lo, sp.from); d > 0 {
				r.Timeline[i].BreakerOpen += d.Seconds()
			}
		}
	}
	r.RecoverySeconds = recovery(s, r.Timeline)
	return r
}

// recovery is how long after the last failure window ended a whole second
// went by in which every request succeeded; nil when no window ends within
// the run, -1 when no such second came.
func recovery(s *Scenario, timeline []Second) *float64 {
	var last time.Duration
	for _, g := range s.Instances {
		if g.FailureRate > 0 && g.To > 0 && g.To.D() < s.Duration.D() {
			last = max(last, g.To.D())
		}
	}
	if last == 0 {
		return nil
	}
	never := -1.0
	first := int(math.Ceil(last.Seconds()))
	for i := first; i < len(timeline); i++ {
		if sec := timeline[i]; sec.Requests > 0 && sec.Succeeded == sec.Requests {
			d := float64(i) - last.Seconds()
			return &d
		}
	}
	return &never
}

// quantileMs is the q quantile of sorted durations, in milliseconds.
func quantileMs(sorted []time.Duration, q float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := min(len(sorted)-1, int(math.Ceil(q*float64(len(sorted))))-1)
	return float64(sorted[max(i, 0)].Microseconds()) / 1000
}

// lockedSource is a rand.Source safe for concurrent use.
type lockedSource struct {
	mu  sync.Mutex
	src rand.Source
}

func (l *lockedSource) Uint64() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.src.Uint64()
}
