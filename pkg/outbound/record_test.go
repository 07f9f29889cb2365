package outbound_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unicode/utf8"

	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/sidecar-mesh/sidecar/internal/freeport"
	"github.com/sidecar-mesh/sidecar/pkg/requestlog"
)

// attemptsOf lists each attempt of a recorded request as "outcome
// (retry reason)", the breaker state aside.
func attemptsOf(r requestlog.Request) []string {
	var out []string
	for _, a := range r.Attempts {
		out = append(out, a.Outcome+" ("+a.RetryReason+")")
	}
	return out
}

// onlyFailure is the one failed request the sidecar kept for service.
func onlyFailure(t *testing.T, sc *sidecar, service string) requestlog.Request {
	t.Helper()
	got := sc.recorder.Failed(service)
	if len(got) != 1 {
		t.Fatalf("the sidecar kept %d failed requests of %s, want 1: %+v", len(got), service, got)
	}
	return got[0]
}

// closedAddr is a loopback address nothing listens on: a port freeport
// hands out, from below the ephemeral range, so no connection of this
// host takes it meanwhile.
func closedAddr(t *testing.T) string {
	t.Helper()
	ports, err := freeport.Stable(1, false)
	if err != nil {
		t.Fatal(err)
	}
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[0]))
}

// Each way the chain stops trying is recorded exactly, against real
// upstreams behind a real sidecar: the status and reason the app got, each
// attempt's outcome and retry reason, and why no further attempt was made.
func TestRecordedFailures(t *testing.T) {
	unavailable := func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusServiceUnavailable) }
	retryLater := func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Retry-After", "5")
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	internal := func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusInternalServerError) }
	hang := func(w http.ResponseWriter, r *http.Request) { <-r.Context().Done() } // until the sidecar gives up
	const retry = `retry: {attempts: 3, backoff: {base: 1ms, max: 2ms}, on: [connect-failure, 503], budget: {ratio: 1, minPerSecond: 100}}`
	for _, tc := range []struct {
		name     string
		handler  http.HandlerFunc // of both upstreams; nil: nothing listens
		policy   string
		method   string
		body     int
		requests int // sent before the one checked; default 0
		status   int
		reason   string
		attempts []string
		stop     string
	}{
		{name: "attempts used up", handler: unavailable, policy: retry,
			status: 503, attempts: []string{"503 ()", "503 (503)", "503 (503)"}, stop: requestlog.StopAttemptsUsedUp},
		{name: "connect failures, attempts used up", policy: retry,
			status: 502, reason: "upstream_connect_failure",
			attempts: []string{"connection refused ()", "connection refused (connect-failure)", "connection refused (connect-failure)"},
			stop:     requestlog.StopAttemptsUsedUp},
		{name: "budget exhausted", handler: unavailable,
			policy: `retry: {attempts: 3, backoff: {base: 1ms, max: 2ms}, on: [503], budget: {ratio: 0, minPerSecond: 0}}`,
			status: 503, attempts: []string{"503 ()"}, stop: requestlog.StopBudgetExhausted},
		{name: "deadline cannot cover the backoff", handler: retryLater,
			policy: `timeout: 1s
retry: {attempts: 3, backoff: {base: 1ms, max: 10s}, on: [503], budget: {ratio: 1, minPerSecond: 100}}`,
			status: 503, attempts: []string{"503 ()"}, stop: requestlog.StopDeadline},
		{name: "deadline passed", handler: hang, policy: "timeout: 100ms\n" + retry,
			status: 504, reason: "upstream_timeout", attempts: []string{"timeout ()"}, stop: requestlog.StopDeadline},
		{name: "breaker open", handler: unavailable, requests: 1,
			policy: `retry: {attempts: 1}
circuitBreaker: {consecutiveFailures: 1, openDuration: 1m}`,
			status: 503, reason: "circuit_open", stop: requestlog.StopBreakerOpen},
		{name: "method not retryable", handler: unavailable, policy: retry, method: http.MethodPost,
			status: 503, attempts: []string{"503 ()"}, stop: requestlog.StopMethodNotRetryable},
		{name: "body too large to replay", handler: unavailable, policy: retry, method: http.MethodPut, body: 100 << 10,
			status: 503, attempts: []string{"503 ()"}, stop: requestlog.StopBodyNotReplayable},
		{name: "outcome not retryable", handler: internal, policy: retry,
			status: 500, attempts: []string{"500 ()"}, stop: requestlog.StopNotRetryable},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var eps []string
			var ups []*server
			for range 2 {
				if tc.handler == nil {
					eps = append(eps, closedAddr(t))
					continue
				}
				u := newUpstream(t, tc.handler)
				ups = append(ups, u)
				eps = append(eps, u.addr())
			}
			sc := startSidecar(t, options{static: map[string][]string{"svc": eps},
				policies: "service: svc\n" + tc.policy})
			c := sc.client(t)
			method := cmpOr(tc.method, http.MethodGet)
			var resp *http.Response
			for range tc.requests + 1 {
				req, _ := http.NewRequest(method, "http://svc/items/7", strings.NewReader(strings.Repeat("x", tc.body)))
				if tc.body == 0 {
					req.Body = nil
				}
				var err error
				resp, err = c.Do(req)
				if err != nil {
					t.Fatalf("%s http://svc/items/7: %v", method, err)
				}
				resp.Body.Close()
			}
			if resp.StatusCode != tc.status || resp.Header.Get("X-Sidecar-Error") != tc.reason {
				t.Fatalf("answered %d %q, want %d %q", resp.StatusCode, resp.Header.Get("X-Sidecar-Error"), tc.status, tc.reason)
			}
			got := sc.recorder.Failed("svc")
			if len(got) != tc.requests+1 {
				t.Fatalf("the sidecar kept %d failed requests, want %d: %+v", len(got), tc.requests+1, got)
			}
			r := got[0] // the newest
			if r.Service != "svc" || r.Method != method || r.Path != "/items/7" || r.Status != tc.status || r.Reason != tc.reason {
				t.Errorf("recorded %s %s %s -> %d %q, want svc %s /items/7 -> %d %q", r.Service, r.Method, r.Path, r.Status, r.Reason,
					method, tc.status, tc.reason)
			}
			if a := attemptsOf(r); !slices.Equal(a, tc.attempts) {
				t.Errorf("recorded attempts %q, want %q", a, tc.attempts)
			}
			if r.Stop != tc.stop {
				t.Errorf("recorded stop %q, want %q", r.Stop, tc.stop)
			}
			for i, a := range r.Attempts {
				if !slices.Contains(eps, a.Endpoint) || a.BreakerState != "closed" {
					t.Errorf("attempt %d: endpoint %q breaker %q, want one of %v, closed", i+1, a.Endpoint, a.BreakerState, eps)
				}
				if i > 0 && a.Endpoint == r.Attempts[i-1].Endpoint {
					t.Errorf("attempt %d went to %s again, want the other endpoint", i+1, a.Endpoint)
				}
				if (i == 0) != (a.BackoffMs == 0 && a.RetryReason == "") {
					t.Errorf("attempt %d: retry reason %q after %vms of backoff", i+1, a.RetryReason, a.BackoffMs)
				}
			}
			sent := int64(0)
			for _, u := range ups {
				sent += u.requests.Load()
			}
			if want := int64(len(tc.attempts) + tc.requests); tc.handler != nil && sent != want {
				t.Errorf("the upstreams were sent %d requests, want %d (the attempts recorded, and the requests before)", sent, want)
			}
		})
	}
}

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

