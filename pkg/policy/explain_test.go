package policy

import (
	"math"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"
)

// doc parses one Policy document for a test.
func doc(t *testing.T, yaml string) Policy {
	t.Helper()
	ps, err := Parse([]byte(yaml), "test.yaml")
	if err != nil || len(ps) != 1 {
		t.Fatalf("Parse(%q) = %d documents, %v", yaml, len(ps), err)
	}
	return ps[0]
}

func codes(ws []Warning) []string {
	out := []string{}
	for _, w := range ws {
		out = append(out, w.Code)
	}
	return out
}

// outcome is what Explain works out of a policy's times and counts.
type outcome struct {
	attempts    int
	longest     time.Duration
	byTimeout   bool
	fitting     int
	connect     time.Duration
	backoffsSum time.Duration
	factorAt10  float64 // attempts per request at 10 requests/s, worst case
	factorAt1k  float64 // and at 1000/s
}

var (
	// defaultOutcome: 3 attempts bounded only by the 15s timeout.
	defaultOutcome = outcome{attempts: 3, longest: 15 * time.Second, byTimeout: true, fitting: 3, connect: time.Second,
		backoffsSum: 75 * time.Millisecond, factorAt10: 2.2, factorAt1k: 1.21}
	// perTry1s: 3 attempts of 1s each and their backoffs, inside the timeout.
	perTry1s = outcome{attempts: 3, longest: 3*time.Second + 75*time.Millisecond, fitting: 3, connect: time.Second,
		backoffsSum: 75 * time.Millisecond, factorAt10: 2.2, factorAt1k: 1.21}
	// oneAttempt: no retries, bounded by the 15s timeout.
	oneAttempt = outcome{attempts: 1, longest: 15 * time.Second, byTimeout: true, fitting: 1, connect: time.Second,
		factorAt10: 1, factorAt1k: 1}
)

