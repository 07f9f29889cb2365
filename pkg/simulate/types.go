// Package simulate runs the outbound policy chain, the same code as
// `sidecar run`, against modelled instances of a service in virtual time:
// what a policy does under a failure model, before it ships.
package simulate

import (
	"github.com/sidecar-mesh/sidecar/pkg/policy"
)

// APIVersion and Kind name a Scenario document.
const (
	APIVersion = "sidecar/v1"
	Kind       = "Scenario"
)

// Scenario is a failure model of one service: its instances, how they
// answer and fail over time, and the load the app offers it.
type Scenario struct {
	APIVersion string `yaml:"apiVersion" json:"apiVersion"`
	Kind       string `yaml:"kind" json:"kind"`
	// Service is the service's name, as policies name it.
	Service string `yaml:"service" json:"service"`
	// Rate is the requests per second the app sends, open loop: each
	// goes out on schedule (Poisson arrivals) whatever happened to those
	// before it.
	Rate float64 `yaml:"rate" json:"rate"`
	// Duration is how long the load runs, in virtual time.
	Duration policy.Duration `yaml:"duration" json:"duration"`
	// Requests describes each request the app sends; nil: GETs without a
	// body.
	Requests *Requests `yaml:"requests,omitempty" json:"requests,omitempty"`
	// Instances are the service's instances, in groups alike.
	Instances []Instances `yaml:"instances" json:"instances"`
}

// Requests is the mix of requests the app sends.
type Requests struct {
	// Methods gives each method's share of the requests (normalised to
	// their sum); empty: GET only.
	Methods map[string]float64 `yaml:"methods,omitempty" json:"methods,omitempty"`
	// IdempotencyKey is the share of requests that carry an
	// Idempotency-Key header (0 to 1).
	IdempotencyKey float64 `yaml:"idempotencyKey,omitempty" json:"idempotencyKey,omitempty"`
	// BodyBytes is the size of the body of a request whose method has one
	// (POST, PUT, PATCH); 0: none.
	BodyBytes int `yaml:"bodyBytes,omitempty" json:"bodyBytes,omitempty"`
}

// Instances is a group of Count instances alike.
type Instances struct {
	Count int `yaml:"count" json:"count"`
	// Latency is how long an instance takes to answer.
	Latency Latency `yaml:"latency" json:"latency"`
	// FailureRate is the share of requests that fail (0 to 1), in the
	// way Failure says, while the failure window (From, To) lasts.
	FailureRate float64 `yaml:"failureRate,omitempty" json:"failureRate,omitempty"`
	// Failure is how a request fails: an HTTP status 500-599 ("503",
	// the default), "reset" (the connection is reset once the instance
	// worked on the request), "refused" (no connection: nothing is
	// sent), or "stall" (no answer until the sidecar gives up).
	Failure string `yaml:"failure,omitempty" json:"failure,omitempty"`
	// From and To bound the failure window, from the start of the run;
	// To 0: until the end.
	From policy.Duration `yaml:"from,omitempty" json:"from,omitempty"`
	To   policy.Duration `yaml:"to,omitempty" json:"to,omitempty"`
	// Join and Leave are when the instances enter and leave the service's
	// endpoint set; Leave 0: they stay to the end.
	Join  policy.Duration `yaml:"join,omitempty" json:"join,omitempty"`
	Leave policy.Duration `yaml:"leave,omitempty" json:"leave,omitempty"`
}

// Latency is a latency distribution: log-normal through P50 and P99, or a
// Histogram.
type Latency struct {
	P50 policy.Duration `yaml:"p50,omitempty" json:"p50,omitempty"`
	P99 policy.Duration `yaml:"p99,omitempty" json:"p99,omitempty"`
	// Histogram lists buckets: a share of the answers (summing to 1) take
	// up to UpTo, uniformly from the bucket before's UpTo.
	Histogram []Bucket `yaml:"histogram,omitempty" json:"histogram,omitempty"`
}

// Bucket is one bucket of a latency histogram.
type Bucket struct {
	UpTo  policy.Duration `yaml:"upTo" json:"upTo"`
	Share float64         `yaml:"share" json:"share"`
}

// Failure kinds besides an HTTP status (Instances.Failure).
const (
	FailReset   = "reset"
	FailRefused = "refused"
	FailStall   = "stall"
)

// Result is what one policy did under the scenario.
type Result struct {
	// Policy names the policy: its file, or "default".
	Policy   string `json:"policy"`
	Requests int    `json:"requests"`
	// Succeeded are the requests answered 2xx-4xx (the app's own
	// errors are answers); SuccessRate their share.
	Succeeded   int     `json:"succeeded"`
	SuccessRate float64 `json:"successRate"`
	// Latency percentiles of every request, answered or failed, in
	// milliseconds.
	P50Ms  float64 `json:"p50Ms"`
	P99Ms  float64 `json:"p99Ms"`
	P999Ms float64 `json:"p999Ms"`
	// AttemptsPerRequest counts every attempt sent to an instance,
	// hedges included.
	AttemptsPerRequest float64 `json:"attemptsPerRequest"`
	// Retries by reason (the retry.on condition).
	Retries         map[string]int `json:"retries"`
	BudgetExhausted int            `json:"budgetExhausted"`
	Hedges          int            `json:"hedges"`
	HedgesWon       int            `json:"hedgesWon"`
	// BreakerOpenings is how many times the circuit breaker opened, and
	// BreakerOpenSeconds how long it was open in all.
	BreakerOpenings    int     `json:"breakerOpenings"`
	BreakerOpenSeconds float64 `json:"breakerOpenSeconds"`
	Ejections          int     `json:"ejections"`
	// Shed are requests refused without an attempt, by reason
	// (overloaded, circuit_open).
	Shed map[string]int `json:"shed"`
	// RecoverySeconds is how long after the last failure window ended
	// every request succeeded again for a whole second; nil without a
	// window that ends before the run, -1 if it never did.
	RecoverySeconds *float64 `json:"recoverySeconds,omitempty"`
	// Duplicates are requests not safe to repeat (no retry.methods method
	// and no Idempotency-Key) that an instance worked on more than once:
	// 0 unless a policy retries what it should not.
	Duplicates int `json:"duplicates"`
	// Timeline is the run second by second.
	Timeline []Second `json:"timeline"`
}

// Second is one second of a run.
type Second struct {
	// T is the second's start, in seconds from the run's start.
	T         int     `json:"t"`
	Requests  int     `json:"requests"`
	Succeeded int     `json:"succeeded"`
	Attempts  int     `json:"attempts"`
	P99Ms     float64 `json:"p99Ms"`
	// BreakerOpen is the share of the second the breaker was open.
	BreakerOpen float64 `json:"breakerOpen"`
	Ejected     int     `json:"ejected"` // endpoints ejected at the second's end
}