// A request that succeeds is not kept; one the sidecar refuses before any
// attempt (no endpoint) is, with no attempts.
func TestRecordedOnlyFailures(t *testing.T) {
	u := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {})
	sc := startSidecar(t, options{static: map[string][]string{"svc": {u.addr()}, "empty": {}}})
	c := sc.client(t)
	for range 10 {
		if resp, _ := sc.get(t, c, "svc", "/"); resp.StatusCode != 200 {
			t.Fatalf("GET svc: %d", resp.StatusCode)
		}
	}
	if got := sc.recorder.Failed(""); len(got) != 0 {
		t.Fatalf("kept %d requests after 10 successes, want none: %+v", len(got), got)
	}
	resp, _ := sc.get(t, c, "empty", "/x")
	r := onlyFailure(t, sc, "empty")
	if resp.StatusCode != 503 || r.Reason != "no_healthy_endpoints" || len(r.Attempts) != 0 || r.Stop != "" {
		t.Errorf("answered %d; recorded %q with %d attempts, stop %q; want 503, no_healthy_endpoints, 0 attempts, no stop",
			resp.StatusCode, r.Reason, len(r.Attempts), r.Stop)
	}
	if fmt.Sprint(r.Attempts) != "[]" {
		t.Errorf("attempts %v, want an empty list", r.Attempts)
	}
}

