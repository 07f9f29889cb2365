package outbound_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/sidecar-mesh/sidecar/pkg/outbound"
)

// decisions counts what the chain reports to its Observer.
type decisions struct {
	outbound.NopObserver
	mu          sync.Mutex
	cut         map[string]int // streams cut, by reason
	transitions []string       // breaker transitions, "from>to"
	shed        map[string]int
}

func newDecisions() *decisions {
	return &decisions{cut: map[string]int{}, shed: map[string]int{}}
}

func (d *decisions) StreamCut(_, reason string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.cut[reason]++
}

func (d *decisions) BreakerStateChanged(_, from, to string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.transitions = append(d.transitions, from+">"+to)
}

func (d *decisions) Shed(_, reason string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.shed[reason]++
}

func (d *decisions) cuts(reason string) int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.cut[reason]
}

// breaker returns the breaker's transitions so far and the requests it
// refused.
func (d *decisions) breaker() (transitions []string, refused int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return slices.Clone(d.transitions), d.shed["circuit_open"]
}

// sseUpstream serves an event stream: events events, one every gap, then
// it ends the stream, or with silent stays quiet until the request ends.
func sseUpstream(t *testing.T, events int, gap time.Duration, silent bool) *server {
	return newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		w.WriteHeader(200)
		rc := http.NewResponseController(w)
		_ = rc.Flush()
		tick := time.NewTicker(gap)
		defer tick.Stop()
		for i := range events {
			select {
			case <-tick.C:
			case <-r.Context().Done():
				return
			}
			if _, err := io.WriteString(w, "data: "+strconv.Itoa(i)+"\n\n"); err != nil || rc.Flush() != nil {
				return
			}
		}
		if silent {
			<-r.Context().Done()
		}
	})
}

// readEvents reads an event stream through the sidecar to its end.
func readEvents(t *testing.T, sc *sidecar, path string) (status int, events int, err error) {
	t.Helper()
	req, _ := http.NewRequest("GET", "http://svc"+path, nil)
	resp, err := sc.client(t).Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, strings.Count(string(b), "data: "), err
}

// A real event stream sending every 100ms for 1.5s through the sidecar
// with a 300ms timeout is not cut: all 15 events arrive and the body ends
// cleanly. The same upstream going silent after 3 events is cut after
// streamIdleTimeout: the client sees the chunked body aborted, and the cut
// is counted.
func TestEventStreamThroughTheSidecar(t *testing.T) {
	obs := newDecisions()
	sc := startSidecar(t, options{static: map[string][]string{"svc": {sseUpstream(t, 15, 100*time.Millisecond, false).addr()}},
		policies: "service: svc\ntimeout: 300ms\n", observer: obs})
	status, events, err := readEvents(t, sc, "/")
	if status != 200 || events != 15 || err != nil {
		t.Fatalf("event stream of 1.5s under a 300ms timeout: %d, %d of 15 events, %v; want 200, all, a clean end", status, events, err)
	}

	silent := startSidecar(t, options{static: map[string][]string{"svc": {sseUpstream(t, 3, 100*time.Millisecond, true).addr()}},
		policies: "service: svc\ntimeout: 300ms\nstreamIdleTimeout: 500ms\n", observer: obs})
	status, events, err = readEvents(t, silent, "/")
	if status != 200 || events != 3 || !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("event stream silent after 3 events: %d, %d events, %v; want 200, 3, the body cut short (unexpected EOF)", status, events, err)
	}
	if n := obs.cuts(outbound.StreamCutIdle); n != 1 {
		t.Fatalf("%d streams counted as cut for idleness, want 1", n)
	}
}

// An answer of known length trickling in past the timeout is still cut at
// the timeout, as before: the client never gets it whole (its headers,
// still buffered, do not go out: the connection is closed); and it is no
// stream, so no stream cut is counted.
func TestSlowBodyOfKnownLengthCutAtTimeout(t *testing.T) {
	obs := newDecisions()
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "1000")
		w.WriteHeader(200)
		_, _ = io.WriteString(w, strings.Repeat("x", 10))
		_ = http.NewResponseController(w).Flush()
		select {
		case <-time.After(5 * time.Second):
		case <-r.Context().Done():
		}
	})
	sc := startSidecar(t, options{static: map[string][]string{"svc": {up.addr()}}, policies: "service: svc\ntimeout: 300ms\n", observer: obs})
	req, _ := http.NewRequest("GET", "http://svc/", nil)
	resp, err := sc.client(t).Do(req)
	if err == nil {
		var b []byte
		b, err = io.ReadAll(resp.Body)
		resp.Body.Close()
		if err == nil {
			t.Fatalf("1000-byte body stalled after 10: %d with %d bytes in full; want the answer cut short", resp.StatusCode, len(b))
		}
	}
	t.Logf("1000-byte body stalled after 10: %v", err)
	if n := up.requests.Load(); n != 1 {
		t.Fatalf("%d upstream attempts, want 1", n)
	}
	if len(obs.cut) != 0 {
		t.Fatalf("streams counted as cut: %v, want none", obs.cut)
	}
}

