package outbound

import (
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/policy"
	"github.com/sidecar-mesh/sidecar/pkg/upstream"
)

// budget caps retries at a share of recent requests plus a floor per
// second, so that retries cannot multiply the load on a service that is
// down: over any span of time, retries <= ratio * requests + minPerSecond
// per second. The ratio part is counted over a sliding window of ten
// one-second buckets; the floor is per second, so it never bursts. Safe
// for concurrent use.
type budget struct {
	mu       sync.Mutex // guards the buckets
	sec      [10]int64  // unix second of each bucket
	requests [10]int64
	retries  [10]int64 // taken from the ratio
	floor    [10]int64 // taken from the per-second floor
}

func (b *budget) bucket(now int64) int {
	i := int(now % 10)
	if b.sec[i] != now {
		b.sec[i], b.requests[i], b.retries[i], b.floor[i] = now, 0, 0, 0
	}
	return i
}

// request records a first attempt.
func (b *budget) request(now time.Time) {
	s := now.Unix()
	b.mu.Lock()
	b.requests[b.bucket(s)]++
	b.mu.Unlock()
}

// allowRetry takes a retry from the budget if there is one: from the ratio
// of the window's requests, else from this second's floor.
func (b *budget) allowRetry(now time.Time, ratio float64, minPerSecond int) bool {
	s := now.Unix()
	b.mu.Lock()
	defer b.mu.Unlock()
	var requests, retries int64
	for i := range b.sec {
		if s-b.sec[i] < 10 {
			requests += b.requests[i]
			retries += b.retries[i]
		}
	}
	i := b.bucket(s)
	switch {
	case float64(retries) < ratio*float64(requests):
		b.retries[i]++
	case b.floor[i] < int64(minPerSecond):
		b.floor[i]++
	default:
		return false
	}
	return true
}

// usage returns the requests and retries of the last 10 s.
func (b *budget) usage(now time.Time) (requests, retries int64) {
	s := now.Unix()
	b.mu.Lock()
	defer b.mu.Unlock()
	for i := range b.sec {
		if s-b.sec[i] < 10 {
			requests += b.requests[i]
			retries += b.retries[i] + b.floor[i]
		}
	}
	return requests, retries
}

// retryReason says why an attempt's outcome may be retried under p, or ""
// when it may not. A connect failure is retryable for any method: nothing
// of the request was sent.
func retryReason(p *policy.Retry, req *http.Request, resp *http.Response, err error) string {
	switch {
	case err == nil && resp.StatusCode == http.StatusOK && isGRPCResponse(resp):
		// The service owner lists the gRPC statuses that are safe to
		// retry; the HTTP method (always POST) says nothing about it.
		if code := grpcStatus(resp); code != "" {
			if c := grpcCondition(code); c != "" && slices.Contains(p.On, c) {
				return c
			}
		}
		return ""
	case err != nil && isConnectError(err):
		if slices.Contains(p.On, "connect-failure") {
			return "connect-failure"
		}
		return ""
	case err == nil && resp.StatusCode < 400:
		return ""
	case !retryableMethod(p, req):
		return ""
	case err != nil && isPerTryTimeout(err):
		if slices.Contains(p.On, "timeout") {
			return "timeout"
		}
	case err != nil:
		if isUpstreamError(err) && slices.Contains(p.On, "reset") {
			return "reset"
		}
	default:
		code := strconv.Itoa(resp.StatusCode)
		if slices.Contains(p.On, code) {
			return code
		}
	}
	return ""
}

func isGRPCResponse(resp *http.Response) bool {
	return strings.HasPrefix(resp.Header.Get("Content-Type"), "application/grpc")
}

// grpcCondition is the retry.on name of a grpc-status code, or "" for a
// code no condition names.
func grpcCondition(code string) string {
	switch code {
	case "14":
		return "grpc-unavailable"
	case "8":
		return "grpc-resource-exhausted"
	case "4":
		return "grpc-deadline-exceeded"
	case "1":
		return "grpc-cancelled"
	}
	return ""
}

