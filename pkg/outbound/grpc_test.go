package outbound_test

import (
	"context"
	"errors"
	"io"
	"maps"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/sidecar-mesh/sidecar/pkg/metrics"
)

// testService is a real gRPC service: unary echo (failing with fail, if
// set, or waiting delay), server streaming, client streaming and bidi.
type testService struct {
	testgrpc.UnimplementedTestServiceServer
	calls atomic.Int64
	fail  func() error
	delay time.Duration
}

func (s *testService) UnaryCall(ctx context.Context, in *testgrpc.SimpleRequest) (*testgrpc.SimpleResponse, error) {
	s.calls.Add(1)
	if s.delay > 0 {
		select {
		case <-time.After(s.delay):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if s.fail != nil {
		if err := s.fail(); err != nil {
			return nil, err
		}
	}
	return &testgrpc.SimpleResponse{Payload: in.GetPayload()}, nil
}

func (s *testService) StreamingOutputCall(in *testgrpc.StreamingOutputCallRequest, stream testgrpc.TestService_StreamingOutputCallServer) error {
	s.calls.Add(1)
	for _, p := range in.GetResponseParameters() {
		if err := stream.Send(&testgrpc.StreamingOutputCallResponse{Payload: &testgrpc.Payload{Body: make([]byte, p.GetSize())}}); err != nil {
			return err
		}
	}
	return nil
}

func (s *testService) StreamingInputCall(stream testgrpc.TestService_StreamingInputCallServer) error {
	s.calls.Add(1)
	total := 0
	for {
		in, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return stream.SendAndClose(&testgrpc.StreamingInputCallResponse{AggregatedPayloadSize: int32(total)})
		}
		if err != nil {
			return err
		}
		total += len(in.GetPayload().GetBody())
	}
}

func (s *testService) FullDuplexCall(stream testgrpc.TestService_FullDuplexCallServer) error {
	s.calls.Add(1)
	for {
		in, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if err := stream.Send(&testgrpc.StreamingOutputCallResponse{Payload: in.GetPayload()}); err != nil {
			return err
		}
	}
}

// grpcUpstream serves svc (and the gRPC health service) on a loopback port.
func grpcUpstream(t *testing.T, svc *testService) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	testgrpc.RegisterTestServiceServer(srv, svc)
	healthpb.RegisterHealthServer(srv, health.NewServer())
	go srv.Serve(ln)
	t.Cleanup(srv.Stop)
	return ln.Addr().String()
}

// grpcClient dials the sidecar with authority service, as an app does.
func grpcClient(t *testing.T, sc *sidecar, service string) *grpc.ClientConn {
	t.Helper()
	cc, err := grpc.NewClient(sc.addr, grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithAuthority(service))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

// Unary, server streaming, client streaming and bidi calls, and the health
// service, all through the sidecar over h2c, routed by :authority.
func TestGRPCThroughTheSidecar(t *testing.T) {
	svc := &testService{}
	sc := startSidecar(t, options{static: map[string][]string{"echo": {grpcUpstream(t, svc)}}})
	cc := grpcClient(t, sc, "echo")
	c := testgrpc.NewTestServiceClient(cc)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	resp, err := c.UnaryCall(ctx, &testgrpc.SimpleRequest{Payload: &testgrpc.Payload{Body: []byte("hello")}})
	if err != nil || string(resp.GetPayload().GetBody()) != "hello" {
		t.Fatalf("unary: %v %v, want the echo", resp, err)
	}

	out, err := c.StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{ResponseParameters: []*testgrpc.ResponseParameters{{Size: 10}, {Size: 70000}, {Size: 3}}})
	if err != nil {
		t.Fatal(err)
	}
	var sizes []int
	for {
		m, err := out.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("server streaming: %v", err)
		}
		sizes = append(sizes, len(m.GetPayload().GetBody()))
	}
	if len(sizes) != 3 || sizes[0] != 10 || sizes[1] != 70000 || sizes[2] != 3 {
		t.Fatalf("server streaming: message sizes %v, want [10 70000 3]", sizes)
	}

	in, err := c.StreamingInputCall(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []int{100, 200000, 1} {
		if err := in.Send(&testgrpc.StreamingInputCallRequest{Payload: &testgrpc.Payload{Body: make([]byte, n)}}); err != nil {
			t.Fatalf("client streaming send: %v", err)
		}
	}
	agg, err := in.CloseAndRecv()
	if err != nil || agg.GetAggregatedPayloadSize() != 200101 {
		t.Fatalf("client streaming: %v %v, want 200101 bytes", agg, err)
	}

	bidi, err := c.FullDuplexCall(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 5 { // each answer comes back before the next message is sent
		body := []byte{byte('a' + i)}
		if err := bidi.Send(&testgrpc.StreamingOutputCallRequest{Payload: &testgrpc.Payload{Body: body}}); err != nil {
			t.Fatalf("bidi send %d: %v", i, err)
		}
		m, err := bidi.Recv()
		if err != nil || string(m.GetPayload().GetBody()) != string(body) {
			t.Fatalf("bidi %d: %v %v", i, m, err)
		}
	}
	bidi.CloseSend()
	if _, err := bidi.Recv(); !errors.Is(err, io.EOF) {
		t.Fatalf("bidi end: %v, want EOF", err)
	}

	hc, err := healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil || hc.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health through the sidecar: %v %v, want SERVING", hc, err)
	}
	if n := svc.calls.Load(); n != 4 {
		t.Fatalf("the service saw %d calls, want 4", n)
	}
}

