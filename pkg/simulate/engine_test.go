package simulate

import (
	"encoding/json"
	"slices"
	"testing"
	"testing/synctest"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/policy"
)

// scenario builds a Scenario for tests, with defaults.
func testScenario(t *testing.T, rate float64, d time.Duration, groups ...Instances) *Scenario {
	t.Helper()
	return &Scenario{APIVersion: APIVersion, Kind: Kind, Service: "echo", Rate: rate, Duration: policy.Duration(d), Instances: groups}
}

func docs(t *testing.T, yaml string) Policies {
	t.Helper()
	if yaml == "" {
		return Policies{Name: "default"}
	}
	ps, err := policy.Parse([]byte("service: echo\n"+yaml), "test")
	if err != nil {
		t.Fatal(err)
	}
	return Policies{Name: yaml, Docs: ps}
}

func simulate(t *testing.T, s *Scenario, p Policies, seed uint64) Result {
	t.Helper()
	var r Result
	synctest.Test(t, func(t *testing.T) {
		var err error
		if r, err = run(s, p, seed); err != nil {
			t.Fatal(err)
		}
	})
	return r
}

var fast = Latency{P50: policy.Duration(5 * time.Millisecond), P99: policy.Duration(20 * time.Millisecond)}

// One instance of three failing half its calls for thirty seconds: the
// default policy's retries hide it (a retry goes to another instance),
// without retries a sixth of the requests of the window fail.
func TestSimulateFailingInstance(t *testing.T) {
	s := testScenario(t, 200, time.Minute,
		Instances{Count: 2, Latency: fast},
		Instances{Count: 1, Latency: fast, FailureRate: 0.5, From: policy.Duration(10 * time.Second), To: policy.Duration(40 * time.Second)})
	start := time.Now()
	def := simulate(t, s, docs(t, ""), 1)
	none := simulate(t, s, docs(t, "retry: {attempts: 1}"), 1)
	t.Logf("%d requests, 60 virtual seconds each, in %v", def.Requests+none.Requests, time.Since(start))
	for _, r := range []Result{def, none} {
		t.Logf("%s: success %.4f, attempts/request %.3f, retries %v, ejections %d, breaker openings %d, p99 %.1fms",
			r.Policy, r.SuccessRate, r.AttemptsPerRequest, r.Retries, r.Ejections, r.BreakerOpenings, r.P99Ms)
	}
	if def.Requests < 11000 || def.Requests > 13000 || none.Requests != def.Requests {
		t.Fatalf("%d and %d requests, want the same, about 12,000 (200/s for 60s)", def.Requests, none.Requests)
	}
	if def.SuccessRate < 0.999 || def.Retries["503"] == 0 || def.BreakerOpenings != 0 {
		t.Fatalf("default policy: success %.4f, retries %v, breaker openings %d; want >= 99.9%% by retries, breaker closed",
			def.SuccessRate, def.Retries, def.BreakerOpenings)
	}
	// Without retries the failures reach the app until outlier detection
	// ejects the instance (5 failures in a row) for 30s: past the window.
	if failed := none.Requests - none.Succeeded; failed < 5 || failed > 100 || none.AttemptsPerRequest != 1 || none.Ejections != 1 {
		t.Fatalf("no retries: %d failed, attempts/request %.3f, %d ejections; want the failures until one ejection, one attempt each",
			failed, none.AttemptsPerRequest, none.Ejections)
	}
	if def.RecoverySeconds == nil || *def.RecoverySeconds < 0 {
		t.Fatalf("recovery %v, want a second of full success after the window", def.RecoverySeconds)
	}
}

// The same seed gives the same results, to the last field; another seed
// other ones.
func TestSimulateIsDeterministic(t *testing.T) {
	s := testScenario(t, 300, 20*time.Second,
		Instances{Count: 2, Latency: fast},
		Instances{Count: 1, Latency: fast, FailureRate: 0.3, Failure: "reset", From: policy.Duration(5 * time.Second)})
	p := docs(t, "retry: {perTryTimeout: 15ms, on: [timeout, reset, 503]}\nloadBalancer: {policy: p2c-ewma}\nhedge: {delay: 10ms}")
	a, _ := json.Marshal(simulate(t, s, p, 7))
	b, _ := json.Marshal(simulate(t, s, p, 7))
	c, _ := json.Marshal(simulate(t, s, p, 8))
	if string(a) != string(b) {
		t.Fatalf("two runs with seed 7 differ:\n%s\n%s", a, b)
	}
	if string(a) == string(c) {
		t.Fatal("seeds 7 and 8 gave the same results")
	}
}

// POSTs without an Idempotency-Key are never executed twice under a policy
// that keeps to idempotent methods, whatever fails; a policy that retries
// POST on a reset executes some twice, and the simulation counts them.
func TestSimulateCountsDuplicates(t *testing.T) {
	s := testScenario(t, 100, 20*time.Second,
		Instances{Count: 3, Latency: fast, FailureRate: 0.2, Failure: "reset"})
	s.Requests = &Requests{Methods: map[string]float64{"GET": 1, "POST": 1}, BodyBytes: 100}
	safe := simulate(t, s, docs(t, ""), 3)
	risky := simulate(t, s, docs(t, "retry: {methods: [GET, POST]}"), 3)
	if safe.Duplicates != 0 {
		t.Fatalf("default policy executed %d POSTs twice, want none", safe.Duplicates)
	}
	if risky.Duplicates == 0 {
		t.Fatal("a policy retrying POST on resets executed none twice")
	}
	t.Logf("POSTs executed more than once: default %d, retrying POST %d of %d requests", safe.Duplicates, risky.Duplicates, risky.Requests)
}