// settleGRPC makes a retryable gRPC call's outcome visible before anything
// reaches the client. A trailers-only answer carries its grpc-status in the
// headers already. Otherwise, when the policy retries on some gRPC status
// and the request could be sent again, it reads the first byte of the
// body: a body that ends before any message leaves its status in the
// trailers; a body with a message is given back whole, and the call is
// committed. A
// call whose request still streams (client or bidi streaming) is never
// held up this way.
func settleGRPC(p *policy.Retry, req *http.Request, resp *http.Response, deadline time.Time, hasDeadline bool) (*http.Response, error) {
	if resp.StatusCode != http.StatusOK || !isGRPCResponse(resp) || resp.Header.Get("Grpc-Status") != "" ||
		!slices.ContainsFunc(p.On, func(c string) bool { return strings.HasPrefix(c, "grpc-") }) {
		return resp, nil
	}
	if !requestEnded(req) {
		return resp, nil
	}
	// The read runs on its own so that the hold is bounded: a server
	// stream may send its headers at once and its first message much
	// later. The policy's deadlines bound only the wait for a stream's
	// headers, so the hold ends before they pass and the stream goes on
	// unsettled (its deadlines then lifted) instead of being cut.
	fb := &firstByte{done: make(chan struct{})}
	body := resp.Body
	go func() {
		fb.n, fb.err = io.ReadFull(body, fb.b[:])
		close(fb.done)
	}()
	var hold <-chan time.Time
	if hasDeadline {
		t := time.NewTimer(holdFor(time.Until(deadline)))
		defer t.Stop()
		hold = t.C
	}
	select {
	case <-fb.done:
	case <-hold:
		resp.Body = &awaitedBody{fb: fb, rest: body}
		return resp, nil
	}
	switch {
	case fb.n == 1:
		resp.Body = &settledBody{first: fb.b[0], rest: body}
	case fb.err != io.EOF:
		// The stream broke before its first message (reset, connection
		// lost): an upstream failure, for the chain to judge (retry, or
		// a trailers-only UNAVAILABLE), not an answer begun.
		body.Close()
		return nil, &upstream.UpstreamError{Addr: req.URL.Host, Op: "read response", Written: true, Err: fb.err}
	}
	// At the body's end the trailers are in resp.Trailer, where
	// grpcStatus finds them; the answer itself is passed on untouched
	// (moving the status into the headers would break it for a client when
	// other trailers follow).
	return resp, nil
}

// holdFor is how long a gRPC answer's first message is waited for when
// left is the time to its attempt's deadline: a margin before it, so that
// the stream is passed on, its deadlines lifted, before they cut it.
func holdFor(left time.Duration) time.Duration {
	return max(0, left-min(100*time.Millisecond, left/2))
}

// firstByte is the read of a gRPC answer's first byte, on its own.
type firstByte struct {
	done chan struct{}
	b    [1]byte
	n    int
	err  error
}

// awaitedBody is a gRPC answer passed on before its first byte came: the
// read under way is waited for before anything else.
type awaitedBody struct {
	fb     *firstByte
	rest   io.ReadCloser
	served bool
}

func (b *awaitedBody) Read(p []byte) (int, error) {
	if !b.served {
		<-b.fb.done
		b.served = true
		if b.fb.n == 0 {
			return 0, b.fb.err
		}
		if len(p) == 0 {
			return 0, nil
		}
		p[0] = b.fb.b[0]
		if len(p) == 1 {
			return 1, nil
		}
		n, err := b.rest.Read(p[1:])
		return 1 + n, err
	}
	return b.rest.Read(p)
}

// Close ends the body, and the read under way with it.
func (b *awaitedBody) Close() error {
	err := b.rest.Close()
	<-b.fb.done
	return err
}

// settledBody is a gRPC answer's body whose first byte settleGRPC read.
// The byte goes out with what follows it: alone it is no use to the client
// (a message's first byte is its compression flag), and sent alone it
// would cost a DATA frame and a write of its own.
type settledBody struct {
	first byte
	sent  bool
	rest  io.ReadCloser
}

