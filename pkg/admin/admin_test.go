package admin

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"testing"

	"go.uber.org/goleak"

	"github.com/sidecar-mesh/sidecar/pkg/discovery"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestAdminAPI(t *testing.T) {
	static, err := discovery.NewStatic(map[string][]string{"users": {"127.0.0.1:9001", "127.0.0.1:9002"}, "empty": {}})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(Handler(Sources{
		Config:   func() any { return map[string]string{"service": "orders"} },
		Resolver: discovery.Chain{static},
		Version:  map[string]string{"version": "v1"},
	}))
	defer srv.Close()

	get := func(path string, v any) {
		t.Helper()
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "application/json" {
			t.Fatalf("GET %s: %d %s", path, resp.StatusCode, resp.Header.Get("Content-Type"))
		}
		if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
	}
	var cfg map[string]string
	get("/config", &cfg)
	if cfg["service"] != "orders" {
		t.Fatalf("/config = %v", cfg)
	}
	var eps struct {
		Services []struct {
			Service   string
			Source    string
			Endpoints []struct{ Addr string }
		}
	}
	get("/endpoints", &eps)
	if len(eps.Services) != 2 || eps.Services[1].Service != "users" || len(eps.Services[1].Endpoints) != 2 ||
		eps.Services[1].Endpoints[1].Addr != "127.0.0.1:9002" || eps.Services[1].Source != "static" ||
		eps.Services[0].Service != "empty" || len(eps.Services[0].Endpoints) != 0 {
		t.Fatalf("/endpoints = %+v", eps)
	}
	resp, err := http.Post(srv.URL+"/config", "application/json", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Fatalf("POST /config: %d, want 405 (read-only API)", resp.StatusCode)
	}
}

// Go's profiles are served with Profiling, to loopback clients only.
func TestProfilingLoopbackOnly(t *testing.T) {
	static, err := discovery.NewStatic(nil)
	if err != nil {
		t.Fatal(err)
	}
	h := Handler(Sources{Config: func() any { return nil }, Resolver: discovery.Chain{static}, Profiling: true})
	for _, tc := range []struct {
		remote string
		want   int
	}{{"127.0.0.1:5000", 200}, {"[::1]:5000", 200}, {"[::ffff:127.0.0.1]:5000", 200}, {"10.1.2.3:5000", 403}, {"[2001:db8::1]:5000", 403}} {
		r := httptest.NewRequest("GET", "http://localhost:15000/debug/pprof/", nil)
		r.RemoteAddr = tc.remote
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		if w.Code != tc.want {
			t.Errorf("GET /debug/pprof/ from %s: %d, want %d", tc.remote, w.Code, tc.want)
		}
	}
	off := Handler(Sources{Config: func() any { return nil }, Resolver: discovery.Chain{static}})
	r := httptest.NewRequest("GET", "http://localhost:15000/debug/pprof/", nil)
	r.RemoteAddr = "127.0.0.1:5000"
	w := httptest.NewRecorder()
	off.ServeHTTP(w, r)
	if w.Code != http.StatusNotFound {
		t.Errorf("GET /debug/pprof/ without Profiling: %d, want 404", w.Code)
	}
}