// Instances that join and leave change the endpoint set as discovery
// would: a request is never sent to an instance before it joins, and after
// it leaves only a connection refused (a connect failure, retried
// elsewhere) can come of one. A stalling instance is cut by the per-try
// timeout and retried.
func TestSimulateJoinLeaveAndStall(t *testing.T) {
	stays := Instances{Count: 1, Latency: fast}
	joins := Instances{Count: 1, Latency: fast, Join: policy.Duration(10 * time.Second), Leave: policy.Duration(20 * time.Second)}
	stalls := Instances{Count: 1, Latency: fast, FailureRate: 0.2, Failure: FailStall}
	s := testScenario(t, 100, 30*time.Second, stays, joins, stalls)
	r := simulate(t, s, docs(t, "retry: {perTryTimeout: 100ms, on: [timeout, connect-failure, 503]}\noutlierDetection: {consecutiveFailures: 100000}"), 5)
	t.Logf("success %.4f, attempts/request %.3f, retries %v, p99 %.1fms", r.SuccessRate, r.AttemptsPerRequest, r.Retries, r.P99Ms)
	if r.SuccessRate < 0.995 || r.Retries["timeout"] == 0 {
		t.Fatalf("success %.4f with retries %v; want stalls cut and retried", r.SuccessRate, r.Retries)
	}
	// Attempts per second: two instances before 10s and after 20s,
	// three between: the joining one takes a third of the first
	// attempts while it is there.
	var before, during float64
	for _, sec := range r.Timeline[2:8] {
		before += float64(sec.Attempts) / float64(sec.Requests)
	}
	for _, sec := range r.Timeline[12:18] {
		during += float64(sec.Attempts) / float64(sec.Requests)
	}
	t.Logf("attempts per request: %.3f with two instances, %.3f with three", before/6, during/6)
	// The stalling instance takes a half, then a third of the first
	// attempts: fewer stalls to retry while the third one is there.
	if during >= before {
		t.Fatalf("attempts per request %.3f with three instances, %.3f with two; want fewer retries with the joined one", during/6, before/6)
	}
}

// A minute at 1,000 requests a second takes a few seconds.
func TestSimulateThousandPerSecond(t *testing.T) {
	if testing.Short() {
		t.Skip("a minute at 1,000/s")
	}
	s := testScenario(t, 1000, time.Minute, Instances{Count: 3, Latency: fast, FailureRate: 0.1, From: policy.Duration(20 * time.Second), To: policy.Duration(30 * time.Second)})
	start := time.Now()
	r := simulate(t, s, docs(t, ""), 1)
	t.Logf("%d requests, 60 virtual seconds, in %v", r.Requests, time.Since(start))
	if r.Requests < 58000 || r.Requests > 62000 {
		t.Fatalf("%d requests, want about 60,000", r.Requests)
	}
}

// Arrivals is the load the simulation sends: the same seed gives the same
// requests, at the scenario's rate, in order, each method and key drawn
// from the mix; the simulation sends exactly as many.
func TestArrivalsAreTheLoadSent(t *testing.T) {
	s := testScenario(t, 200, 10*time.Second, Instances{Count: 2, Latency: fast})
	s.Requests = &Requests{Methods: map[string]float64{"GET": 3, "POST": 1}, IdempotencyKey: 0.5}
	var a, b []Arrival
	for x := range s.Arrivals(7) {
		a = append(a, x)
	}
	for x := range s.Arrivals(7) {
		b = append(b, x)
	}
	if !slices.Equal(a, b) {
		t.Fatal("seed 7 twice gave two loads")
	}
	posts, keyed := 0, 0
	for i, x := range a {
		if x.At < 0 || x.At >= 10*time.Second || (i > 0 && x.At < a[i-1].At) {
			t.Fatalf("arrival %d at %v: want in order within the 10 s", i, x.At)
		}
		if x.Method == "POST" {
			posts++
		}
		if x.Keyed {
			keyed++
		}
	}
	// 2,000 expected; Poisson's standard deviation is 45.
	if n := len(a); n < 1800 || n > 2200 {
		t.Fatalf("%d arrivals in 10 s at 200 a second", n)
	}
	if f := float64(posts) / float64(len(a)); f < 0.2 || f > 0.3 {
		t.Fatalf("%.2f of the requests are POSTs, want about a quarter", f)
	}
	if f := float64(keyed) / float64(len(a)); f < 0.45 || f > 0.55 {
		t.Fatalf("%.2f of the requests carry a key, want about half", f)
	}
	if r := simulate(t, s, docs(t, ""), 7); r.Requests != len(a) {
		t.Fatalf("the simulation sent %d requests, its arrivals are %d", r.Requests, len(a))
	}
}