func TestExplainAnalysis(t *testing.T) {
	cases := []struct {
		name       string
		policy     string // the service's document ("svc"); "" for none
		want       outcome
		warnings   []string
		messageHas []string // in the warnings' messages
		breakerHas string
		outlierHas string
		hedgeHas   string
	}{
		{
			name: "defaults", want: defaultOutcome,
			warnings:   []string{"no-per-try-timeout"},
			messageHas: []string{"a slow first attempt uses all of it", "Set perTryTimeout to at most 4.975s", "add timeout to retry.on"},
			breakerHas: "Opens after 20 failed requests in a row, or when at least 100 requests were seen in the last 10s and 50% or more of them failed (50 of 100).\n" +
				"With 1 request in 10 failing at random (a path that always fails, among healthy ones), it opens by chance less than once in 10 billion requests.",
			outlierHas: "it takes at least 2 endpoints for one to be ejected",
		},
		{
			name:       "design example: per-try fits",
			policy:     "timeout: 5s\nretry: {attempts: 3, perTryTimeout: 1s, on: [connect-failure, reset, 503]}",
			want:       perTry1s,
			warnings:   []string{"per-try-timeout-not-retried"},
			messageHas: []string{"retry.perTryTimeout (1s) ends a slow attempt, but retry.on lacks timeout"},
		},
		{
			name:   "per-try timeouts do not fit",
			policy: "timeout: 5s\nretry: {attempts: 3, perTryTimeout: 2s, on: [timeout, 503]}",
			want: outcome{attempts: 3, longest: 5 * time.Second, byTimeout: true, fitting: 2, connect: time.Second,
				backoffsSum: 75 * time.Millisecond, factorAt10: 2.2, factorAt1k: 1.21},
			warnings: []string{"per-try-timeout-exceeds-timeout"},
			messageHas: []string{"3 × 2s + up to 75ms of backoff = 6.075s > 5s. Only 2 attempts of a full 2s fit",
				"Raise timeout to 6.075s, or lower perTryTimeout to 1.641s, or attempts to 2."},
		},
		{
			name: "budget allows no retry", policy: "retry: {budget: {ratio: 0, minPerSecond: 0}}", want: oneAttempt,
			warnings:   []string{"retries-off-by-budget"},
			messageHas: []string{"retries are off and retry.attempts (3) has no effect"},
		},
		{
			name: "no retry conditions", policy: "retry: {on: []}", want: oneAttempt,
			warnings: []string{"no-retry-conditions"},
		},
		{
			name:     "non-idempotent methods and 4xx",
			policy:   "retry: {perTryTimeout: 1s, on: [reset, timeout, 404, 429, 503], methods: [GET, POST, PATCH]}",
			want:     perTry1s,
			warnings: []string{"non-idempotent-retry", "retry-on-4xx"},
			messageHas: []string{"retry.methods includes POST, PATCH, which are not idempotent: a request that reached svc and then failed (reset, timeout, 404, 429, 503)",
				"retry.on includes 404: a 4xx says the request itself was refused", "retry.on includes 429, a request for less traffic"},
		},
		{
			name: "POST retried after a per-try timeout", policy: "retry: {perTryTimeout: 1s, on: [connect-failure, timeout], methods: [POST]}",
			want: perTry1s, warnings: []string{"non-idempotent-retry"}, messageHas: []string{"(timeout)", "a connect failure (nothing was sent) is retried for every method"},
		},
		{
			name: "POST with connect-failure only", policy: "retry: {perTryTimeout: 1s, on: [connect-failure], methods: [POST]}",
			want: perTry1s, warnings: []string{"per-try-timeout-not-retried"},
		},
		{
			name: "408 is worth a retry", policy: "retry: {perTryTimeout: 1s, on: [timeout, 408]}",
			want: perTry1s, warnings: []string{},
		},
		{
			name: "every endpoint but one ejectable", policy: "retry: {perTryTimeout: 1s, on: [timeout]}\noutlierDetection: {maxEjectionPercent: 100}",
			want: perTry1s, warnings: []string{"all-endpoints-ejectable"}, outlierHas: "Every endpoint but the last can be ejected at once.",
		},
		{
			name: "ejection needs five endpoints", policy: "retry: {perTryTimeout: 1s, on: [timeout]}\noutlierDetection: {maxEjectionPercent: 20}",
			want: perTry1s, warnings: []string{"ejection-needs-many-endpoints"}, messageHas: []string{"unless svc has at least 5 endpoints"},
		},
		{
			name: "no ejection at all", policy: "retry: {perTryTimeout: 1s, on: [timeout]}\noutlierDetection: {maxEjectionPercent: 0}",
			want: perTry1s, warnings: []string{}, outlierHas: "no endpoint is ever ejected",
		},
		{
			name: "concurrency too low for the failure ratio", policy: "retry: {attempts: 1}\nconcurrency: {maxInFlight: 10}",
			want: oneAttempt, warnings: []string{"failure-ratio-unreachable"},
			messageHas: []string{"concurrency.maxInFlight (10) with requests of up to 15s lets at most 6 requests finish in a 10s window"},
		},
		{
			// DESIGN.md's example breaker (and the old defaults): a path
			// that always fails, 1 request in 10, opens it every few
			// minutes at 100 requests/s, by either rule.
			name: "a failing path opens the breaker", policy: "retry: {perTryTimeout: 1s, on: [timeout, 503]}\ncircuitBreaker: {consecutiveFailures: 5, minRequests: 20}",
			want: perTry1s, warnings: []string{"breaker-opens-on-failing-path"},
			messageHas: []string{"With 1 request in 10 failing (a path that always fails, among healthy ones), the breaker opens by chance about once in 62 thousand requests (at 100 requests/s: every 10m)",
				"Raise circuitBreaker.consecutiveFailures to at least 11 and circuitBreaker.minRequests to at least 41."},
			breakerHas: "it opens by chance about once in 62 thousand requests (see the warnings)",
		},
		{
			name: "a failure ratio over too few requests", policy: "retry: {perTryTimeout: 1s, on: [timeout, 503]}\ncircuitBreaker: {minRequests: 20}",
			want: perTry1s, warnings: []string{"breaker-opens-on-failing-path"},
			messageHas: []string{"about once in 140 thousand requests", "Raise circuitBreaker.minRequests to at least 41."},
		},
		{
			name: "a failure ratio as low as a failing path", policy: "retry: {perTryTimeout: 1s, on: [timeout, 503]}\ncircuitBreaker: {failureRatio: 0.1}",
			want: perTry1s, warnings: []string{"breaker-opens-on-failing-path"},
			messageHas: []string{"(at 100 requests/s: every under a second)", "Raise circuitBreaker.failureRatio well above 10%."},
		},
		{
			// Without retries a failing instance fails 1 request in 6:
			// 10 in a row come once in 73 million.
			name: "a failing instance not hidden by retries opens the breaker", policy: "retry: {attempts: 1}\ncircuitBreaker: {consecutiveFailures: 10}",
			want: oneAttempt, warnings: []string{"breaker-opens-on-failing-instance"},
			messageHas: []string{"With 1 request in 6 failing (one instance of three answering 503 to half its calls, which retries do not hide)",
				"about once in 73 million requests", "Raise circuitBreaker.consecutiveFailures to at least 14."},
		},
		{
			name: "breaker on one failure, half-open with three probes", policy: "retry: {attempts: 1}\ncircuitBreaker: {consecutiveFailures: 1, halfOpenRequests: 3}",
			want: oneAttempt, warnings: []string{"breaker-opens-on-one-failure", "breaker-opens-on-failing-path", "breaker-opens-on-failing-instance"},
			messageHas: []string{"a single failed request opens the breaker"},
			breakerHas: "3 probe requests go through: 3 successes in a row close it",
		},
		{
			name:     "connect timeout as long as the timeout",
			policy:   "timeout: 2s\nconnectTimeout: 2s\nretry: {attempts: 1}",
			want:     outcome{attempts: 1, longest: 2 * time.Second, byTimeout: true, fitting: 1, connect: 2 * time.Second, factorAt10: 1, factorAt1k: 1},
			warnings: []string{"connect-timeout-not-below-timeout"},
		},
		{
			name:   "connect timeout cut by the per-try timeout",
			policy: "connectTimeout: 5s\nretry: {perTryTimeout: 500ms, on: [timeout]}",
			want: outcome{attempts: 3, longest: 1500*time.Millisecond + 75*time.Millisecond, fitting: 3, connect: 500 * time.Millisecond,
				backoffsSum: 75 * time.Millisecond, factorAt10: 2.2, factorAt1k: 1.21},
			warnings: []string{"connect-timeout-unused"},
		},
		{
			name: "hedged", policy: "retry: {perTryTimeout: 1s, on: [timeout]}\nhedge: {delay: 20ms}", want: perTry1s, warnings: []string{},
			hedgeHas: "When an idempotent request (retry.methods: GET, HEAD, OPTIONS, PUT, DELETE, or any with an Idempotency-Key), whose body " +
				"is held in memory, has no answer 20ms after an attempt started, it is also sent to another endpoint, up to 1 hedge",
		},
		{
			name: "hedges that cannot be sent", policy: "retry: {attempts: 1}\nhedge: {delay: 20ms, maxHedges: 2}", want: oneAttempt,
			warnings: []string{"hedge-never-sent"}, messageHas: []string{"Raise retry.attempts to 3"},
			hedgeHas: "a request sends at most 0 hedges",
		},
		{
			name: "hedge after the per-try timeout", policy: "retry: {perTryTimeout: 1s, on: [timeout]}\nhedge: {delay: 1s}", want: perTry1s,
			warnings: []string{"hedge-after-per-try-timeout"},
		},
		{
			name: "hedging off", policy: "", want: defaultOutcome, warnings: []string{"no-per-try-timeout"},
			hedgeHas: "Off (hedge.delay 0s)",
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			by := map[string]Policy{}
			if tc.policy != "" {
				by["svc"] = doc(t, "service: svc\n"+tc.policy)
			}
			e := Explain("svc", by)
			var sum time.Duration
			for _, b := range e.Backoffs {
				sum += b.D()
			}
			got := outcome{attempts: e.MaxAttempts, longest: e.Longest.D(), byTimeout: e.LongestByTimeout, fitting: e.FittingAttempts,
				connect: e.ConnectTimeout.D(), backoffsSum: sum}
			if len(e.Load) == len(LoadRates) {
				got.factorAt10, got.factorAt1k = round2(e.Load[1].Factor), round2(e.Load[3].Factor)
			}
			if got != tc.want || len(e.Backoffs) != tc.want.attempts-1 {
				t.Errorf("Explain = %+v with backoffs %v; want %+v", got, e.Backoffs, tc.want)
			}
			if got := codes(e.Warnings); !slices.Equal(got, tc.warnings) {
				t.Errorf("warnings %v; want %v\n%v", got, tc.warnings, e.Warnings)
			}
			var all strings.Builder
			for _, w := range e.Warnings {
				all.WriteString(w.Message + "\n")
			}
			for _, want := range tc.messageHas {
				if !strings.Contains(all.String(), want) {
					t.Errorf("warning messages lack %q:\n%s", want, all.String())
				}
			}
			if tc.breakerHas != "" && !strings.Contains(strings.Join(e.CircuitBreaker, "\n"), tc.breakerHas) {
				t.Errorf("breaker words lack %q:\n%s", tc.breakerHas, strings.Join(e.CircuitBreaker, "\n"))
			}
			if tc.hedgeHas != "" && !strings.Contains(strings.Join(e.Hedge, "\n"), tc.hedgeHas) {
				t.Errorf("hedge words lack %q:\n%s", tc.hedgeHas, strings.Join(e.Hedge, "\n"))
			}
			if tc.outlierHas != "" && !strings.Contains(strings.Join(e.OutlierDetection, "\n"), tc.outlierHas) {
				t.Errorf("outlier words lack %q:\n%s", tc.outlierHas, strings.Join(e.OutlierDetection, "\n"))
			}
		})
	}
}

