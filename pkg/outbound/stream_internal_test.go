package outbound

// Streams in virtual time: the policy's timeout bounds the wait for a
// stream's headers and the whole of an answer of known length; a stream
// runs while it sends, and ends after streamIdleTimeout of silence or at
// the caller's own deadline.

import (
	"context"
	"errors"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"testing/synctest"
	"time"
)

// feed is an upstream answer whose body is written by the test, as a
// transport's would be: it fails once the attempt's context ends.
type feed struct {
	resp *http.Response
	w    *io.PipeWriter
}

// stall, used as a feed's header, makes the transport return only once the
// attempt's context ends (an upstream that never answers).
const stall = "X-Test-Stall"

// feedTransport answers every attempt with a feed handed to the test on
// the channel; header sets the answer's headers.
func feedTransport(header http.Header, length int64, feeds chan<- *feed) rtFunc {
	return func(r *http.Request) (*http.Response, error) {
		if header.Get(stall) != "" {
			<-r.Context().Done()
			return nil, r.Context().Err()
		}
		pr, pw := io.Pipe()
		context.AfterFunc(r.Context(), func() { pw.CloseWithError(r.Context().Err()) })
		resp := &http.Response{StatusCode: 200, Header: header.Clone(), Body: pr, ContentLength: length, Request: r}
		feeds <- &feed{resp: resp, w: pw}
		return resp, nil
	}
}

// readAll reads body to its end and counts the events that arrived.
func readAll(body io.Reader) (events int, err error) {
	b, err := io.ReadAll(body)
	return strings.Count(string(b), "data: "), err
}

// send writes an event every gap, n times, then leaves the body open
// (silent) or closes it.
func send(f *feed, n int, gap time.Duration, end bool) {
	for i := range n {
		time.Sleep(gap)
		if _, err := f.w.Write([]byte("data: " + strconv.Itoa(i) + "\n\n")); err != nil {
			return
		}
	}
	if end {
		f.w.Close()
	}
}

// exchange sends req through c, the answer fed with events every gap
// (end: then its body ends), and reads the answer to its end. It returns
// the answer, the events read, when reading ended (after the headers) and
// how; the feeding goroutine has returned.
func exchange(t *testing.T, c *testChain, req *http.Request, feeds <-chan *feed, events int, gap time.Duration, end bool) (*http.Response, int, time.Duration, error) {
	t.Helper()
	sent := make(chan struct{})
	go func() {
		defer close(sent)
		send(<-feeds, events, gap, end)
	}()
	resp, err := c.rt.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	n, err := readAll(resp.Body)
	took := time.Since(start)
	resp.Body.Close()
	<-sent // past the end of the answer its next write fails
	return resp, n, took, err
}

// An event stream that sends every 100ms for 1.5s under a 300ms timeout is
// not cut: all 15 events arrive and nothing is counted as cut. The same
// stream going silent is cut streamIdleTimeout after its last event, and
// counted.
func TestStreamOutlivesTimeoutUntilIdle(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		feeds := make(chan *feed, 1)
		c := newTestChain(t, "service: svc\ntimeout: 300ms\nstreamIdleTimeout: 1s\n", []string{"10.0.0.1:80"},
			feedTransport(http.Header{"Content-Type": {"text/event-stream"}}, -1, feeds))

		_, pieces, _, err := exchange(t, c, mustRequest(t, context.Background()), feeds, 15, 100*time.Millisecond, true)
		if pieces != 15 || err != nil {
			t.Fatalf("a stream sending every 100ms for 1.5s under a 300ms timeout: %d of 15 events, then %v; want all and its end", pieces, err)
		}
		if len(c.observer.cut) != 0 {
			t.Fatalf("streams counted as cut: %v, want none", c.observer.cut)
		}

		_, pieces, took, err := exchange(t, c, mustRequest(t, context.Background()), feeds, 3, 100*time.Millisecond, false)
		silent := took - 300*time.Millisecond
		var cut *StreamCutError
		if pieces != 3 || !errors.As(err, &cut) || cut.Reason != StreamCutIdle {
			t.Fatalf("a stream silent after 3 events: %d events, then %v; want 3 and a StreamCutError for idleness", pieces, err)
		}
		if silent != time.Second {
			t.Fatalf("cut after %v of silence, want streamIdleTimeout (1s)", silent)
		}
		if c.observer.cut[StreamCutIdle] != 1 || len(c.observer.cut) != 1 {
			t.Fatalf("streams counted as cut: %v, want 1 for idle", c.observer.cut)
		}
		if n := c.chain.inFlight.Load(); n != 0 {
			t.Fatalf("%d requests still in flight after both streams ended, want 0", n)
		}
	})
}

