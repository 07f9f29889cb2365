package inbound_test

import (
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/inbound"
)

// healthAnswer is what one health endpoint said.
type healthAnswer struct {
	code    int
	status  string
	failing map[string]string
}

// ask calls h as a caller on this host would (the health port says why
// only to those; TestHealthDetailsForLoopbackCallersOnly asks over the
// network), in memory, so that it can be asked in a synctest bubble.
func ask(t *testing.T, h http.Handler, method, path string) healthAnswer {
	t.Helper()
	req := httptest.NewRequest(method, path, nil)
	req.RemoteAddr = "127.0.0.1:40000"
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	resp := rec.Result()
	b, _ := io.ReadAll(resp.Body)
	var body struct {
		Status  string            `json:"status"`
		Failing map[string]string `json:"failing"`
	}
	if method != http.MethodHead {
		if err := json.Unmarshal(b, &body); err != nil {
			t.Fatalf("%s %s: body %q is not JSON: %v", method, path, b, err)
		}
	}
	return healthAnswer{resp.StatusCode, body.Status, body.Failing}
}

// flag is a readiness condition a test turns on and off.
type flag struct {
	on  atomic.Bool
	why string
}

func (f *flag) err() error {
	if f.on.Load() {
		return nil
	}
	return errors.New(f.why)
}

func TestHealthEndpoints(t *testing.T) {
	var appCode atomic.Int64
	appCode.Store(200)
	app := startApp(t, func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(int(appCode.Load())) })
	// The app runs outside the bubble; the probers in it, on virtual time.
	synctest.Test(t, func(t *testing.T) {
		readiness := startProber(t, app.addr(), inbound.Probe{HTTP: &inbound.HTTPProbe{Path: "/ready"},
			FailureThreshold: 1, InitialDelay: time.Second}, false)
		startup := startProber(t, app.addr(), inbound.Probe{TCP: true, InitialDelay: time.Second}, false)
		outbound := &flag{why: "outbound listener not serving yet"}
		policy := &flag{why: "no policy loaded"}

		h := inbound.NewHealthHandler(inbound.HealthConfig{
			Sidecar:   []inbound.Check{{Name: "outbound", Err: outbound.err}},
			Ready:     []inbound.Check{{Name: "policy", Err: policy.err}, {Name: "always"}},
			Readiness: readiness.p,
			Startup:   startup.p,
		})
		expect := func(step, path string, code int, failing ...string) {
			t.Helper()
			a := ask(t, h, http.MethodGet, path)
			var names []string
			for k := range a.failing {
				names = append(names, k)
			}
			wantStatus := "ok"
			if code != 200 {
				wantStatus = "failing"
			}
			if code == 404 {
				wantStatus = "not_configured"
			}
			if a.code != code || a.status != wantStatus || len(a.failing) != len(failing) {
				t.Fatalf("%s: GET %s = %d %q failing %v, want %d %q failing %v", step, path, a.code, a.status, a.failing, code, wantStatus, failing)
			}
			for _, name := range failing {
				if a.failing[name] == "" {
					t.Fatalf("%s: GET %s failing %v, want a reason for %q", step, path, a.failing, name)
				}
			}
		}

		// Before anything is up: live, nothing else.
		expect("start", "/healthz/live", 200)
		expect("start", "/healthz/ready", 503, "outbound", "policy", "app")
		expect("start", "/healthz/sidecar", 503, "outbound")
		expect("start", "/app-health/readyz", 503, "readiness")
		expect("start", "/app-health/startupz", 503, "startup")
		expect("start", "/app-health/livez", 404, "liveness")

		outbound.on.Store(true)
		expect("outbound up", "/healthz/sidecar", 200)
		expect("outbound up", "/healthz/ready", 503, "policy", "app")

		policy.on.Store(true)
		if err := readiness.afterDelay(t, time.Second); err != nil {
			t.Fatalf("readiness probe: %v", err)
		}
		if err := startup.afterDelay(t, time.Second); err != nil {
			t.Fatalf("startup probe: %v", err)
		}
		expect("all up", "/healthz/ready", 200)
		expect("all up", "/app-health/readyz", 200)
		expect("all up", "/app-health/startupz", 200)
		if a := ask(t, h, http.MethodHead, "/healthz/ready"); a.code != 200 {
			t.Fatalf("HEAD /healthz/ready = %d, want 200", a.code)
		}

		appCode.Store(500)
		readiness.next(t)
		expect("app failing", "/app-health/readyz", 503, "readiness")
		expect("app failing", "/healthz/ready", 503, "app")
		if a := ask(t, h, http.MethodGet, "/healthz/ready"); !strings.Contains(a.failing["app"], "status 500") {
			t.Fatalf("/healthz/ready says %q about the app, want the probe's error", a.failing["app"])
		}
		appCode.Store(200)
		readiness.next(t)
		expect("app back", "/healthz/ready", 200)

		h.Drain()
		if !h.Draining() {
			t.Fatalf("Draining() = false after Drain")
		}
		expect("draining", "/healthz/ready", 503, "drain")
		expect("draining", "/app-health/readyz", 503, "drain")
		expect("draining", "/healthz/live", 200)
		expect("draining", "/healthz/sidecar", 200)
		expect("draining", "/app-health/startupz", 200)

		if a := ask(t, h, http.MethodPost, "/healthz/live"); a.code != http.StatusMethodNotAllowed {
			t.Fatalf("POST /healthz/live = %d, want 405", a.code)
		}
		if a := ask(t, h, http.MethodGet, "/healthz/nope"); a.code != http.StatusNotFound {
			t.Fatalf("GET /healthz/nope = %d, want 404", a.code)
		}
	})
}

func TestHealthWithNothingConfigured(t *testing.T) {
	h := inbound.NewHealthHandler(inbound.HealthConfig{})
	for path, code := range map[string]int{
		"/healthz/live": 200, "/healthz/ready": 200, "/healthz/sidecar": 200,
		"/app-health/livez": 404, "/app-health/readyz": 404, "/app-health/startupz": 404,
	} {
		if a := ask(t, h, http.MethodGet, path); a.code != code {
			t.Errorf("GET %s = %d, want %d", path, a.code, code)
		}
	}
}