// A gRPC failure is kept too: a trailers-only UNAVAILABLE retried on the
// same instance until the attempts are used up, and an UNAVAILABLE sent in
// the trailers after the headers, judged when the body ends (not retried:
// the answer had started). A gRPC call that succeeds is not kept.
func TestRecordedGRPCFailures(t *testing.T) {
	for _, tc := range []struct {
		name     string
		svc      testgrpc.TestServiceServer
		policy   string
		attempts []string
		stop     string
	}{
		{name: "trailers-only", svc: &testService{fail: func() error { return status.Error(codes.Unavailable, "draining") }},
			policy:   "retry: {attempts: 2, backoff: {base: 1ms, max: 2ms}, budget: {ratio: 1}}\n" + noBreaker + noOutliers,
			attempts: []string{"200 grpc-status 14 ()", "200 grpc-status 14 (grpc-unavailable)"}, stop: requestlog.StopAttemptsUsedUp},
		{name: "in the trailers", svc: &headersFirstService{},
			policy:   "retry: {attempts: 1}\n" + noBreaker + noOutliers,
			attempts: []string{"200 grpc-status 14 ()"}, stop: requestlog.StopAttemptsUsedUp},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sc := startSidecar(t, options{static: map[string][]string{"echo": {grpcUpstreamWith(t, tc.svc)}, "ok": {grpcUpstream(t, &testService{})}},
				policies: "service: echo\n" + tc.policy})
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_, err := testgrpc.NewTestServiceClient(grpcClient(t, sc, "echo")).UnaryCall(ctx, &testgrpc.SimpleRequest{})
			if status.Code(err) != codes.Unavailable {
				t.Fatalf("the call ended with %v, want UNAVAILABLE", err)
			}
			if _, err := testgrpc.NewTestServiceClient(grpcClient(t, sc, "ok")).UnaryCall(ctx, &testgrpc.SimpleRequest{}); err != nil {
				t.Fatalf("the call to ok: %v", err)
			}
			// The failure is recorded when the client's stream ends, as
			// the client is answered: wait for it, not for a time.
			var got []requestlog.Request
			for got = sc.recorder.Failed(""); len(got) == 0 && ctx.Err() == nil; got = sc.recorder.Failed("") {
				runtime.Gosched()
			}
			r := onlyFailure(t, sc, "echo")
			if len(got) != 1 || r.Status != 200 || r.GRPCStatus != "14" || r.Method != "POST" || r.Path != "/grpc.testing.TestService/UnaryCall" {
				t.Errorf("kept %d; recorded %s %s -> %d grpc-status %q, want only echo's POST /grpc.testing.TestService/UnaryCall -> 200 grpc-status 14",
					len(got), r.Method, r.Path, r.Status, r.GRPCStatus)
			}
			if a := attemptsOf(r); !slices.Equal(a, tc.attempts) || r.Stop != tc.stop {
				t.Errorf("recorded attempts %q, stop %q; want %q, %q", a, r.Stop, tc.attempts, tc.stop)
			}
		})
	}
}

// The failures kept stay bounded however many come: 2,000 failed requests
// from 8 clients to 300 services through a real sidecar leave the
// recorder's capacity kept (4 of each of 20 services, and 4 in the ring
// the others share), never more of one service than its ring holds.
// (requestlog's TestRingBounded records 200,000 at the recorder's own
// speed.)
func TestRecordedFailuresBounded(t *testing.T) {
	static := map[string][]string{}
	for i := range 300 {
		static["svc-"+strconv.Itoa(i)] = []string{} // known, no endpoint: each request fails at once
	}
	rec := requestlog.New(requestlog.Config{PerService: 4, MaxServices: 20})
	sc := startSidecar(t, options{static: static, recorder: rec})
	c := sc.client(t)
	const requests, clients = 2000, 8
	start := time.Now()
	var wg sync.WaitGroup
	var failed atomic.Int64
	for g := range clients {
		wg.Go(func() {
			for i := g; i < requests; i += clients {
				resp, err := c.Get("http://svc-" + strconv.Itoa(i%300) + "/" + strconv.Itoa(i))
				if err != nil {
					t.Error(err)
					return
				}
				resp.Body.Close()
				if resp.StatusCode == http.StatusServiceUnavailable {
					failed.Add(1)
				}
			}
		})
	}
	wg.Wait()
	t.Logf("%d failed requests in %v (%.0f a second): %d kept, capacity %d", failed.Load(), time.Since(start),
		float64(failed.Load())/time.Since(start).Seconds(), rec.Kept(), rec.Capacity())
	if failed.Load() != requests {
		t.Fatalf("%d of %d requests failed, want all", failed.Load(), requests)
	}
	if kept := rec.Kept(); kept != rec.Capacity() || rec.Capacity() != 21*4 {
		t.Errorf("kept %d, capacity %d: want 21×4, every ring full", kept, rec.Capacity())
	}
	for _, svc := range []string{"svc-0", "svc-299"} {
		if n := len(rec.Failed(svc)); n > 4 {
			t.Errorf("%s has %d kept, want at most 4", svc, n)
		}
	}
}

