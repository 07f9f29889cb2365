package main

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sidecar-mesh/sidecar/internal/faultserver"
)

// runningSidecar is `sidecar run` in-process, on free loopback ports.
type runningSidecar struct {
	out, admin, metrics, health string
}

// runSidecar runs `sidecar run` in-process with a config file and extra
// flags; it stops when the test ends.
func runSidecar(t *testing.T, config string, args ...string) runningSidecar {
	t.Helper()
	rs := runningSidecar{out: freePort(t), admin: freePort(t), metrics: freePort(t), health: freePort(t)}
	file := filepath.Join(t.TempDir(), "sidecar.yaml")
	if err := os.WriteFile(file, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		cmd := newRootCommand(strings.NewReader(""), io.Discard, io.Discard, func(string) string { return "" })
		cmd.SetArgs(append([]string{"run", "--config", file, "--outbound-addr", rs.out, "--admin-addr", rs.admin,
			"--metrics-addr", rs.metrics, "--health-addr", rs.health, "--drain-window", "1ms", "--log-level", "error"}, args...))
		done <- cmd.ExecuteContext(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("sidecar run exited with %v", err)
		}
	})
	for deadline := time.Now().Add(10 * time.Second); ; {
		resp, err := http.Get("http://" + rs.admin + "/version")
		if err == nil {
			resp.Body.Close()
			return rs
		}
		if time.Now().After(deadline) {
			t.Fatalf("sidecar not serving after 10s: %v", err)
		}
		time.Sleep(20 * time.Millisecond) // polling for startup, not on a request path
	}
}

