package simulate

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/policy"
)

// The Scenario example of DESIGN.md, as written there.
const designScenario = `apiVersion: sidecar/v1
kind: Scenario
service: echo
rate: 200          # requests per second, open loop
duration: 60s
instances:
  - {count: 2, latency: {p50: 5ms, p99: 20ms}}
  - {count: 1, latency: {p50: 5ms, p99: 20ms}, failureRate: 0.5, from: 10s, to: 40s}
`

func TestParseScenarioDesignExample(t *testing.T) {
	s, err := ParseScenario([]byte(designScenario), "scenario.yaml")
	if err != nil {
		t.Fatalf("ParseScenario(DESIGN.md's example) = %v", err)
	}
	g := s.Instances[1]
	if s.Service != "echo" || s.Rate != 200 || s.Duration.D() != time.Minute || len(s.Instances) != 2 ||
		s.Instances[0].Count != 2 || g.Latency.P50.D() != 5*time.Millisecond || g.Latency.P99.D() != 20*time.Millisecond ||
		g.FailureRate != 0.5 || g.From.D() != 10*time.Second || g.To.D() != 40*time.Second {
		t.Fatalf("parsed %+v", s)
	}
	// Defaults: GETs only, failures are 503s.
	if s.Requests == nil || len(s.Requests.Methods) != 1 || s.Requests.Methods["GET"] != 1 || g.Failure != "503" {
		t.Fatalf("defaults: requests %+v, failure %q; want methods {GET: 1}, failure 503", s.Requests, g.Failure)
	}
	if err := s.Validate(); err != nil {
		t.Fatalf("a parsed scenario, defaults filled, does not validate: %v", err)
	}
}

func TestParseScenarioJSONAndDefaults(t *testing.T) {
	s, err := ParseScenario([]byte(`{"kind": "Scenario", "service": "a", "rate": 10, "duration": "5s",
		"requests": {"methods": {"POST": 1, "GET": 3}, "idempotencyKey": 0.5, "bodyBytes": 1024},
		"instances": [{"count": 1, "latency": {"p50": "2ms"}, "failure": "reset"},
		              {"count": 2, "latency": {"histogram": [{"upTo": "1ms", "share": 0.9}, {"upTo": "100ms", "share": 0.1}]}}]}`), "s.json")
	if err != nil {
		t.Fatalf("ParseScenario(JSON) = %v", err)
	}
	if s.APIVersion != APIVersion || s.Requests.Methods["POST"] != 1 || s.Requests.BodyBytes != 1024 {
		t.Fatalf("parsed %+v, requests %+v", s, s.Requests)
	}
	if l := s.Instances[0].Latency; l.P99 != l.P50 {
		t.Errorf("p99 without a value = %v, want p50 (%v)", l.P99, l.P50)
	}
	if g := s.Instances[0]; g.Failure != FailReset {
		t.Errorf("failure = %q, want reset kept", g.Failure)
	}
	if l := s.Instances[1].Latency; l.P50 != 0 || l.P99 != 0 || len(l.Histogram) != 2 {
		t.Errorf("histogram latency became %+v, want the histogram alone", l)
	}
}