// The sidecar's own errors reach a gRPC client as gRPC statuses.
func TestGRPCLocalErrors(t *testing.T) {
	sc := startSidecar(t, options{static: map[string][]string{"echo": {grpcUpstream(t, &testService{})}}})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := testgrpc.NewTestServiceClient(grpcClient(t, sc, "nope")).UnaryCall(ctx, &testgrpc.SimpleRequest{})
	if st := status.Convert(err); st.Code() != codes.Unavailable || st.Message() == "" {
		t.Fatalf("unknown service: %v, want UNAVAILABLE with a message", err)
	}
	t.Logf("unknown service: %v", err)
}

// Two instances, one answering UNAVAILABLE to every call: under the
// default policy (grpc-unavailable in retry.on; backoff shortened) at least
// 99.9% of 2000 unary calls succeed (retries, then outlier ejection), and
// no call is executed twice on the good instance. A failure sent after the
// response headers (in the trailers) is retried too.
func TestGRPCRetriesOnUnavailable(t *testing.T) {
	unary := func(c testgrpc.TestServiceClient, calls int) (ok int) {
		for range calls {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			if _, err := c.UnaryCall(ctx, &testgrpc.SimpleRequest{Payload: &testgrpc.Payload{Body: []byte("x")}}); err == nil {
				ok++
			}
			cancel()
		}
		return ok
	}
	bad := &testService{fail: func() error { return status.Error(codes.Unavailable, "draining") }}
	good := &testService{}
	sc := startSidecar(t, options{static: map[string][]string{"echo": {grpcUpstream(t, bad), grpcUpstream(t, good)}},
		policies: "service: echo\n" + fastRetries})
	const calls = 2000
	ok := unary(testgrpc.NewTestServiceClient(grpcClient(t, sc, "echo")), calls)
	t.Logf("trailers-only UNAVAILABLE: %d of %d calls succeeded; the bad instance saw %d, the good one %d", ok, calls, bad.calls.Load(), good.calls.Load())
	if ok < calls*999/1000 {
		t.Fatalf("%d of %d gRPC calls succeeded, want at least 99.9%%", ok, calls)
	}
	if good.calls.Load() != int64(ok) || bad.calls.Load() == 0 {
		t.Fatalf("good instance executed %d calls for %d successes, bad %d: want one execution per success", good.calls.Load(), ok, bad.calls.Load())
	}

	badHeaders, good2 := &headersFirstService{}, &testService{}
	sc2 := startSidecar(t, options{static: map[string][]string{"echo": {grpcUpstreamWith(t, badHeaders), grpcUpstream(t, good2)}},
		policies: "service: echo\nretry: {attempts: 2, backoff: {base: 1ms, max: 2ms}, budget: {ratio: 1}}\n" + noBreaker + noOutliers})
	ok = unary(testgrpc.NewTestServiceClient(grpcClient(t, sc2, "echo")), 500)
	t.Logf("UNAVAILABLE after headers: %d of 500 succeeded; the bad instance saw %d, the good one %d", ok, badHeaders.calls.Load(), good2.calls.Load())
	if ok != 500 || badHeaders.calls.Load() < 100 {
		t.Fatalf("%d of 500 succeeded with the bad instance called %d times: want all, each failure retried elsewhere", ok, badHeaders.calls.Load())
	}
}

// headersFirstService sends its response headers, then fails with
// UNAVAILABLE in the trailers.
type headersFirstService struct {
	testgrpc.UnimplementedTestServiceServer
	calls atomic.Int64
}

func (s *headersFirstService) UnaryCall(ctx context.Context, _ *testgrpc.SimpleRequest) (*testgrpc.SimpleResponse, error) {
	s.calls.Add(1)
	if err := grpc.SendHeader(ctx, nil); err != nil {
		return nil, err
	}
	return nil, status.Error(codes.Unavailable, "overloaded, after headers")
}

func grpcUpstreamWith(t *testing.T, svc testgrpc.TestServiceServer) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	testgrpc.RegisterTestServiceServer(srv, svc)
	go srv.Serve(ln)
	t.Cleanup(srv.Stop)
	return ln.Addr().String()
}

