package sidecar_test

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/sidecar-mesh/sidecar/internal/freeport"
	"github.com/sidecar-mesh/sidecar/internal/logtest"
	"github.com/sidecar-mesh/sidecar/pkg/config"
	"github.com/sidecar-mesh/sidecar/pkg/policy"
	"github.com/sidecar-mesh/sidecar/pkg/sidecar"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// testConfig is a sidecar on free loopback ports in front of the app at
// appURL (with a readiness probe of its /ready), knowing the service
// "users" at upstream.
func testConfig(t *testing.T, appURL, upstream string) *config.Config {
	t.Helper()
	ports, err := freeport.Stable(5, false)
	if err != nil {
		t.Fatal(err)
	}
	at := func(i int) string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[i])) }
	u, err := url.Parse(appURL)
	if err != nil {
		t.Fatal(err)
	}
	appPort, _ := strconv.Atoi(u.Port())
	readiness, err := config.ParseProbe("http:/ready,interval=50ms")
	if err != nil {
		t.Fatal(err)
	}
	cfg := &config.Config{
		Service:   "app",
		AppPort:   appPort,
		Listeners: config.Listeners{Outbound: at(0), Inbound: at(1), Admin: at(2), Health: at(3), Metrics: at(4)},
		Discovery: config.Discovery{Static: map[string][]string{"users": {upstream}}},
		Probes:    config.Probes{Readiness: readiness},
		Lifecycle: config.Lifecycle{DrainWindow: new(policy.Duration(100 * time.Millisecond))},
	}
	cfg.WithDefaults()
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	return cfg
}

func serve(t *testing.T, body string) *httptest.Server {
	t.Helper()
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, body) }))
	t.Cleanup(s.Close)
	return s
}

// get sends method to url (with Host host, if set) and returns the status
// and body; 0 when no answer came.
func get(t *testing.T, method, url, host string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if host != "" {
		req.Host = host
	}
	c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 5 * time.Second}
	resp, err := c.Do(req)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// waitFor polls url until it answers want (the sidecar starting, a drain
// taking effect: not a request path).
func waitFor(t *testing.T, url string, want int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		code, body := get(t, http.MethodGet, url, "")
		if code == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("GET %s: %d %s after 10s, want %d", url, code, body, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Run serves both proxies, the health, admin and metrics endpoints; a
// drain from the admin API makes the sidecar not ready while it keeps
// serving; when its context ends Run shuts down in the documented order
// and returns with every listener closed.
func TestRunDrainsThenShutsDown(t *testing.T) {
	app := serve(t, "app")
	upstream := serve(t, "users")
	cfg := testConfig(t, app.URL, strings.TrimPrefix(upstream.URL, "http://"))
	log, logs := logtest.New()
	sc, err := sidecar.New(cfg, sidecar.WithLogger(log), sidecar.WithVersion("test"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- sc.Run(ctx) }()
	defer func() {
		cancel()
		<-done
	}()
	l := cfg.Listeners
	waitFor(t, "http://"+l.Health+"/healthz/ready", 200)

	if code, body := get(t, http.MethodGet, "http://"+l.Outbound+"/", "users"); code != 200 || body != "users" {
		t.Errorf("GET users through the outbound port: %d %q, want 200 from the upstream", code, body)
	}
	if code, body := get(t, http.MethodGet, "http://"+l.Inbound+"/", ""); code != 200 || body != "app" {
		t.Errorf("GET through the inbound port: %d %q, want 200 from the app", code, body)
	}
	if code, body := get(t, http.MethodGet, "http://"+l.Admin+"/version", ""); code != 200 || body != "\"test\"\n" {
		t.Errorf("GET /version: %d %q, want the version given to New", code, body)
	}
	_, scrape := get(t, http.MethodGet, "http://"+l.Metrics+"/metrics", "")
	for _, want := range []string{"sidecar_ready 1", `sidecar_app_probe_passing{probe="readiness"} 1`,
		`sidecar_requests_in_flight{direction="inbound"} 0`, `sidecar_discovery_endpoints{service="users",source="static"} 1`,
		`sidecar_policy_reloads_total{source="inline"}`, "sidecar_tracing_dropped_spans_total 0", "sidecar_access_log_dropped_lines_total 0"} {
		if !strings.Contains(scrape, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}

	if code, _ := get(t, http.MethodPost, "http://"+l.Admin+"/drain", ""); code != 200 {
		t.Fatalf("POST /drain: %d, want 200", code)
	}
	waitFor(t, "http://"+l.Health+"/healthz/ready", 503)
	if code, _ := get(t, http.MethodGet, "http://"+l.Outbound+"/", "users"); code != 200 {
		t.Errorf("GET users while draining: %d, want 200: a drain keeps serving", code)
	}

	cancel()
	select {
	case err := <-done:
		done <- err // for the deferred receive
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return within 10s of its context's end")
	}
	for name, addr := range map[string]string{"outbound": l.Outbound, "inbound": l.Inbound, "admin": l.Admin, "health": l.Health, "metrics": l.Metrics} {
		if c, err := net.Dial("tcp", addr); !errors.Is(err, syscall.ECONNREFUSED) {
			if c != nil {
				c.Close()
			}
			t.Errorf("dial %s listener after Run: %v, want connection refused", name, err)
		}
	}
	text := logs.String()
	last := -1
	for _, step := range []string{"sidecar ready", "draining: reporting not ready and deregistering", "shutting down",
		"drain window", "closing listeners and waiting for in-flight requests"} {
		i := strings.Index(text, step)
		if i < 0 || i < last {
			t.Fatalf("log: %q missing or out of order in\n%s", step, text)
		}
		last = i
	}
	if n := logs.Count("draining: reporting not ready and deregistering"); n != 1 {
		t.Errorf("the drain ran %d times, want once", n)
	}
}

// POST /quitquitquit ends Run as the end of its context does.
func TestQuitQuitQuit(t *testing.T) {
	cfg := testConfig(t, serve(t, "app").URL, "127.0.0.1:1")
	cfg.Lifecycle.DrainWindow = new(policy.Duration(0)) // none: Run ends at once
	sc, err := sidecar.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- sc.Run(context.Background()) }()
	waitFor(t, "http://"+cfg.Listeners.Admin+"/version", 200)
	if code, _ := get(t, http.MethodPost, "http://"+cfg.Listeners.Admin+"/quitquitquit", ""); code != 200 {
		t.Fatalf("POST /quitquitquit: %d, want 200", code)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return within 10s of POST /quitquitquit")
	}
}

// A listener that can't be bound fails New, which releases what it had
// bound and started (goleak checks the goroutines).
// On either engine.
func TestNewFailsOnAPortInUse(t *testing.T) {
	for _, engine := range []string{config.EngineGoroutines, config.EngineLoops} {
		t.Run(engine, func(t *testing.T) { newFailsOnAPortInUse(t, engine) })
	}
}

func newFailsOnAPortInUse(t *testing.T, engine string) {
	cfg := testConfig(t, serve(t, "app").URL, "127.0.0.1:1")
	cfg.OutboundEngine = engine
	taken, err := net.Listen("tcp", cfg.Listeners.Metrics)
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	if _, err := sidecar.New(cfg); err == nil || !strings.Contains(err.Error(), "metrics listener on "+cfg.Listeners.Metrics) {
		t.Fatalf("New with the metrics port taken: %v, want a metrics listener error", err)
	}
	for _, addr := range []string{cfg.Listeners.Outbound, cfg.Listeners.Admin} {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			t.Fatalf("%s after a failed New: %v, want it released", addr, err)
		}
		ln.Close()
	}
}