func TestParseScenarioErrors(t *testing.T) {
	cases := []struct {
		name, doc string
		want      []string
	}{
		{"unknown key", "kind: Scenario\nservice: a\nrate: 1\nduration: 1s\ninstances:\n  - count: 1\n    latncy: {p50: 1ms}\n",
			[]string{`s.yaml:7: unknown key "instances[0].latncy" (allowed: count, failure, failureRate, from, join, latency, leave, to)`}},
		{"unknown top-level key", "kind: Scenario\nrps: 10\n",
			[]string{`s.yaml:2: unknown key "rps" (allowed: apiVersion, duration, instances, kind, rate, requests, service)`}},
		{"empty", "# nothing yet\n", []string{"s.yaml: empty (want a Scenario document, YAML or JSON)"}},
		{"two documents", designScenario + "---\n" + designScenario, []string{"more than one YAML document"}},
		{"bad duration", "kind: Scenario\nduration: soon\n", []string{`s.yaml:2: invalid duration "soon"`}},
		{"missing", "apiVersion: sidecar/v1\n", []string{
			"s.yaml: kind: missing (allowed: Scenario)",
			"s.yaml: service: missing (allowed: a service name",
			"s.yaml: rate: 0 is not allowed (allowed: more than 0, at most 100000)",
			"s.yaml: duration: missing (allowed: 1s to 1h0m0s)",
			"s.yaml: instances: missing (allowed: one or more groups of instances",
		}},
		{"every range at once", `apiVersion: sidecar/v2
kind: Policy
service: Echo_1
rate: 200000
duration: 2h
requests: {methods: {get: 1, POST: 0, PUT: -1}, idempotencyKey: 1.5, bodyBytes: 2000000}
instances:
  - {count: 0, latency: {}}
  - {count: 1001, latency: {p50: 11m, p99: 1ms}, failureRate: 1.5, failure: "404"}
  - {count: 1, latency: {p99: 5ms}, failure: slow}
  - {count: 1, latency: {p50: 5ms, histogram: [{upTo: 1ms, share: 1}]}}
  - count: 1
    latency: {histogram: [{upTo: 10ms, share: 0.5}, {upTo: 5ms, share: 0}, {share: 1.5}, {upTo: 11m, share: .nan}]}
  - count: 1
    latency: {histogram: [{upTo: 10ms, share: 0.5}, {upTo: 20ms, share: 0.4}]}
`, []string{
			`s.yaml: apiVersion: "sidecar/v2" is not allowed (allowed: sidecar/v1)`,
			`s.yaml: kind: "Policy" is not allowed (allowed: Scenario)`,
			`s.yaml: service: "Echo_1" is not allowed (allowed: a service name: lower-case letters, digits and '-', at most 63)`,
			"s.yaml: rate: 200000 is not allowed (allowed: more than 0, at most 100000)",
			"s.yaml: duration: 2h0m0s is not allowed (allowed: 1s to 1h0m0s)",
			`s.yaml: requests.methods: "get" is not allowed (allowed: an upper-case HTTP method such as GET)`,
			"s.yaml: requests.methods.POST: 0 is not allowed (allowed: a share more than 0)",
			"s.yaml: requests.methods.PUT: -1 is not allowed (allowed: a share more than 0)",
			"s.yaml: requests.idempotencyKey: 1.5 is not allowed (allowed: 0 to 1)",
			"s.yaml: requests.bodyBytes: 2000000 is not allowed (allowed: 0 to 1048576 (1 MiB))",
			"s.yaml: instances[0].count: 0 is not allowed (allowed: 1 to 1000)",
			"s.yaml: instances[0].latency: missing (allowed: p50 (and p99), or a histogram)",
			"s.yaml: instances[1].count: 1001 is not allowed (allowed: 1 to 1000)",
			"s.yaml: instances[1].latency.p50: 11m0s is not allowed (allowed: more than 0s, at most 10m0s)",
			"s.yaml: instances[1].latency.p99: 1ms is not allowed (allowed: p50 (11m0s) to 10m0s, or 0 for p50)",
			"s.yaml: instances[1].failureRate: 1.5 is not allowed (allowed: 0 to 1)",
			`s.yaml: instances[1].failure: "404" is not allowed (allowed: an HTTP status 500-599, reset, refused, stall)`,
			"s.yaml: instances[2].latency.p50: missing (allowed: more than 0s, at most 10m0s)",
			`s.yaml: instances[2].failure: "slow" is not allowed`,
			"s.yaml: instances[3].latency: p50/p99 and a histogram is not allowed (allowed: p50 (and p99), or a histogram, not both)",
			"s.yaml: instances[4].latency.histogram[1].upTo: 5ms is not allowed (allowed: more than histogram[0].upTo (10ms), at most 10m0s)",
			"s.yaml: instances[4].latency.histogram[1].share: 0 is not allowed (allowed: more than 0, at most 1)",
			"s.yaml: instances[4].latency.histogram[2].upTo: missing (allowed: more than 0s, at most 10m0s)",
			"s.yaml: instances[4].latency.histogram[2].share: 1.5 is not allowed (allowed: more than 0, at most 1)",
			"s.yaml: instances[4].latency.histogram[3].upTo: 11m0s is not allowed (allowed: more than 0s, at most 10m0s)",
			"s.yaml: instances[4].latency.histogram[3].share: NaN is not allowed",
			"s.yaml: instances[5].latency.histogram: shares summing to 0.9 is not allowed (allowed: shares summing to 1)",
		}},
		{"too many requests and instances", `kind: Scenario
service: a
rate: 1000
duration: 1h
instances: [{count: 600, latency: {p50: 1ms}}, {count: 500, latency: {p50: 1ms}}]
`, []string{
			"s.yaml: rate: 1000 is not allowed (allowed: at most 555.5 per second for duration 1h0m0s (2000000 requests in all))",
			"s.yaml: instances: 1100 instances is not allowed (allowed: at most 1000 in all)",
		}},
		{"NaN rate", "kind: Scenario\nservice: a\nrate: .nan\nduration: 1s\ninstances: [{count: 1, latency: {p50: 1ms}}]\n",
			[]string{"s.yaml: rate: NaN is not allowed (allowed: more than 0, at most 100000)"}},
		{"windows", `kind: Scenario
service: a
rate: 10
duration: 60s
instances:
  - {count: 1, latency: {p50: 1ms}, from: 70s}
  - {count: 1, latency: {p50: 1ms}, from: 20s, to: 10s}
  - {count: 1, latency: {p50: 1ms}, from: 20s, to: 61s}
  - {count: 1, latency: {p50: 1ms}, join: 61s}
  - {count: 1, latency: {p50: 1ms}, join: 30s, leave: 30s}
  - {count: 1, latency: {p50: 1ms}, leave: 2m}
`, []string{
			"s.yaml: instances[0].from: 1m10s is not allowed (allowed: 0s to duration (1m0s))",
			"s.yaml: instances[1].to: 10s is not allowed (allowed: more than from (20s), at most duration (1m0s), or 0 for the end)",
			"s.yaml: instances[2].to: 1m1s is not allowed (allowed: at most duration (1m0s), or 0 for the end)",
			"s.yaml: instances[3].join: 1m1s is not allowed (allowed: 0s to duration (1m0s))",
			"s.yaml: instances[4].leave: 30s is not allowed (allowed: more than join (30s), at most duration (1m0s), or 0 for the end)",
			"s.yaml: instances[5].leave: 2m0s is not allowed (allowed: at most duration (1m0s), or 0 for the end)",
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s, err := ParseScenario([]byte(tc.doc), "s.yaml")
			if err == nil {
				t.Fatalf("ParseScenario accepted an invalid scenario: %+v", s)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error lacks %q:\n%v", w, err)
				}
			}
		})
	}
}

// Every invalid value comes as a *policy.FieldError, which callers can
// find with errors.As.
func TestParseScenarioFieldErrors(t *testing.T) {
	_, err := ParseScenario([]byte(strings.Replace(designScenario, "failureRate: 0.5", "failureRate: 1.5", 1)), "scenario.yaml")
	var fe *policy.FieldError
	if !errors.As(err, &fe) || fe.Path != "instances[1].failureRate" || fe.Value != "1.5" || fe.Allowed != "0 to 1" {
		t.Fatalf("ParseScenario(failureRate 1.5) = %v; want a *policy.FieldError for instances[1].failureRate", err)
	}
	if want := "scenario.yaml: instances[1].failureRate: 1.5 is not allowed (allowed: 0 to 1)"; err.Error() != want {
		t.Fatalf("error = %q, want %q", err, want)
	}
}