// A retry is not sent into a breaker that opened while the request was
// under way: request a's second attempt is held at the upstream until
// request b has failed (its three attempts answered 503), which opens the
// breaker (one failed request trips it); a then stops after that attempt,
// the breaker open.
func TestRecordedBreakerOpenedMidRetries(t *testing.T) {
	var aCalls atomic.Int64
	aSecond, bDone := make(chan struct{}), make(chan struct{})
	u := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("X-Who") == "a" && aCalls.Add(1) == 2 {
			close(aSecond)
			<-bDone
		}
		w.WriteHeader(http.StatusServiceUnavailable)
	})
	sc := startSidecar(t, options{static: map[string][]string{"svc": {u.addr()}}, policies: `service: svc
retry: {attempts: 3, backoff: {base: 1ms, max: 2ms}, on: [503], budget: {ratio: 1, minPerSecond: 100}}
circuitBreaker: {consecutiveFailures: 1, openDuration: 1m}
`})
	c := sc.client(t)
	send := func(who string) *http.Response {
		req, _ := http.NewRequest(http.MethodGet, "http://svc/"+who, nil)
		req.Header.Set("X-Who", who)
		resp, err := c.Do(req)
		if err != nil {
			t.Errorf("GET svc/%s: %v", who, err)
			return nil
		}
		resp.Body.Close()
		return resp
	}
	aResp := make(chan *http.Response, 1)
	go func() { aResp <- send("a") }()
	<-aSecond
	if resp := send("b"); resp == nil || resp.StatusCode != 503 {
		t.Fatalf("b: %v, want 503", resp)
	}
	close(bDone)
	if resp := <-aResp; resp == nil || resp.StatusCode != 503 {
		t.Fatalf("a: %v, want 503", resp)
	}
	var a requestlog.Request
	for _, r := range sc.recorder.Failed("svc") {
		if r.Path == "/a" {
			a = r
		}
	}
	if got := attemptsOf(a); !slices.Equal(got, []string{"503 ()", "503 (503)"}) || a.Stop != requestlog.StopBreakerOpen {
		t.Fatalf("a recorded attempts %q, stop %q; want [503 () 503 (503)], %s", got, a.Stop, requestlog.StopBreakerOpen)
	}
	if s := a.Attempts[1].BreakerState; s != "open" {
		t.Errorf("a's second attempt recorded the breaker %s, want open", s)
	}
	if n := aCalls.Load(); n != 2 {
		t.Errorf("the upstream had %d attempts of a, want 2", n)
	}
}

// A traced request's failure carries its trace ID: the one of the
// traceparent the app sent, sampled, so that `sidecar why` can link the
// trace. An untraced one carries none.
func TestRecordedTraceID(t *testing.T) {
	tp := sdktrace.NewTracerProvider(sdktrace.WithSampler(sdktrace.ParentBased(sdktrace.NeverSample())))
	t.Cleanup(func() { _ = tp.Shutdown(context.Background()) })
	u := newUpstream(t, func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusInternalServerError) })
	sc := startSidecar(t, options{static: map[string][]string{"svc": {u.addr()}}, telemetry: &telemetry{
		tracer: tp.Tracer("test"), prop: propagation.TraceContext{}}})
	c := sc.client(t)
	for _, tc := range []struct{ path, traceparent, want string }{
		{"/traced", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "4bf92f3577b34da6a3ce929d0e0e4736"},
		{"/untraced", "00-5bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", ""},
	} {
		req, _ := http.NewRequest(http.MethodGet, "http://svc"+tc.path, nil)
		req.Header.Set("Traceparent", tc.traceparent)
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		got := sc.recorder.Failed("svc")
		if len(got) == 0 || got[0].Path != tc.path || got[0].TraceID != tc.want {
			t.Errorf("%s: recorded %+v, want trace ID %q", tc.path, got, tc.want)
		}
	}
}