func fetch(t *testing.T, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// The resilience chain's decisions show in /metrics and in the admin API:
// retries by reason, the breaker's state and transitions, shed requests.
func TestResilienceMetrics(t *testing.T) {
	down := faultserver.New(t, faultserver.Faults{ErrorRatio: 1})
	rs := runSidecar(t, `
discovery: {static: {svc: [`+down.Addr()+`]}}
limits: {outboundMaxInFlight: 100}
policies:
  - service: svc
    retry: {attempts: 2, backoff: {base: 1ms, max: 1ms}}
    circuitBreaker: {consecutiveFailures: 4, openDuration: 1m}
`)
	client := &http.Client{Timeout: 5 * time.Second}
	var reasons []string
	for range 10 {
		req, _ := http.NewRequest("GET", "http://"+rs.out+"/", nil)
		req.Host = "svc"
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		reasons = append(reasons, resp.Header.Get("X-Sidecar-Error"))
	}
	// Four failed requests (the breaker counts requests, after their
	// retries), of two attempts each, trip the breaker; the other six are
	// refused without an attempt.
	if got := strings.Join(reasons, ","); got != ",,,,circuit_open,circuit_open,circuit_open,circuit_open,circuit_open,circuit_open" {
		t.Fatalf("local error reasons %q, want four upstream 503s then circuit_open", got)
	}
	if n := down.Requests(); n != 8 {
		t.Fatalf("upstream saw %d attempts, want 8", n)
	}
	m := fetch(t, "http://"+rs.metrics+"/metrics")
	for _, want := range []string{
		`sidecar_retries_total{reason="503",service="svc"} 4`,
		`sidecar_circuit_breaker_transitions_total{service="svc",state="open"} 1`,
		`sidecar_circuit_breaker_state{service="svc",state="open"} 1`,
		`sidecar_circuit_breaker_state{service="svc",state="closed"} 0`,
		`sidecar_shed_requests_total{reason="circuit_open",service="svc"} 6`,
		`sidecar_requests_in_flight{direction="outbound"} 0`,
		`sidecar_outlier_ejected_endpoints{service="svc"} 0`,
		`sidecar_concurrency_limit{service="svc"} 1024`,
		`sidecar_endpoint_attempts_total{endpoint="` + down.Addr() + `",service="svc"} 8`,
	} {
		if !strings.Contains(m, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	if t.Failed() {
		t.Logf("/metrics:\n%s", grepLines(m, "sidecar_"))
	}
	if r := fetch(t, "http://"+rs.admin+"/resilience"); !strings.Contains(r, `"state": "open"`) {
		t.Fatalf("admin /resilience = %s, want the breaker open", r)
	}
}

// Hedges show in /metrics: sent, and won when their answer is the one the
// app got. Here every request's first attempt goes to an instance that
// stalls, and its hedge, 20ms later, to one that answers.
func TestHedgeMetrics(t *testing.T) {
	stalled := faultserver.New(t, faultserver.Faults{StallRatio: 1, Stall: 10 * time.Second})
	quick := faultserver.New(t, faultserver.Faults{})
	rs := runSidecar(t, `
discovery: {static: {svc: [`+stalled.Addr()+`, `+quick.Addr()+`]}}
policies:
  - service: svc
    loadBalancer: {policy: least-request}
    hedge: {delay: 20ms}
`)
	client := &http.Client{Timeout: 5 * time.Second}
	// At least 6 requests, and until some met the stalled instance (a
	// tie in least-request may send a run of first attempts to the quick
	// one, and nothing is hedged then).
	for i := 0; i < 6 || stalled.Requests() < 2; i++ {
		if i == 100 {
			t.Fatalf("100 requests, %d first attempts at the stalled instance: least-request never picked it", stalled.Requests())
		}
		req, _ := http.NewRequest("GET", "http://"+rs.out+"/", nil)
		req.Host = "svc"
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("status %d, want the hedge's 200", resp.StatusCode)
		}
	}
	// least-request sends a first attempt to the stalled instance while
	// it has none in flight there: each hedge that wins cancels the
	// stalled attempt, so requests keep meeting it. Every attempt sent to
	// it is one of its arrivals, each hedge won by the quick one.
	sent, won := metricValue(t, rs.metrics, `sidecar_hedges_total{service="svc"}`), metricValue(t, rs.metrics, `sidecar_hedges_won_total{service="svc"}`)
	picks := metricValue(t, rs.metrics, `sidecar_endpoint_attempts_total{endpoint="`+stalled.Addr()+`",service="svc"}`)
	if won < 1 || won > sent || picks != float64(stalled.Requests()) {
		t.Fatalf("hedges sent %v, won %v; attempts at the stalled instance %v, its arrivals %d; want hedges won, "+
			"and one attempt per arrival", sent, won, picks, stalled.Requests())
	}
}

// A stream the sidecar cuts is counted in /metrics by reason: here an
// event stream that goes silent after one event, past streamIdleTimeout.
func TestStreamCutMetric(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		_, _ = io.WriteString(w, "data: 1\n\n")
		_ = http.NewResponseController(w).Flush()
		<-r.Context().Done()
	}))
	defer up.Close()
	rs := runSidecar(t, `
discovery: {static: {svc: [`+strings.TrimPrefix(up.URL, "http://")+`]}}
policies:
  - {service: svc, timeout: 100ms, streamIdleTimeout: 300ms}
`)
	req, _ := http.NewRequest("GET", "http://"+rs.out+"/events", nil)
	req.Host = "svc"
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(b) != "data: 1\n\n" || !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("silent event stream: %q, %v; want its one event, then the body cut short", b, err)
	}
	m := fetch(t, "http://"+rs.metrics+"/metrics")
	if want := `sidecar_streams_cut_total{reason="idle",service="svc"} 1`; !strings.Contains(m, want) {
		t.Fatalf("/metrics lacks %q:\n%s", want, grepLines(m, "sidecar_streams"))
	}
}

func grepLines(s, prefix string) string {
	var b bytes.Buffer
	for _, l := range strings.Split(s, "\n") {
		if strings.HasPrefix(l, prefix) {
			b.WriteString(l + "\n")
		}
	}
	return b.String()
}