func round2(f float64) float64 { return math.Round(f*100) / 100 }

func near(a, b float64) bool { return a-b < 1e-9 && b-a < 1e-9 }

// The budget bounds retries at ratio × rate + minPerSecond; retry.attempts
// bounds them at (attempts-1) × rate; the lower one holds.
func TestExplainLoad(t *testing.T) {
	e := Explain("svc", nil) // attempts 3, ratio 0.2, minPerSecond 10
	want := []Load{
		{RequestsPerSecond: 1, RetriesPerSecond: 2, Factor: 3, ByBudget: false},
		{RequestsPerSecond: 10, RetriesPerSecond: 12, Factor: 2.2, ByBudget: true},
		{RequestsPerSecond: 100, RetriesPerSecond: 30, Factor: 1.3, ByBudget: true},
		{RequestsPerSecond: 1000, RetriesPerSecond: 210, Factor: 1.21, ByBudget: true},
	}
	for i, w := range want {
		g := e.Load[i]
		if g.RequestsPerSecond != w.RequestsPerSecond || !near(g.RetriesPerSecond, w.RetriesPerSecond) || !near(g.Factor, w.Factor) || g.ByBudget != w.ByBudget {
			t.Errorf("load at %g/s = %+v; want %+v", w.RequestsPerSecond, g, w)
		}
	}
}

