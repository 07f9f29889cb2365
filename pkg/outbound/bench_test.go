package outbound_test

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"

	"github.com/sidecar-mesh/sidecar/pkg/metrics"
)

// The benchmarks compare, in one run, the cost of a 1 KiB GET made
// directly, through the sidecar, and through the stdlib's ReverseProxy with
// http.Transport (the engine the sidecar's transport replaces). Compare
// ns/op: BenchmarkForward/sidecar over BenchmarkForward/direct is the
// sidecar's overhead.
func BenchmarkForward(b *testing.B) {
	body := strings.Repeat("x", 1024)
	origin := newBenchOrigin(b, body)

	b.Run("direct", func(b *testing.B) { benchGET(b, origin, "origin") })

	b.Run("sidecar", func(b *testing.B) {
		sc := startSidecar(b, options{static: map[string][]string{"origin": {origin}}})
		benchGET(b, sc.addr, "origin")
	})

	b.Run("sidecar-telemetry", func(b *testing.B) {
		// The sidecar as it runs by default: request metrics and tracing
		// at 1% (spans of sampled requests go to a processor that drops
		// them: the cost measured is the request path's).
		tp := sdktrace.NewTracerProvider(sdktrace.WithSampler(sdktrace.ParentBased(sdktrace.TraceIDRatioBased(0.01))))
		b.Cleanup(func() { _ = tp.Shutdown(context.Background()) })
		sc := startSidecar(b, options{static: map[string][]string{"origin": {origin}}, telemetry: &telemetry{
			tracer:  tp.Tracer("bench"),
			prop:    propagation.NewCompositeTextMapPropagator(propagation.TraceContext{}, propagation.Baggage{}),
			metrics: metrics.NewRequests(prometheus.NewRegistry()),
		}})
		benchGET(b, sc.addr, "origin")
	})

	b.Run("stdlib-reverseproxy", func(b *testing.B) {
		target, _ := url.Parse("http://" + origin)
		rp := &httputil.ReverseProxy{
			Rewrite:   func(pr *httputil.ProxyRequest) { pr.SetURL(target) },
			Transport: &http.Transport{MaxIdleConnsPerHost: 256},
		}
		addr := serve(b, rp)
		benchGET(b, addr, "origin")
	})
}

func newBenchOrigin(b *testing.B, body string) string {
	return serve(b, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "1024")
		io.WriteString(w, body)
	}))
}

func serve(b *testing.B, h http.Handler) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	srv := &http.Server{Handler: h}
	go srv.Serve(ln)
	b.Cleanup(func() { srv.Close() })
	return ln.Addr().String()
}

func benchGET(b *testing.B, addr, host string) {
	tr := &http.Transport{
		MaxIdleConnsPerHost: 256,
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, addr)
		},
	}
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr}
	b.SetParallelism(8)
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		buf := make([]byte, 4096)
		for pb.Next() {
			resp, err := c.Get("http://" + host + "/")
			if err != nil {
				b.Error(err)
				return
			}
			for {
				if _, err := resp.Body.Read(buf); err != nil {
					break
				}
			}
			resp.Body.Close()
			if resp.StatusCode != 200 {
				b.Errorf("status %d", resp.StatusCode)
				return
			}
		}
	})
}