// An answer of known length is no stream: its whole body must arrive
// within the timeout, and a slow one is cut there, as an error the
// forwarder aborts on (not counted as a stream cut). Headers that do not
// come within the timeout give 504 upstream_timeout, stream or not.
func TestTimeoutBoundsAnswerOfKnownLength(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		feeds := make(chan *feed, 1)
		c := newTestChain(t, "service: svc\ntimeout: 300ms\n", []string{"10.0.0.1:80"},
			feedTransport(http.Header{"Content-Type": {"text/plain"}}, 1000, feeds))
		_, pieces, took, err := exchange(t, c, mustRequest(t, context.Background()), feeds, 15, 120*time.Millisecond, true)
		if pieces != 2 || !errors.Is(err, context.DeadlineExceeded) || took != 300*time.Millisecond {
			t.Fatalf("a 1000-byte body trickling in for 1.8s: %d pieces, then %v after %v; want 2, then the deadline at 300ms",
				pieces, err, took)
		}
		if len(c.observer.cut) != 0 {
			t.Fatalf("streams counted as cut: %v, want none: the answer was no stream", c.observer.cut)
		}

		for _, h := range []http.Header{{"Content-Type": {"text/event-stream"}, stall: {"1"}}, {stall: {"1"}}} {
			c := newTestChain(t, "service: svc\ntimeout: 300ms\nretry: {attempts: 1}\n", []string{"10.0.0.1:80"}, feedTransport(h, -1, feeds))
			if code, reason := c.do(context.Background(), "GET", nil); code != 504 || reason != "upstream_timeout" {
				t.Fatalf("headers %v never sent: %d %q, want 504 upstream_timeout", h, code, reason)
			}
		}
	})
}

// A gRPC stream that goes silent ends with DEADLINE_EXCEEDED in its
// trailers (the body ends cleanly, so the trailers reach the client), and
// one whose caller's deadline passes mid-stream the same, counted apart.
// The upstream is told the caller's deadline, never the policy's timeout.
func TestGRPCStreamCut(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		feeds := make(chan *feed, 1)
		var told []string
		transport := feedTransport(http.Header{"Content-Type": {"application/grpc"}}, -1, feeds)
		c := newTestChain(t, "service: svc\ntimeout: 300ms\nstreamIdleTimeout: 2s\n", []string{"10.0.0.1:80"},
			func(r *http.Request) (*http.Response, error) {
				told = append(told, r.Header.Get("Grpc-Timeout"))
				return transport(r)
			})
		call := func(header http.Header, events int) (*http.Response, int, error) {
			req := mustRequest(t, context.Background())
			req.Method, req.ProtoMajor, req.Header = "POST", 2, header
			req.Header.Set("Content-Type", "application/grpc")
			resp, pieces, _, err := exchange(t, c, req, feeds, events, 250*time.Millisecond, false)
			return resp, pieces, err
		}

		// A call the policy could retry (grpc-unavailable is in retry.on)
		// is held until its first byte, within the timeout: the messages
		// come every 250ms.
		resp, pieces, err := call(http.Header{}, 4)
		if pieces != 4 || err != nil || resp.Trailer.Get("Grpc-Status") != "4" {
			t.Fatalf("a gRPC stream silent after 4 messages over 1s: %d messages, %v, trailers %v; want 4, a clean end, grpc-status 4",
				pieces, err, resp.Trailer)
		}
		t.Logf("grpc-message: %s", resp.Trailer.Get("Grpc-Message"))

		resp, pieces, err = call(http.Header{"Grpc-Timeout": {"600m"}}, 4)
		if pieces != 2 || err != nil || resp.Trailer.Get("Grpc-Status") != "4" {
			t.Fatalf("a gRPC stream past its caller's 600ms deadline: %d messages, %v, trailers %v; want 2, a clean end, grpc-status 4",
				pieces, err, resp.Trailer)
		}
		if c.observer.cut[StreamCutIdle] != 1 || c.observer.cut[StreamCutDeadline] != 1 {
			t.Fatalf("streams counted as cut: %v, want 1 idle and 1 deadline", c.observer.cut)
		}
		if d, _ := grpcTimeout(http.Header{"Grpc-Timeout": told[1:]}); len(told) != 2 || told[0] != "" || d != 600*time.Millisecond {
			t.Fatalf("the upstream was told grpc-timeout %q, want none (no caller deadline), then the caller's 600m", told)
		}
	})
}

// With a per-try timeout, a stream's attempt deadline is lifted too.
func TestStreamOutlivesPerTryTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		feeds := make(chan *feed, 1)
		c := newTestChain(t, "service: svc\ntimeout: 1s\nretry: {perTryTimeout: 200ms, on: [timeout]}\n", []string{"10.0.0.1:80"},
			feedTransport(http.Header{}, -1, feeds))
		_, pieces, _, err := exchange(t, c, mustRequest(t, context.Background()), feeds, 30, 100*time.Millisecond, true)
		if pieces != 30 || err != nil || c.calls.Load() != 1 {
			t.Fatalf("a chunked body over 3s with per-try 200ms and timeout 1s: %d of 30 pieces, %v, %d attempts; want all of one",
				pieces, err, c.calls.Load())
		}
	})
}

func mustRequest(t *testing.T, ctx context.Context) *http.Request {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, "GET", "http://svc/", nil)
	if err != nil {
		t.Fatal(err)
	}
	return req
}
