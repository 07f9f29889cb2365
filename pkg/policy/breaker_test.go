package policy

import (
	"math"
	"testing"
)

// The breaker's rule, on counts of requests: the defaults open after 20
// failures in a row, or half of at least 100 requests in the window.
func TestReadyToTrip(t *testing.T) {
	cb := Defaults().CircuitBreaker
	for _, tc := range []struct {
		consecutive, requests, failures int
		want                            bool
	}{
		{20, 20, 20, true},
		{19, 99, 99, false},
		{0, 100, 50, true},
		{0, 100, 49, false},
		{0, 99, 99, false},
		{1, 1000, 500, true},
	} {
		if got := cb.ReadyToTrip(tc.consecutive, tc.requests, tc.failures); got != tc.want {
			t.Errorf("ReadyToTrip(%d in a row, %d requests, %d failed) = %v, want %v", tc.consecutive, tc.requests, tc.failures, got, tc.want)
		}
	}
	if k := cb.RunToTrip(); k != 20 {
		t.Errorf("RunToTrip = %d, want 20", k)
	}
	if n, x := cb.WindowToTrip(); n != 100 || x != 50 {
		t.Errorf("WindowToTrip = %d requests, %d failed; want 100 and 50", n, x)
	}
}

// The chances the estimate is made of, against values known by hand.
func TestBreakerChances(t *testing.T) {
	if got := runWait(0.5, 2); got != 6 { // two heads in a row: 6 tosses
		t.Errorf("runWait(0.5, 2) = %v, want 6", got)
	}
	if got := binomialTail(4, 2, 0.5); math.Abs(got-11.0/16) > 1e-12 {
		t.Errorf("binomialTail(4, 2, 0.5) = %v, want 11/16", got)
	}
	if got := binomialTail(10, 0, 0.3); got != 1 {
		t.Errorf("binomialTail(10, 0, 0.3) = %v, want 1", got)
	}
}

// The defaults hold where a service without the sidecar would answer most
// requests: a path that always fails (1 request in 10) and an instance of
// three failing half its calls with no retry to hide it (1 in 6) open the
// breaker by chance less than once in QuietRequests. The old defaults (5 in
// a row, a ratio over 20) did not.
func TestDefaultBreakerQuiet(t *testing.T) {
	cb := Defaults().CircuitBreaker
	for _, f := range []float64{FailingPathShare, FailingInstanceShare} {
		if every := cb.RequestsBetweenOpenings(f); every < QuietRequests {
			t.Errorf("with %.3g of requests failing the default breaker opens about once in %.3g requests, want at most once in %g", f, every, QuietRequests)
		}
	}
	old := doc(t, "service: a\ncircuitBreaker: {consecutiveFailures: 5, minRequests: 20}\n").CircuitBreaker
	old.FailureRatio = cb.FailureRatio
	if every := old.RequestsBetweenOpenings(FailingPathShare); every > 1e6 {
		t.Errorf("5 in a row or half of 20 open about once in %.3g requests with 1 in 10 failing, want far more often", every)
	}
}
