package simulate

import (
	"strings"
	"testing"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/policy"
)

func tableScenario() *Scenario {
	return &Scenario{Service: "echo", Rate: 200, Duration: policy.Duration(time.Minute), Instances: []Instances{
		{Count: 2, Latency: Latency{P50: policy.Duration(5 * time.Millisecond)}},
		{Count: 1, Latency: Latency{P50: policy.Duration(5 * time.Millisecond)}, FailureRate: 0.5,
			From: policy.Duration(10 * time.Second), To: policy.Duration(40 * time.Second)},
	}}
}

func TestWriteTable(t *testing.T) {
	recovered, never := 2.5, -1.0
	results := []Result{
		{Policy: "default", Requests: 12000, Succeeded: 11990, SuccessRate: 0.99916, P50Ms: 5.04, P99Ms: 21.37, P999Ms: 130,
			AttemptsPerRequest: 1.0849, Retries: map[string]int{"503": 1000, "reset": 19}, BudgetExhausted: 3,
			BreakerOpenings: 2, BreakerOpenSeconds: 10, Ejections: 4, Shed: map[string]int{}, RecoverySeconds: &recovered},
		{Policy: "policies/no\tretry.yaml", Requests: 12000, Succeeded: 10000, SuccessRate: 10000.0 / 12000, P50Ms: 5, P99Ms: 19.96, P999Ms: 25.5,
			AttemptsPerRequest: 1, Hedges: 7, HedgesWon: 5, Shed: map[string]int{"circuit_open": 12}, RecoverySeconds: &never, Duplicates: 1},
	}
	var b strings.Builder
	if err := WriteTable(&b, tableScenario(), results); err != nil {
		t.Fatalf("WriteTable = %v", err)
	}
	want := `echo: 200 requests/s for 1m0s, 3 instances

POLICY                     default   policies/no retry.yaml
requests                   12000     12000
success rate               99.92%    83.33%
p50 (ms)                   5.0       5.0
p99 (ms)                   21.4      20.0
p99.9 (ms)                 130.0     25.5
attempts per request       1.08      1.00
retries                    1019      0
retries (503)              1000      0
retries (reset)            19        0
budget exhausted           3         0
hedges sent                0         7
hedges won                 0         5
breaker openings           2         0
breaker open (s)           10.0      0.0
ejections                  4         0
shed                       0         12
shed (circuit_open)        0         12
recovery after fault (s)   2.5       never
duplicates                 0         1
`
	if got := b.String(); got != want {
		t.Fatalf("WriteTable wrote:\n%s\nwant:\n%s", got, want)
	}
}

// Without a failure window that ends, recovery does not apply; without
// retries or sheds, no row by reason.
func TestWriteTableNotApplicable(t *testing.T) {
	var b strings.Builder
	if err := WriteTable(&b, tableScenario(), []Result{{Policy: "default", Requests: 10, Succeeded: 10, SuccessRate: 1}}); err != nil {
		t.Fatalf("WriteTable = %v", err)
	}
	got := b.String()
	for _, want := range []string{"success rate               100.00%\n", "recovery after fault (s)   -\n", "retries                    0\n"} {
		if !strings.Contains(got, want) {
			t.Errorf("WriteTable wrote:\n%s\nwant a line %q", got, want)
		}
	}
	if strings.Contains(got, "retries (") || strings.Contains(got, "shed (") {
		t.Errorf("WriteTable wrote:\n%s\nwant no row by reason when no result has one", got)
	}
}
