package policy

import (
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// The Policy example of DESIGN.md, field for field.
const designExample = `apiVersion: sidecar/v1
kind: Policy
service: user-service
timeout: 5s
retry:
  attempts: 3
  perTryTimeout: 1s
  backoff: {base: 25ms, max: 250ms}
  on: [connect-failure, reset, 502, 503, 504, grpc-unavailable]
  methods: [GET, HEAD, OPTIONS, PUT, DELETE]
  budget: {ratio: 0.2, minPerSecond: 10}
circuitBreaker:
  consecutiveFailures: 5
  failureRatio: 0.5
  minRequests: 20
  window: 10s
  openDuration: 30s
  halfOpenRequests: 1
outlierDetection: {consecutiveFailures: 5, ejectionTime: 30s, maxEjectionPercent: 50}
concurrency: {maxInFlight: 1024}
`

func TestParseDesignExample(t *testing.T) {
	ps, err := Parse([]byte(designExample), "p.yaml")
	if err != nil {
		t.Fatal(err)
	}
	p := ps[0]
	if p.Service != "user-service" || p.Timeout.D() != 5*time.Second || *p.Retry.Attempts != 3 ||
		p.Retry.PerTryTimeout.D() != time.Second || p.Retry.Backoff.Max.D() != 250*time.Millisecond ||
		len(p.Retry.On) != 6 || *p.Retry.Budget.Ratio != 0.2 || *p.CircuitBreaker.HalfOpenRequests != 1 ||
		*p.OutlierDetection.MaxEjectionPercent != 50 || *p.Concurrency.MaxInFlight != 1024 {
		t.Fatalf("parsed %+v", p)
	}
}

func TestDefaultsValid(t *testing.T) {
	if err := Defaults().Validate(); err != nil {
		t.Fatalf("Defaults() does not validate: %v", err)
	}
}

// streamIdleTimeout is a field like the others: set, merged over the
// default (5m), validated with its range.
func TestStreamIdleTimeout(t *testing.T) {
	ps, err := Parse([]byte("service: '*'\nstreamIdleTimeout: 30s\n---\nservice: a\ntimeout: 2s\n"), "p.yaml")
	if err != nil {
		t.Fatal(err)
	}
	by := map[string]Policy{"*": ps[0], "a": ps[1]}
	if got := Effective("a", by).StreamIdleTimeout.D(); got != 30*time.Second {
		t.Fatalf("streamIdleTimeout of a = %v, want 30s from *", got)
	}
	if got := Effective("b", nil).StreamIdleTimeout.D(); got != 5*time.Minute {
		t.Fatalf("default streamIdleTimeout = %v, want 5m", got)
	}
	for _, bad := range []string{"0s", "25h"} {
		_, err := Parse([]byte("service: a\nstreamIdleTimeout: "+bad+"\n"), "p.yaml")
		if err == nil || !strings.Contains(err.Error(), "streamIdleTimeout: ") || !strings.Contains(err.Error(), "(allowed: 1ms to 24h0m0s)") {
			t.Errorf("streamIdleTimeout: %s gave %v, want an error naming the field and its range", bad, err)
		}
	}
}

func TestParseJSONAndMultiDoc(t *testing.T) {
	ps, err := Parse([]byte(`{"service": "*", "timeout": "2s"}
---
service: a
retry: {attempts: 1}
`), "p.yaml")
	if err != nil || len(ps) != 2 || ps[0].Timeout.D() != 2*time.Second || *ps[1].Retry.Attempts != 1 {
		t.Fatalf("Parse = %+v, %v", ps, err)
	}
}

func TestParseErrors(t *testing.T) {
	cases := []struct {
		name, doc string
		want      []string
	}{
		{"unknown key", "service: a\nretry:\n  atempts: 3\n", []string{`p.yaml:3: unknown key "retry.atempts" (allowed: attempts, backoff, budget, methods, on, perTryTimeout)`}},
		{"missing service", "timeout: 1s\n", []string{`service: missing`}},
		{"bad duration", "service: a\ntimeout: fast\n", []string{`p.yaml:2: timeout: invalid duration "fast" (allowed: 1ms to 1h0m0s, written as 250ms, 5s or 1m)`}},
		// Caught by FuzzParse's round trip (seed nan-ratios): NaN passed every range check.
		{"NaN ratios", "service: a\nretry: {budget: {ratio: .nan}}\ncircuitBreaker: {failureRatio: .NaN}\n", []string{
			"retry.budget.ratio: NaN is not allowed (allowed: 0 to 1)",
			"circuitBreaker.failureRatio: NaN is not allowed (allowed: more than 0, at most 1)"}},
		{"every range at once", `service: a
timeout: 2h
streamIdleTimeout: 25h
connectTimeout: 2m
retry: {attempts: 0, perTryTimeout: 3h, backoff: {base: 1s, max: 10ms}, on: [sometimes, 302], methods: [get], budget: {ratio: 1.5, minPerSecond: -1}}
circuitBreaker: {consecutiveFailures: 0, failureRatio: 0, minRequests: 0, window: 1ms, openDuration: 2h, halfOpenRequests: 0}
outlierDetection: {consecutiveFailures: 0, ejectionTime: 1ms, maxEjectionPercent: 101}
concurrency: {maxInFlight: 0}
hedge: {delay: 2m, maxHedges: 4}
`, []string{
			"p.yaml:1: document 1: timeout: 2h0m0s is not allowed (allowed: 1ms to 1h0m0s)",
			"streamIdleTimeout: 25h0m0s is not allowed (allowed: 1ms to 24h0m0s)",
			"connectTimeout: 2m0s is not allowed (allowed: 1ms to 1m0s)",
			"retry.attempts: 0 is not allowed (allowed: 1 to 10)",
			"retry.perTryTimeout: 3h0m0s is not allowed (allowed: 1ms to 1h0m0s, or 0 for none)",
			"retry.perTryTimeout: 3h0m0s is not allowed (allowed: at most timeout (2h0m0s))",
			"retry.backoff.max: 10ms is not allowed (allowed: at least retry.backoff.base (1s))",
			`retry.on[0]: "sometimes" is not allowed`,
			`retry.on[1]: "302" is not allowed`,
			`retry.methods[0]: "get" is not allowed`,
			"retry.budget.ratio: 1.5 is not allowed (allowed: 0 to 1)",
			"retry.budget.minPerSecond: -1 is not allowed",
			"circuitBreaker.consecutiveFailures: 0",
			"circuitBreaker.failureRatio: 0 is not allowed (allowed: more than 0, at most 1)",
			"circuitBreaker.minRequests: 0",
			"circuitBreaker.window: 1ms",
			"circuitBreaker.openDuration: 2h0m0s",
			"circuitBreaker.halfOpenRequests: 0",
			"outlierDetection.consecutiveFailures: 0",
			"outlierDetection.ejectionTime: 1ms",
			"outlierDetection.maxEjectionPercent: 101 is not allowed (allowed: 0 to 100)",
			"concurrency.maxInFlight: 0 is not allowed (allowed: 1 to 1000000)",
			"hedge.delay: 2m0s is not allowed (allowed: 1ms to 1m0s, or 0 for none)",
			"hedge.maxHedges: 4 is not allowed (allowed: 1 to 3)",
		}},
		{"bad service and version", "apiVersion: v2\nkind: Route\nservice: Users_1\n", []string{`apiVersion: "v2"`, `kind: "Route"`, `service: "Users_1"`}},
		{"duplicate service", "service: a\n---\nservice: a\n", []string{`document 2: service "a" already has a policy in document 1`}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(tc.doc), "p.yaml")
			if err == nil {
				t.Fatal("Parse accepted an invalid policy")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error lacks %q:\n%v", w, err)
				}
			}
		})
	}
}