// Each value's origin is the last document that sets it; lists and
// scalars alike, nested sections field by field.
func TestExplainOrigins(t *testing.T) {
	by := map[string]Policy{
		"*":   doc(t, "service: '*'\ntimeout: 10s\nretry: {attempts: 2, methods: [GET]}\n"),
		"svc": doc(t, "service: svc\nretry: {attempts: 4, backoff: {max: 1s}}\n"),
	}
	want := map[string]string{
		"timeout":            "*",
		"connectTimeout":     "default",
		"retry.attempts":     "svc",
		"retry.backoff.base": "default",
		"retry.backoff.max":  "svc",
		"retry.methods":      "*",
		"retry.on":           "default",
	}
	check := func(e Explanation, want map[string]string) {
		t.Helper()
		got := map[string]string{}
		for _, f := range e.Fields {
			got[f.Path] = f.Origin + "=" + f.Value
		}
		for path, origin := range want {
			if o, _, _ := strings.Cut(got[path], "="); o != origin {
				t.Errorf("%s: origin %q; want %q (fields %v)", path, got[path], origin, got)
			}
		}
		if n := policyLeaves(reflect.TypeFor[Policy]()); len(e.Fields) != n {
			t.Errorf("%d fields; want %d (every leaf of a policy)", len(e.Fields), n)
		}
	}
	e := Explain("svc", by)
	check(e, want)
	if e.Fields[0].Path != "timeout" || e.Fields[0].Value != "10s" || e.Fields[1].Path != "streamIdleTimeout" ||
		e.Fields[3].Path != "retry.attempts" || e.Fields[3].Value != "4" {
		t.Errorf("fields not in document order: %v", e.Fields[:4])
	}
	// The "*" policy explained is its own service.
	check(Explain("*", by), map[string]string{"timeout": "*", "retry.attempts": "*", "retry.backoff.max": "default"})

	// In force: origins inferred from the effective policies.
	star := Effective("*", by)
	eff := Effective("svc", by)
	check(ExplainInForce("svc", &star, eff, true), want)
	check(ExplainInForce("svc", nil, eff, true), map[string]string{"timeout": "* or svc", "retry.attempts": "* or svc", "connectTimeout": "default"})
	starOnly := Effective("other", by)
	check(ExplainInForce("other", nil, starOnly, false), map[string]string{"timeout": "*", "retry.attempts": "*", "connectTimeout": "default"})
	if e := ExplainInForce("svc", &star, eff, true); !e.OriginsInferred {
		t.Error("ExplainInForce: OriginsInferred not set")
	}
}

