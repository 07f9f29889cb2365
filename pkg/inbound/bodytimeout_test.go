package inbound_test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/sidecar-mesh/sidecar/pkg/downstream"
	"github.com/sidecar-mesh/sidecar/pkg/inbound"
	"github.com/sidecar-mesh/sidecar/pkg/metrics"
)

// The request body's progress timeout holds on the sidecar's own request
// path as configured by default (tracing off: the Observer hands the
// request on as it is): a body that stops is answered 408 once the
// timeout passes, and one that keeps coming, however slowly, reaches the
// app whole.
func TestBodyProgressTimeoutWithoutTracing(t *testing.T) {
	app := startApp(t, func(w http.ResponseWriter, r *http.Request) {
		b, err := io.ReadAll(r.Body)
		if err != nil {
			return
		}
		io.WriteString(w, strconv.Itoa(len(b)))
	})
	limits := downstream.Limits{BodyReadTimeout: 300 * time.Millisecond}
	for name, obs := range map[string]inbound.Observer{
		"no observer": nil,
		"tracing off": inbound.NewTelemetry(nil, nil, nil, "app"),
	} {
		t.Run(name, func(t *testing.T) {
			_, addr := startInbound(t, inbound.Config{AppAddr: app.addr(), Observer: obs, Limits: limits})
			send := func(pieces int, gap time.Duration) (int, string, time.Duration) {
				c, err := net.Dial("tcp", addr)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(10 * time.Second))
				start := time.Now()
				fmt.Fprintf(c, "POST / HTTP/1.1\r\nHost: app\r\nContent-Length: 10\r\n\r\n")
				for i := 0; i < pieces; i++ {
					time.Sleep(gap)
					if _, err := io.WriteString(c, "x"); err != nil {
						break
					}
				}
				resp, err := http.ReadResponse(bufio.NewReader(c), nil)
				if err != nil {
					return 0, err.Error(), time.Since(start)
				}
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				return resp.StatusCode, string(b), time.Since(start)
			}
			// Ten bytes, one every 100 ms: each wait is under the timeout.
			if code, body, _ := send(10, 100*time.Millisecond); code != 200 || body != "10" {
				t.Errorf("a slow body that keeps coming: %d %q, want 200 and all 10 bytes at the app", code, body)
			}
			// Three bytes, then nothing.
			if code, body, took := send(3, 20*time.Millisecond); code != http.StatusRequestTimeout {
				t.Errorf("a body that stops: %d %q after %v, want 408 (the timeout is 300 ms)", code, body, took)
			}
		})
	}
}

// An HTTP/2 request body is a stream's: quiet between its messages for
// longer than the body timeout (a gRPC client stream, a chat), it goes on,
// and so does a stream whose handler is waiting elsewhere; only a stream
// quiet for Envoy's stream_idle_timeout is cut.
func TestH2BodyQuietPastBodyTimeout(t *testing.T) {
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	app := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, err := io.ReadAll(r.Body)
		if err != nil {
			return
		}
		io.WriteString(w, string(b))
	}))
	app.Config.Protocols = &p
	app.Start()
	defer app.Close()
	_, addr := startInbound(t, inbound.Config{AppAddr: app.Listener.Addr().String(),
		Limits: downstream.Limits{BodyReadTimeout: 200 * time.Millisecond}})
	tr := &http.Transport{Protocols: &p}
	defer tr.CloseIdleConnections()
	pr, pw := io.Pipe()
	go func() {
		io.WriteString(pw, "a")
		time.Sleep(700 * time.Millisecond) // more than three body timeouts
		io.WriteString(pw, "b")
		pw.Close()
	}()
	req, _ := http.NewRequest("POST", "http://"+addr+"/stream", pr)
	req.Host = "app"
	resp, err := tr.RoundTrip(req)
	if err != nil {
		t.Fatalf("a quiet HTTP/2 body: %v", err)
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != 200 || string(b) != "ab" {
		t.Fatalf("a quiet HTTP/2 body: %d %q %v, want 200 \"ab\"", resp.StatusCode, b, err)
	}
}

// gRPC outcomes of the app are counted by their grpc-status (a failure
// comes as HTTP 200): trailers-only and in the trailers.
func TestInboundGRPCOutcomesCounted(t *testing.T) {
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	app := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/grpc")
		if r.URL.Path == "/pkg.S/Fail" {
			w.Header().Set("Grpc-Status", "14") // trailers-only
			return
		}
		w.Header().Set("Trailer", "Grpc-Status")
		w.Write([]byte{0, 0, 0, 0, 0})
		w.Header().Set("Grpc-Status", "0")
	}))
	app.Config.Protocols = &p
	app.Start()
	defer app.Close()
	reg := prometheus.NewRegistry()
	_, addr := startInbound(t, inbound.Config{AppAddr: app.Listener.Addr().String(),
		Observer: inbound.NewTelemetry(nil, nil, metrics.NewRequests(reg), "app")})
	tr := &http.Transport{Protocols: &p}
	defer tr.CloseIdleConnections()
	for _, path := range []string{"/pkg.S/Ok", "/pkg.S/Ok", "/pkg.S/Fail"} {
		req, _ := http.NewRequest("POST", "http://"+addr+path, nil)
		req.Host = "app"
		req.Header.Set("Content-Type", "application/grpc")
		req.Header.Set("Te", "trailers")
		resp, err := tr.RoundTrip(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	got := map[string]float64{}
	mfs, _ := reg.Gather()
	for _, mf := range mfs {
		if mf.GetName() == "sidecar_grpc_requests_total" {
			for _, m := range mf.GetMetric() {
				for _, l := range m.GetLabel() {
					if l.GetName() == "grpc_code" {
						got[l.GetValue()] = m.GetCounter().GetValue()
					}
				}
			}
		}
	}
	if got["0"] != 2 || got["14"] != 1 {
		t.Fatalf("sidecar_grpc_requests_total by code %v, want 0: 2 and 14: 1", got)
	}
}