func TestEffectiveMergesDefaultUnderService(t *testing.T) {
	ps, err := Parse([]byte(`service: "*"
timeout: 2s
retry: {attempts: 2, budget: {ratio: 0.1}}
---
service: users
retry: {perTryTimeout: 500ms, on: [reset]}
circuitBreaker: {openDuration: 7s}
`), "p.yaml")
	if err != nil {
		t.Fatal(err)
	}
	by := map[string]Policy{}
	for _, p := range ps {
		by[p.Service] = p
	}
	e := Effective("users", by)
	d := Defaults()
	switch {
	case e.Service != "users":
		t.Fatalf("service %q", e.Service)
	case e.Timeout.D() != 2*time.Second:
		t.Fatalf("timeout %v, want 2s from *", e.Timeout)
	case *e.Retry.Attempts != 2 || e.Retry.PerTryTimeout.D() != 500*time.Millisecond:
		t.Fatalf("retry %+v, want attempts from * and perTryTimeout from users", e.Retry)
	case *e.Retry.Budget.Ratio != 0.1 || *e.Retry.Budget.MinPerSecond != *d.Retry.Budget.MinPerSecond:
		t.Fatalf("budget %+v, want ratio from * and minPerSecond from the defaults", e.Retry.Budget)
	case len(e.Retry.On) != 1 || e.Retry.On[0] != "reset":
		t.Fatalf("on %v, want the service's list replacing the default", e.Retry.On)
	case e.CircuitBreaker.OpenDuration.D() != 7*time.Second || *e.CircuitBreaker.ConsecutiveFailures != *d.CircuitBreaker.ConsecutiveFailures:
		t.Fatalf("circuitBreaker %+v", e.CircuitBreaker)
	}
	if err := e.Validate(); err != nil {
		t.Fatalf("effective policy invalid: %v", err)
	}
	// Merging never aliases: changing the result leaves inputs alone.
	*e.Retry.Attempts = 9
	if *by["*"].Retry.Attempts != 2 || *Defaults().Retry.Attempts != 3 {
		t.Fatal("Effective shares pointers with its inputs")
	}
	if o := Effective("other", by); o.Timeout.D() != 2*time.Second || o.Retry.PerTryTimeout.D() != 0 {
		t.Fatalf("a service without its own policy: %+v", o)
	}
}