func TestMinEndpointsToEject(t *testing.T) {
	for pct, want := range map[int]int{0: 0, 1: 100, 20: 5, 33: 4, 34: 3, 50: 2, 51: 2, 100: 2} {
		if got := MinEndpointsToEject(pct); got != want {
			t.Errorf("MinEndpointsToEject(%d) = %d; want %d", pct, got, want)
		}
	}
}

func TestFormatDuration(t *testing.T) {
	for d, want := range map[time.Duration]string{
		0: "0s", 250 * time.Millisecond: "250ms", time.Minute: "1m", 90 * time.Second: "1m30s",
		time.Hour: "1h", 90 * time.Minute: "1h30m", 6075 * time.Millisecond: "6.075s",
	} {
		if got := FormatDuration(d); got != want {
			t.Errorf("FormatDuration(%v) = %q; want %q", d, got, want)
		}
	}
}

// policyLeaves counts the settable leaves of a policy type: every field
// under a section, and the top-level ones but the document's header.
func policyLeaves(t reflect.Type) int {
	n := 0
	for i := range t.NumField() {
		f := t.Field(i)
		switch f.Name {
		case "APIVersion", "Kind", "Service":
			continue
		}
		ft := f.Type
		if ft.Kind() == reflect.Pointer && ft.Elem().Kind() == reflect.Struct {
			n += policyLeaves(ft.Elem())
			continue
		}
		n++
	}
	return n
}
