package policy

import "math"

// The circuit breaker's rules, as the running breaker asks them and as
// `sidecar policy explain` works out what they mean: one place, so that the
// explanation never drifts from what runs. The counts are of requests, by
// their outcome after retries.

// TripsOnRun reports whether failures failed requests in a row open the
// breaker.
func (cb *CircuitBreaker) TripsOnRun(failures int) bool {
	return failures >= *cb.ConsecutiveFailures
}

// TripsOnWindow reports whether requests seen in the breaker's window, of
// which failures failed, open it.
func (cb *CircuitBreaker) TripsOnWindow(requests, failures int) bool {
	return requests >= *cb.MinRequests && float64(failures) >= *cb.FailureRatio*float64(requests)
}

// ReadyToTrip is the breaker's rule, asked after each failed request with
// the failures in a row and the window's requests and failures.
func (cb *CircuitBreaker) ReadyToTrip(consecutive, requests, failures int) bool {
	return cb.TripsOnRun(consecutive) || cb.TripsOnWindow(requests, failures)
}

// Requests the breaker's counts are searched up to.
const maxCount = 1 << 24

// RunToTrip is the fewest failed requests in a row that open the breaker.
func (cb *CircuitBreaker) RunToTrip() int {
	return smallest(1, maxCount, cb.TripsOnRun)
}

// WindowToTrip is the fewest requests in a window on which the failure
// ratio can open the breaker, and how many of them must fail.
func (cb *CircuitBreaker) WindowToTrip() (requests, failures int) {
	requests = smallest(1, maxCount, func(n int) bool { return cb.TripsOnWindow(n, n) })
	failures = smallest(0, requests, func(x int) bool { return cb.TripsOnWindow(requests, x) })
	return requests, failures
}

// smallest is the least n in [lo, hi] for which ok, whose answers go from
// false to true once; hi+1 when there is none.
func smallest(lo, hi int, ok func(int) bool) int {
	for lo <= hi {
		mid := lo + (hi-lo)/2
		if ok(mid) {
			hi = mid - 1
		} else {
			lo = mid + 1
		}
	}
	return lo
}

// RequestsBetweenOpenings estimates how many requests pass, on average,
// between openings of the breaker when each request fails at random with
// probability f, as when a path that always fails takes a share f of the
// traffic: the expected wait for a run of RunToTrip failures, or for a
// window of WindowToTrip requests with enough failures, whichever comes
// sooner. The window's part is on the safe side: it takes the fewest
// requests the ratio acts on (a busier window holds more, and trips less
// by chance) and a new window at every request. +Inf when neither can
// happen.
func (cb *CircuitBreaker) RequestsBetweenOpenings(f float64) float64 {
	// Openings per request, by either rule.
	return 1 / (1/cb.requestsBetweenRuns(f) + 1/cb.requestsBetweenWindows(f))
}

// runWait is the expected number of trials until k successes in a row,
// each with probability p: (1 - p^k) / ((1 - p) p^k).
func runWait(p float64, k int) float64 {
	if p >= 1 {
		return float64(k)
	}
	pk := math.Exp(float64(k) * math.Log(p))
	return (1 - pk) / ((1 - p) * pk)
}

// binomialTail is P(X >= x) for X ~ Binomial(n, p), summed in logs from x
// up while its terms matter.
func binomialTail(n, x int, p float64) float64 {
	if x <= 0 {
		return 1
	}
	if p >= 1 {
		return 1
	}
	lp, lq := math.Log(p), math.Log1p(-p)
	lgn, _ := math.Lgamma(float64(n + 1))
	sum := 0.0
	for j := x; j <= n; j++ {
		lgj, _ := math.Lgamma(float64(j + 1))
		lgr, _ := math.Lgamma(float64(n - j + 1))
		term := math.Exp(lgn - lgj - lgr + float64(j)*lp + float64(n-j)*lq)
		sum += term
		if j > int(float64(n)*p) && term < sum*1e-17 {
			break
		}
	}
	return min(sum, 1)
}

// requestsBetweenRuns is RequestsBetweenOpenings by the run rule alone.
func (cb *CircuitBreaker) requestsBetweenRuns(f float64) float64 {
	if k := cb.RunToTrip(); f > 0 && k <= maxCount {
		return runWait(f, k)
	}
	return math.Inf(1)
}

// requestsBetweenWindows is RequestsBetweenOpenings by the ratio rule
// alone.
func (cb *CircuitBreaker) requestsBetweenWindows(f float64) float64 {
	if n, x := cb.WindowToTrip(); f > 0 && n <= maxCount {
		return 1 / binomialTail(n, x, f)
	}
	return math.Inf(1)
}
