package outbound

import (
	"cmp"
	"context"
	"errors"
	"net/http"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/sony/gobreaker/v2"
	"go.opentelemetry.io/otel/trace"

	"github.com/sidecar-mesh/sidecar/pkg/forward"
	"github.com/sidecar-mesh/sidecar/pkg/policy"
	"github.com/sidecar-mesh/sidecar/pkg/requestlog"
	"github.com/sidecar-mesh/sidecar/pkg/upstream"
)

// attemptNote is what the chain notes of one attempt while it runs: raw
// values, written in place in the call (the first attempt's) or in the
// call's list of retries, so that an attempt costs no allocation. They are
// made into words (requestlog.Attempt) only for a request the recorder
// wants: one that failed, or one a tap or the access log watches.
type attemptNote struct {
	endpoint string
	took     time.Duration
	resp     *http.Response // the answer; nil with err
	err      error
	retryOf  string // the retry.on condition it retried; "" for the first
	backoff  time.Duration
	breaker  gobreaker.State
	judged   bool // breaker was read when the attempt was judged
	lost     bool // cancelled: another attempt of a race answered first
}

// note is the note of attempt number n (1 for the first try).
func (c *call) note(n int) *attemptNote {
	if n == 1 {
		return &c.first
	}
	for len(c.retries) < n-1 {
		c.retries = append(c.retries, attemptNote{})
	}
	return &c.retries[n-2]
}

// noted is how many attempts were noted.
func (c *call) noted() int {
	if c.first.endpoint == "" {
		return 0
	}
	return 1 + len(c.retries)
}

// stopCause says why no attempt followed one whose outcome failed: the
// outcome is no retry.on condition (or is one, but not for this method),
// else cause, what the loop found first.
func stopCause(r *policy.Retry, req *http.Request, resp *http.Response, err error, cause string) string {
	if retryReason(r, req, resp, err) != "" {
		return cause
	}
	anyMethod := *r
	anyMethod.Methods = []string{req.Method}
	if retryReason(&anyMethod, req, resp, err) != "" {
		return requestlog.StopMethodNotRetryable
	}
	return requestlog.StopNotRetryable
}

// record hands a finished call to the recorder when it failed (a local
// error, a 5xx, a gRPC server failure) or when the recorder wants every
// request. e is the local error that answered it, if any; resp the
// answer otherwise. Nothing is allocated for a call the recorder does not
// want.
func (ch *chain) record(c *call, req *http.Request, span trace.Span, start time.Time, resp *http.Response, e *forward.LocalError) {
	head := requestlog.Request{Service: c.service, Method: req.Method}
	if e != nil {
		head.Status, head.Reason, head.Detail = e.Status, e.Reason, e.Detail
	} else {
		head.Status = resp.StatusCode
		if isGRPCResponse(resp) {
			head.GRPCStatus = grpcStatus(resp)
		}
	}
	failed := head.Failed()
	if !failed && !ch.recorder.Wants() {
		return
	}
	out := new(requestlog.Request) // head stays on the stack for the calls not kept
	*out = head
	// The path as sent, escaped: what a path holds (%0D%0A, an escape
	// sequence) stays visible and inert wherever it is shown.
	out.Time, out.Path, out.DurationMs = start, req.URL.EscapedPath(), ms(time.Since(start))
	if span != nil {
		if sc := span.SpanContext(); sc.IsSampled() {
			out.TraceID = sc.TraceID().String()
		}
	}
	tried := c.noted()
	out.Attempts = make([]requestlog.Attempt, 0, tried)
	for i := range tried {
		n := c.note(i + 1)
		bs := n.breaker
		if !n.judged {
			bs = c.state.breaker.Load().State()
		}
		out.Attempts = append(out.Attempts, requestlog.Attempt{
			Endpoint:     n.endpoint,
			Outcome:      outcome(n),
			DurationMs:   ms(n.took),
			RetryReason:  n.retryOf,
			BackoffMs:    ms(n.backoff),
			Lost:         n.lost,
			BreakerState: bs.String(),
		})
	}
	if failed {
		out.Stop = c.stop
		if tried > 0 && (out.Stop == requestlog.StopAttemptsUsedUp || out.Stop == requestlog.StopNotRetryable) {
			last := c.note(cmp.Or(c.judged, tried))
			out.Stop = stopCause(c.policy.Retry, req, last.resp, last.err, c.stop)
		}
	}
	ch.recorder.Record(out)
}

// outcome says how an attempt ended, in a few words: its status (and
// grpc-status), or its failure.
func outcome(n *attemptNote) string {
	if n.err == nil && n.resp != nil {
		s := strconv.Itoa(n.resp.StatusCode)
		if g := grpcStatus(n.resp); g != "" {
			s += " grpc-status " + g
		}
		return s
	}
	err := n.err
	switch {
	case err == nil:
		return "unknown"
	case n.lost:
		return "cancelled: another attempt answered first"
	}
	var le *forward.LocalError
	var ce *upstream.ConnectError
	var ue *upstream.UpstreamError
	var bad *upstream.BadResponseError
	switch {
	case isPerTryTimeout(err):
		return "per-try timeout"
	case errors.Is(err, context.DeadlineExceeded):
		return "timeout"
	case errors.Is(err, context.Canceled):
		return "canceled"
	case errors.As(err, &le):
		return le.Reason
	case errors.Is(err, syscall.ECONNREFUSED):
		return "connection refused"
	case errors.As(err, &ce):
		return "connect failure: " + lastPart(ce.Err)
	case errors.As(err, &bad):
		return "bad response: " + bad.Reason
	case errors.As(err, &ue):
		if errors.Is(err, syscall.ECONNRESET) {
			return "reset (" + ue.Op + ")"
		}
		return "reset (" + ue.Op + ": " + lastPart(ue.Err) + ")"
	}
	return lastPart(err)
}

// lastPart is the innermost words of an error message: "connection
// refused" of "dial tcp 10.0.0.5:8080: connect: connection refused".
func lastPart(err error) string {
	s := err.Error()
	if i := strings.LastIndex(s, ": "); i >= 0 {
		return s[i+2:]
	}
	return s
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