// What an upstream writes is kept bounded: an answer with a header line of
// 65 KB and no colon is refused (502), and neither the app's error body,
// nor the recorded attempts, nor the outcome quote more than their limits,
// as valid UTF-8, however many attempts were made.
func TestRecordedHostileUpstreamBounded(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				if _, err := http.ReadRequest(bufio.NewReader(c)); err == nil {
					io.WriteString(c, "HTTP/1.1 200 OK\r\n"+strings.Repeat("<\xff", 32650)+"\r\nContent-Length: 0\r\n\r\n")
				}
			}()
		}
	}()
	sc := startSidecar(t, options{static: map[string][]string{"evil": {ln.Addr().String()}},
		policies: "service: evil\nretry: {attempts: 10, on: [reset], methods: [GET], backoff: {base: 1ms, max: 1ms}, budget: {ratio: 1}}\n"})
	resp, body := sc.get(t, sc.client(t), "evil", "/x")
	if resp.StatusCode != http.StatusBadGateway || len(body) > 1024 || !utf8.ValidString(body) {
		t.Fatalf("app got %d with a body of %d bytes (valid UTF-8: %v), want 502 and at most 1 KiB", resp.StatusCode, len(body), utf8.ValidString(body))
	}
	r := onlyFailure(t, sc, "evil")
	size := len(r.Detail)
	for _, a := range r.Attempts {
		size += len(a.Outcome)
		if len(a.Outcome) > requestlog.MaxOutcome || !utf8.ValidString(a.Outcome) {
			t.Errorf("an attempt's outcome is %d bytes (valid UTF-8: %v), want at most %d", len(a.Outcome), utf8.ValidString(a.Outcome), requestlog.MaxOutcome)
		}
	}
	if len(r.Detail) > requestlog.MaxDetail || len(r.Attempts) != 10 {
		t.Errorf("recorded a detail of %d bytes and %d attempts, want at most %d bytes and 10", len(r.Detail), len(r.Attempts), requestlog.MaxDetail)
	}
	t.Logf("recorded %d bytes of text over %d attempts: %q", size, len(r.Attempts), attemptsOf(r)[0])
}

// A request refused before it was routed (a name mistyped, a host not
// allowed) is recorded too, found by the name it asked for, without
// taking a ring of the services that exist.
func TestRecordedRefusalsBeforeRouting(t *testing.T) {
	rec := requestlog.New(requestlog.Config{PerService: 4, MaxServices: 2})
	sc := startSidecar(t, options{static: map[string][]string{"users": {closedAddr(t)}}, recorder: rec})
	c := sc.client(t)
	for i := range 20 {
		resp, _ := sc.get(t, c, "nope-"+strconv.Itoa(i%3), "/x")
		if resp.StatusCode != http.StatusServiceUnavailable {
			t.Fatalf("unknown service: %d, want 503", resp.StatusCode)
		}
	}
	sc.get(t, c, "10.1.2.3", "/") // not_allowed
	got := rec.Failed("nope-1")
	if len(got) == 0 || got[0].Reason != "unknown_service" || got[0].Path != "/x" || got[0].Method != "GET" {
		t.Fatalf("recorded for nope-1: %+v, want its unknown_service refusals", got)
	}
	if got := rec.Failed("10.1.2.3"); len(got) != 1 || got[0].Reason == "" {
		t.Fatalf("recorded for an IP literal: %+v, want its refusal", got)
	}
	resp, _ := sc.get(t, c, "users", "/")
	if resp.StatusCode != http.StatusBadGateway {
		t.Fatalf("users: %d, want 502 (nothing listens)", resp.StatusCode)
	}
	if got := rec.Failed("users"); len(got) != 1 {
		t.Fatalf("users kept %d failures, want 1", len(got))
	}
}