func (b *settledBody) Read(p []byte) (int, error) {
	if b.sent || len(p) == 0 {
		return b.rest.Read(p)
	}
	b.sent = true
	p[0] = b.first
	if len(p) == 1 {
		return 1, nil
	}
	n, err := b.rest.Read(p[1:])
	return 1 + n, err
}

func (b *settledBody) Close() error { return b.rest.Close() }

// requestEnded reports whether the whole of req's body was taken and can be
// sent again: none, or one that ended within the record. A body not read
// from yet is still streaming: the HTTP/2 transport may write it only
// after the answer's headers came back, and a bidi client may wait for
// those headers before it sends.
func requestEnded(req *http.Request) bool {
	if rb, ok := req.Body.(*replayBody); ok {
		rb.mu.Lock()
		defer rb.mu.Unlock()
		return rb.complete
	}
	_, ok := upstream.Rewound(req)
	return ok
}

// grpcStatus is a gRPC answer's grpc-status as far as it is known: from a
// trailers-only answer's headers, or from the trailers once the body has
// ended (settleGRPC reads that far when a retry could follow).
func grpcStatus(resp *http.Response) string {
	if code := resp.Header.Get("Grpc-Status"); code != "" {
		return code
	}
	return resp.Trailer.Get("Grpc-Status")
}

// encodeGRPCTimeout writes d as a grpc-timeout value (at most 8 digits).
func encodeGRPCTimeout(d time.Duration) string {
	if d <= 0 {
		return "1n"
	}
	for _, u := range []struct {
		unit time.Duration
		name string
	}{{time.Nanosecond, "n"}, {time.Microsecond, "u"}, {time.Millisecond, "m"}, {time.Second, "S"}, {time.Minute, "M"}} {
		if v := (d + u.unit - 1) / u.unit; v <= 99999999 {
			return strconv.FormatInt(int64(v), 10) + u.name
		}
	}
	return strconv.FormatInt(int64(d/time.Hour)+1, 10) + "H"
}

func isConnectError(err error) bool {
	var ce *upstream.ConnectError
	return errors.As(err, &ce)
}

func isUpstreamError(err error) bool {
	var ue *upstream.UpstreamError
	return errors.As(err, &ue)
}

func retryableMethod(p *policy.Retry, req *http.Request) bool {
	return slices.Contains(p.Methods, req.Method) || upstream.HasIdempotencyKey(req)
}

func isPerTryTimeout(err error) bool { return errors.Is(err, errPerTryTimeout) }

// perTryExpired reports whether an attempt that failed at now failed for
// its per-try timeout: its timer fired, or its deadline has passed and the
// timer is just late. The upstream is told that deadline (grpc-timeout) and
// resets the stream when it passes; on a busy machine its reset can arrive
// before this side's timer has run, and it is still the timeout, not an
// upstream failure.
func perTryExpired(actx context.Context, perTry bool, now time.Time) bool {
	if !perTry {
		return false
	}
	if errors.Is(context.Cause(actx), errPerTryTimeout) {
		return true
	}
	dl, ok := actx.Deadline()
	return ok && !now.Before(dl)
}

// backoffDelay is the backoff before retry number retry (policy.Backoff.Delay,
// what policy explain reasons with, drawn from r), raised by the response's
// Retry-After in seconds.
func backoffDelay(b *policy.Backoff, retry int, resp *http.Response, r *rand.Rand) time.Duration {
	var retryAfter time.Duration
	if resp != nil {
		if s, err := strconv.Atoi(resp.Header.Get("Retry-After")); err == nil && s > 0 {
			retryAfter = time.Duration(s) * time.Second
		}
	}
	return b.Delay(retry, retryAfter, r)
}

// discard drains a little of a response being retried so its connection
// can be reused, then closes it.
func discard(resp *http.Response) {
	_, _ = io.CopyN(io.Discard, resp.Body, 64<<10)
	_ = resp.Body.Close()
}

// sleep waits d unless ctx ends first.
func sleep(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}
