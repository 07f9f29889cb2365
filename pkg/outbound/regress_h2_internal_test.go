package outbound

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"strconv"
	"testing"
	"time"

	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"golang.org/x/net/http2"

	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/downstream"
	"github.com/sidecar-mesh/sidecar/pkg/policy"
)

// h2Setup runs an h2c upstream with handler, the outbound proxy for service
// "svc" in front of it, and returns an h2c client of the proxy.
func h2Setup(t *testing.T, handler http.HandlerFunc, cfg Config, policies string) *http.Client {
	t.Helper()
	up := &http.Server{Handler: handler}
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	up.Protocols = &p
	uln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go up.Serve(uln)
	t.Cleanup(func() { up.Close() })
	static, _ := discovery.NewStatic(map[string][]string{"svc": {uln.Addr().String()}})
	ps, err := policy.Parse([]byte(policies), "test")
	if err != nil {
		t.Fatal(err)
	}
	cfg.Resolver, cfg.Policies = discovery.Chain{static}, NewStaticPolicies(ps)
	px, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := downstream.Listen("outbound", "127.0.0.1:0", px, downstream.Limits{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { srv.Serve(); close(done) }()
	tr := &http2.Transport{AllowHTTP: true, DisableCompression: true,
		DialTLSContext: func(ctx context.Context, n, _ string, _ *tls.Config) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, n, srv.Addr().String())
		}}
	t.Cleanup(func() {
		tr.CloseIdleConnections()
		srv.HTTP.Close()
		<-done
		px.Close()
	})
	return &http.Client{Transport: tr, Timeout: 10 * time.Second}
}

// The HTTP/2 upstream transport neither asks for gzip on the client's
// behalf nor decompresses behind its back.
func TestH2NoCompressionAdded(t *testing.T) {
	var seen string
	c := h2Setup(t, func(w http.ResponseWriter, r *http.Request) {
		seen = r.Header.Get("Accept-Encoding")
		io.WriteString(w, "hello")
	}, Config{}, "service: svc\n")
	resp, err := c.Get("http://svc/")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if seen != "" || string(b) != "hello" {
		t.Fatalf("upstream saw Accept-Encoding %q, client got %q; want none added and the body as sent", seen, b)
	}
}

// HTTP/2 attempts cut by a per-try timeout and retried, with tracing on:
// each attempt writes its own header map (run with -race: the trace header
// of attempt 2 once raced the HTTP/2 transport still encoding attempt 1's).
func TestH2RetryHeadersNotShared(t *testing.T) {
	tp := sdktrace.NewTracerProvider(sdktrace.WithSampler(sdktrace.AlwaysSample()))
	defer tp.Shutdown(context.Background())
	c := h2Setup(t, func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-time.After(80 * time.Millisecond):
		case <-r.Context().Done():
		}
	}, Config{Tracer: tp.Tracer("test"), Propagator: propagation.TraceContext{}},
		"service: svc\ntimeout: 2s\nretry: {attempts: 3, perTryTimeout: 20ms, on: [timeout], backoff: {base: 1ms, max: 1ms}, budget: {ratio: 1}}\n"+
			"circuitBreaker: {consecutiveFailures: 100000, minRequests: 1000000}\n")
	for i := range 20 {
		req, _ := http.NewRequest("GET", "http://svc/", nil)
		for j := range 50 {
			req.Header.Set("X-Pad-"+strconv.Itoa(j), "v")
		}
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(i, err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusGatewayTimeout && resp.StatusCode != http.StatusOK {
			t.Fatalf("request %d: %d %s, want the retries to end in 504 or 200", i, resp.StatusCode, resp.Header.Get("X-Sidecar-Error"))
		}
	}
}
