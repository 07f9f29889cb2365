package requestlog

import (
	"fmt"
	"strconv"
)

// Answer is what the app was answered, in a few words: the status and
// the sidecar's reason or the grpc-status ("502 upstream_connect_failure",
// "200 grpc-status 14").
func (r *Request) Answer() string {
	s := strconv.Itoa(r.Status)
	if r.Reason != "" {
		s += " " + r.Reason
	}
	if r.GRPCStatus != "" {
		s += " grpc-status " + r.GRPCStatus
	}
	return s
}

// StopWords says in words why the chain made no further attempt, naming
// the policy field that decided; "" when Stop is.
func (r *Request) StopWords() string {
	last := ""
	for _, a := range r.Attempts {
		if !a.Lost {
			last = a.Outcome
		}
	}
	switch r.Stop {
	case StopAttemptsUsedUp:
		return fmt.Sprintf("attempts used up (retry.attempts: %d)", len(r.Attempts))
	case StopBudgetExhausted:
		return "retry budget exhausted (retry.budget): retries are already at their share of the traffic"
	case StopDeadline:
		return "the deadline could not cover the next backoff and attempt (timeout)"
	case StopBreakerOpen:
		if len(r.Attempts) == 0 {
			return "circuit breaker open: the request was not sent (circuitBreaker)"
		}
		return "circuit breaker open: no retry into it (circuitBreaker)"
	case StopMethodNotRetryable:
		return r.Method + " is not retried (retry.methods; an Idempotency-Key header allows it)"
	case StopBodyNotReplayable:
		return "the request body could not be sent again (over 64 KiB, or still streaming)"
	case StopNotRetryable:
		return last + " is not a retry.on condition"
	}
	return r.Stop
}

// Hedge is the RetryReason of a hedge.
const Hedge = "hedge"

// Why says why an attempt was made, in a few words: "retry on 503 after
// 25 ms backoff", "hedge: no answer yet within hedge.delay"; "" for a
// first attempt.
func (a *Attempt) Why() string {
	switch a.RetryReason {
	case "":
		return ""
	case Hedge:
		return "hedge: no answer yet within hedge.delay"
	}
	return "retry on " + a.RetryReason + " after " + Millis(a.BackoffMs) + " backoff"
}

// Millis writes a duration in milliseconds for people: "61 ms", "0.4 ms".
func Millis(ms float64) string {
	if ms < 10 {
		return strconv.FormatFloat(ms, 'f', 1, 64) + " ms"
	}
	return strconv.FormatFloat(ms, 'f', 0, 64) + " ms"
}