// pacedService streams its answers, each ResponseParameters' interval
// apart; with silent it then sends nothing more until the call ends.
type pacedService struct {
	testgrpc.UnimplementedTestServiceServer
	silent bool
	// headersFirst: the headers go out at once, before the first message.
	headersFirst bool
}

func (s *pacedService) StreamingOutputCall(in *testgrpc.StreamingOutputCallRequest, stream testgrpc.TestService_StreamingOutputCallServer) error {
	if s.headersFirst {
		if err := stream.SendHeader(nil); err != nil {
			return err
		}
	}
	for _, p := range in.GetResponseParameters() {
		select {
		case <-time.After(time.Duration(p.GetIntervalUs()) * time.Microsecond):
		case <-stream.Context().Done():
			return stream.Context().Err()
		}
		if err := stream.Send(&testgrpc.StreamingOutputCallResponse{Payload: &testgrpc.Payload{Body: make([]byte, p.GetSize())}}); err != nil {
			return err
		}
	}
	if s.silent {
		<-stream.Context().Done()
		return stream.Context().Err()
	}
	return nil
}

// receive starts a server stream of n messages 100ms apart, without a
// deadline, and counts what arrives before it ends.
func receive(t *testing.T, c testgrpc.TestServiceClient, n int) (int, error) {
	t.Helper()
	params := make([]*testgrpc.ResponseParameters, n)
	for i := range params {
		params[i] = &testgrpc.ResponseParameters{Size: 10, IntervalUs: 100000}
	}
	out, err := c.StreamingOutputCall(context.Background(), &testgrpc.StreamingOutputCallRequest{ResponseParameters: params})
	if err != nil {
		t.Fatal(err)
	}
	got := 0
	for {
		_, err := out.Recv()
		if errors.Is(err, io.EOF) {
			return got, nil
		}
		if err != nil {
			return got, err
		}
		got++
	}
}

// A real gRPC server stream of 1.5s, without a deadline, through the
// sidecar with a 300ms timeout completes; one that goes silent after 3
// messages ends with DEADLINE_EXCEEDED and a message saying so, once
// streamIdleTimeout has passed, and is counted.
func TestGRPCServerStreamPastTimeout(t *testing.T) {
	obs := newDecisions()
	sc := startSidecar(t, options{static: map[string][]string{"echo": {grpcUpstreamWith(t, &pacedService{})}},
		policies: "service: echo\ntimeout: 300ms\n", observer: obs})
	got, err := receive(t, testgrpc.NewTestServiceClient(grpcClient(t, sc, "echo")), 15)
	if got != 15 || err != nil {
		t.Fatalf("server stream of 1.5s under a 300ms timeout: %d of 15 messages, %v; want all and OK", got, err)
	}

	silent := startSidecar(t, options{static: map[string][]string{"echo": {grpcUpstreamWith(t, &pacedService{silent: true})}},
		policies: "service: echo\ntimeout: 300ms\nstreamIdleTimeout: 500ms\n", observer: obs})
	got, err = receive(t, testgrpc.NewTestServiceClient(grpcClient(t, silent, "echo")), 3)
	st := status.Convert(err)
	if got != 3 || st.Code() != codes.DeadlineExceeded || !strings.Contains(st.Message(), "streamIdleTimeout") {
		t.Fatalf("server stream silent after 3 messages: %d messages, %v; want 3, then DEADLINE_EXCEEDED naming streamIdleTimeout", got, err)
	}
	t.Logf("silent stream ended: %v", err)
	if n := obs.cuts(outbound.StreamCutIdle); n != 1 {
		t.Fatalf("%d streams counted as cut for idleness, want 1", n)
	}
}

// A server stream that sends its headers at once and its first message
// only after the policy's timeout is not cut by the wait for that message
// (which the default policy holds, to judge a retry): the timeout bounds
// the wait for a stream's headers, and the hold gives way before it.
func TestGRPCServerStreamFirstMessagePastTimeout(t *testing.T) {
	sc := startSidecar(t, options{static: map[string][]string{"echo": {grpcUpstreamWith(t, &pacedService{headersFirst: true})}},
		policies: "service: echo\ntimeout: 300ms\n"})
	c := testgrpc.NewTestServiceClient(grpcClient(t, sc, "echo"))
	out, err := c.StreamingOutputCall(context.Background(), &testgrpc.StreamingOutputCallRequest{ResponseParameters: []*testgrpc.ResponseParameters{
		{Size: 10, IntervalUs: 600000}, {Size: 10, IntervalUs: 10000}}})
	if err != nil {
		t.Fatal(err)
	}
	got := 0
	for {
		if _, err = out.Recv(); err != nil {
			break
		}
		got++
	}
	if got != 2 || !errors.Is(err, io.EOF) {
		t.Fatalf("first message 600ms after the headers, timeout 300ms: %d of 2 messages, %v; want both and OK", got, err)
	}
}