// A 200 ms client deadline against a 1 s server: DEADLINE_EXCEEDED at the
// client by 200 ms, the upstream told the time left of the caller's
// deadline in grpc-timeout (not the per-try timeout, which bounds only the
// wait for the headers of what may be a stream), and no attempt after the
// deadline.
func TestGRPCDeadline(t *testing.T) {
	var deadlines []time.Duration
	var mu sync.Mutex
	slow := &testService{delay: time.Second}
	addr := grpcUpstreamWith(t, &deadlineRecorder{testService: slow, record: func(d time.Duration) {
		mu.Lock()
		deadlines = append(deadlines, d)
		mu.Unlock()
	}})
	sc := startSidecar(t, options{static: map[string][]string{"slow": {addr}},
		policies: "service: slow\nretry: {attempts: 3, perTryTimeout: 150ms, on: [timeout, grpc-unavailable, grpc-deadline-exceeded]}\n" + noBreaker})
	c := testgrpc.NewTestServiceClient(grpcClient(t, sc, "slow"))
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := c.UnaryCall(ctx, &testgrpc.SimpleRequest{})
	if status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("got %v, want DEADLINE_EXCEEDED", err)
	}
	took := time.Since(start)
	time.Sleep(time.Second) // anything the sidecar would still send arrives by now
	mu.Lock()
	defer mu.Unlock()
	t.Logf("answered after %v; attempts saw deadlines %v", took, deadlines)
	if len(deadlines) == 0 || len(deadlines) > 2 {
		t.Fatalf("%d attempts, want 1 or 2 within 200 ms (150 ms per try)", len(deadlines))
	}
	for _, d := range deadlines {
		if d > 200*time.Millisecond || d == time.Hour {
			t.Fatalf("an attempt was given %v, want the time left of the caller's 200ms", d)
		}
	}
	if n := slow.calls.Load(); n != int64(len(deadlines)) {
		t.Fatalf("server saw %d calls after the deadline passed, want %d", n, len(deadlines))
	}
}

// deadlineRecorder records the deadline each call arrives with.
type deadlineRecorder struct {
	*testService
	record func(time.Duration)
}

func (d *deadlineRecorder) UnaryCall(ctx context.Context, in *testgrpc.SimpleRequest) (*testgrpc.SimpleResponse, error) {
	if dl, ok := ctx.Deadline(); ok {
		d.record(time.Until(dl))
	} else {
		d.record(time.Hour)
	}
	return d.testService.UnaryCall(ctx, in)
}

// An instance that sends its headers and then fails every call with
// UNAVAILABLE in the trailers is ejected like one that fails at once: the
// attempt is judged when its trailers arrive.
func TestGRPCTrailerFailuresEject(t *testing.T) {
	bad, good := &headersFirstService{}, &testService{}
	sc := startSidecar(t, options{static: map[string][]string{"echo": {grpcUpstreamWith(t, bad), grpcUpstream(t, good)}},
		policies: "service: echo\nretry: {attempts: 1}\noutlierDetection: {consecutiveFailures: 3, ejectionTime: 1m}\n" + noBreaker})
	c := testgrpc.NewTestServiceClient(grpcClient(t, sc, "echo"))
	for range 100 {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		c.UnaryCall(ctx, &testgrpc.SimpleRequest{})
		cancel()
	}
	if n := bad.calls.Load(); n != 3 {
		t.Fatalf("the failing instance got %d calls, want exactly 3 before its ejection", n)
	}
}

// gRPC outcomes are counted by their grpc-status, which an HTTP status
// class cannot tell (a failure comes as 200): the upstream's, trailers-only
// or in the trailers, and the sidecar's own answer to a gRPC caller.
func TestGRPCOutcomesCounted(t *testing.T) {
	reg := prometheus.NewRegistry()
	bad := &testService{fail: func() error { return status.Error(codes.Unavailable, "draining") }}
	sc := startSidecar(t, options{static: map[string][]string{"echo": {grpcUpstream(t, &testService{})}, "bad": {grpcUpstream(t, bad)},
		"gone": {closedAddr(t)}}, policies: "service: \"*\"\nretry: {attempts: 1}\n",
		telemetry: &telemetry{metrics: metrics.NewRequests(reg)}})
	call := func(service string) {
		c := testgrpc.NewTestServiceClient(grpcClient(t, sc, service))
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		c.UnaryCall(ctx, &testgrpc.SimpleRequest{Payload: &testgrpc.Payload{Body: []byte("x")}})
	}
	for range 3 {
		call("echo")
	}
	call("bad")
	call("gone")
	got := map[string]float64{}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "sidecar_grpc_requests_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			got[labels["direction"]+" "+labels["service"]+" "+labels["grpc_code"]] = m.GetCounter().GetValue()
		}
	}
	want := map[string]float64{"outbound echo 0": 3, "outbound bad 14": 1, "outbound gone 14": 1}
	if !maps.Equal(got, want) {
		t.Fatalf("sidecar_grpc_requests_total %v, want %v", got, want)
	}
}