// The policy's timeout counts from the end of the request, as Envoy's
// route timeout does, so that a request still being sent is not cut: an
// upload larger than the sidecar holds, sent slowly over three timeouts,
// and a gRPC client stream sending a message every 150ms for twice the
// timeout both succeed under a 300ms timeout; a request that then waits
// longer than the timeout for its answer is still cut at it.
func TestTimeoutCountsFromTheRequestsEnd(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		n, _ := io.Copy(io.Discard, r.Body)
		if r.URL.Path == "/slow-answer" {
			time.Sleep(600 * time.Millisecond)
		}
		fmt.Fprint(w, n)
	})
	sc := startSidecar(t, options{static: map[string][]string{"up": {up.addr()}, "echo": {grpcUpstreamWith(t, &testService{})}},
		policies: "service: up\ntimeout: 300ms\nretry: {perTryTimeout: 200ms}\n---\nservice: echo\ntimeout: 300ms\n"})

	upload := func(path string) (int, string) {
		c, err := net.Dial("tcp", sc.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		const size = 100 << 10 // over the 64 KiB the sidecar holds: it streams
		fmt.Fprintf(c, "PUT %s HTTP/1.1\r\nHost: up\r\nContent-Length: %d\r\n\r\n", path, size)
		chunk := strings.Repeat("x", size/10)
		for range 10 {
			time.Sleep(100 * time.Millisecond) // 1s in all: three timeouts
			io.WriteString(c, chunk)
		}
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		return resp.StatusCode, string(b)
	}
	if code, body := upload("/"); code != 200 || body != strconv.Itoa(100<<10) {
		t.Errorf("a slow upload under a 300ms timeout: %d %q, want 200 and all of it at the upstream", code, body)
	}
	if code, _ := upload("/slow-answer"); code != http.StatusGatewayTimeout {
		t.Errorf("an answer 600ms after the upload's end under a 300ms timeout: %d, want 504", code)
	}

	c := testgrpc.NewTestServiceClient(grpcClient(t, sc, "echo"))
	stream, err := c.StreamingInputCall(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for range 4 {
		time.Sleep(150 * time.Millisecond)
		if err := stream.Send(&testgrpc.StreamingInputCallRequest{Payload: &testgrpc.Payload{Body: []byte("abc")}}); err != nil {
			t.Fatalf("client stream: %v", err)
		}
	}
	if res, err := stream.CloseAndRecv(); err != nil || res.GetAggregatedPayloadSize() != 12 {
		t.Fatalf("a client stream of 600ms under a 300ms timeout: %v %v, want all 12 bytes and OK", res, err)
	}
}

// An HTTP/2 request without a body keeps the policy's timeout (its body's
// end, which the deadlines of a streaming body wait for, is no wait), and
// a client stream the upstream refuses before it finished sending leaves
// the sidecar serving (the transport reads and closes such a body after
// the handler returned).
func TestH2BodilessTimeoutAndRefusedClientStreams(t *testing.T) {
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	up := &http.Server{Protocols: &p, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-time.After(time.Second):
		case <-r.Context().Done():
		}
		io.WriteString(w, "late")
	})}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go up.Serve(ln)
	defer up.Close()
	type unimplemented struct {
		testgrpc.UnimplementedTestServiceServer
	}
	sc := startSidecar(t, options{static: map[string][]string{"slow": {ln.Addr().String()}, "echo": {grpcUpstreamWith(t, unimplemented{})}},
		policies: "service: slow\ntimeout: 300ms\nretry: {attempts: 1}\n"})
	c := h2Client(t, sc.addr)
	start := time.Now()
	resp, err := c.Get("http://slow/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusGatewayTimeout || time.Since(start) > 900*time.Millisecond {
		t.Fatalf("HTTP/2 GET to a 1s upstream under a 300ms timeout: %d after %v, want 504 at the timeout", resp.StatusCode, time.Since(start))
	}

	client := testgrpc.NewTestServiceClient(grpcClient(t, sc, "echo"))
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			stream, err := client.StreamingInputCall(ctx)
			if err != nil {
				return
			}
			for range 100 {
				if stream.Send(&testgrpc.StreamingInputCallRequest{Payload: &testgrpc.Payload{Body: make([]byte, 100)}}) != nil {
					break
				}
			}
			stream.CloseAndRecv()
		})
	}
	wg.Wait()
	if resp, err := c.Get("http://slow/"); err != nil || resp.StatusCode != http.StatusGatewayTimeout {
		t.Fatalf("after the refused client streams: %v %v, want the sidecar serving", resp, err)
	}
}
