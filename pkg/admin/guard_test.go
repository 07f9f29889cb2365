package admin

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/sidecar-mesh/sidecar/internal/hostip"
	"github.com/sidecar-mesh/sidecar/pkg/config"
	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/requestlog"
)

// lifecycle is an admin API whose drain and quit count their calls.
type lifecycle struct {
	drains, quits atomic.Int64
	handler       http.Handler
}

func newLifecycle(t *testing.T) *lifecycle {
	t.Helper()
	static, err := discovery.NewStatic(nil)
	if err != nil {
		t.Fatal(err)
	}
	l := &lifecycle{}
	l.handler = Handler(Sources{
		Config:    func() any { return map[string]string{"service": "orders"} },
		Resolver:  discovery.Chain{static},
		Drain:     func() { l.drains.Add(1) },
		Quit:      func() { l.quits.Add(1) },
		Profiling: true,
	})
	return l
}

// Every request must name a loopback Host (DNS rebinding gives a page of
// attacker.example the admin API as its own origin) and must not come from
// a page of another site (Origin, Sec-Fetch-Site); state changes need POST.
func TestAdminRefusesOtherSites(t *testing.T) {
	l := newLifecycle(t)
	addr := hostip.Serve(t, "127.0.0.1", l.handler)
	_, port, _ := net.SplitHostPort(addr)
	for _, tc := range []struct {
		name, method, path, host string
		header                   map[string]string
		code                     int
		drains, quits            int64 // the counts after the call
	}{
		{"loopback Host", "GET", "/config", "", nil, 200, 0, 0},
		{"localhost", "GET", "/config", "localhost:" + port, nil, 200, 0, 0},
		{"LOCALHOST without a port", "GET", "/config", "LOCALHOST", nil, 200, 0, 0},
		{"[::1]", "GET", "/config", "[::1]:" + port, nil, 200, 0, 0},
		{"rebound name", "GET", "/config", "attacker.example:" + port, nil, 403, 0, 0},
		{"rebound name, drain", "POST", "/drain", "attacker.example:" + port, nil, 403, 0, 0},
		{"rebound name, quit", "POST", "/quitquitquit", "rebind.127.0.0.1.nip.io:" + port, nil, 403, 0, 0},
		{"rebound name, profiles", "GET", "/debug/pprof/", "attacker.example", nil, 403, 0, 0},
		{"pod IP as Host", "GET", "/config", "10.1.2.3:" + port, nil, 403, 0, 0},
		{"form of another site", "POST", "/quitquitquit", "", map[string]string{"Origin": "http://attacker.example"}, 403, 0, 0},
		{"sandboxed page", "POST", "/drain", "", map[string]string{"Origin": "null"}, 403, 0, 0},
		{"read from another site", "GET", "/config", "", map[string]string{"Origin": "https://attacker.example"}, 403, 0, 0},
		{"fetch metadata: cross-site", "POST", "/drain", "", map[string]string{"Sec-Fetch-Site": "cross-site"}, 403, 0, 0},
		{"fetch metadata: same-site", "POST", "/quitquitquit", "", map[string]string{"Sec-Fetch-Site": "same-site", "Origin": "http://localhost:8080"}, 403, 0, 0},
		// Browsers that send no fetch metadata: the Origin alone must be the
		// admin API's own.
		{"page of another local server", "POST", "/drain", "", map[string]string{"Origin": "http://localhost:3000"}, 403, 0, 0},
		{"another port of this host", "POST", "/quitquitquit", "", map[string]string{"Origin": "http://127.0.0.1:1"}, 403, 0, 0},
		{"another name of this host", "POST", "/drain", "", map[string]string{"Origin": "http://localhost:" + port}, 403, 0, 0},
		{"https page of this host", "GET", "/config", "", map[string]string{"Origin": "https://127.0.0.1:" + port}, 403, 0, 0},
		{"drain is POST only", "GET", "/drain", "", nil, 405, 0, 0},
		{"quit is POST only", "GET", "/quitquitquit", "", nil, 405, 0, 0},
		{"drain", "POST", "/drain", "", nil, 200, 1, 0},
		{"page of the admin API itself", "POST", "/drain", "", map[string]string{"Origin": "http://127.0.0.1:" + port, "Sec-Fetch-Site": "same-origin"}, 200, 2, 0},
		{"typed into the address bar", "GET", "/config", "", map[string]string{"Sec-Fetch-Site": "none"}, 200, 2, 0},
		{"quit", "POST", "/quitquitquit", "localhost:" + port, nil, 200, 2, 1},
	} {
		code, body := hostip.Call(t, addr, tc.method, tc.path, tc.host, tc.header)
		if code != tc.code || l.drains.Load() != tc.drains || l.quits.Load() != tc.quits {
			t.Errorf("%s: %s %s = %d %s; drains %d, quits %d; want %d, drains %d, quits %d",
				tc.name, tc.method, tc.path, code, strings.TrimSpace(body), l.drains.Load(), l.quits.Load(), tc.code, tc.drains, tc.quits)
		}
		if code == 403 && !strings.Contains(body, `"error"`) {
			t.Errorf("%s: 403 body %s, want a JSON error saying why", tc.name, body)
		}
	}
}

// Bound beyond loopback, the admin API still answers reads to peers on
// other hosts (with a loopback Host), but the lifecycle actions and the
// profiles to loopback peers only.
func TestAdminLifecycleLoopbackPeersOnly(t *testing.T) {
	l := newLifecycle(t)
	ip := hostip.NonLoopback(t)
	addr := hostip.Serve(t, ip, l.handler)
	for _, tc := range []struct {
		method, path string
		code         int
	}{
		{"GET", "/config", 200},
		{"POST", "/drain", 403},
		{"POST", "/quitquitquit", 403},
		{"GET", "/debug/pprof/", 403},
		{"GET", "/debug/pprof/cmdline", 403},
	} {
		code, body := hostip.Call(t, addr, tc.method, tc.path, "localhost", nil)
		if code != tc.code {
			t.Errorf("%s %s from %s = %d %s, want %d", tc.method, tc.path, ip, code, strings.TrimSpace(body), tc.code)
		}
	}
	if l.drains.Load() != 0 || l.quits.Load() != 0 {
		t.Errorf("a peer at %s drained %d and quit %d times, want none", ip, l.drains.Load(), l.quits.Load())
	}

	// The same requests from loopback.
	local := hostip.Serve(t, "127.0.0.1", l.handler)
	for _, path := range []string{"/drain", "/quitquitquit"} {
		if code, body := hostip.Call(t, local, "POST", path, "", nil); code != 200 {
			t.Errorf("POST %s from loopback = %d %s, want 200", path, code, body)
		}
	}
	if code, _ := hostip.Call(t, local, "GET", "/debug/pprof/cmdline", "", nil); code != 200 {
		t.Errorf("GET /debug/pprof/cmdline from loopback = %d, want 200", code)
	}
	if l.drains.Load() != 1 || l.quits.Load() != 1 {
		t.Errorf("from loopback: drained %d and quit %d times, want once each", l.drains.Load(), l.quits.Load())
	}
}

// GET /config shows no secret of the configuration: probe headers that
// carry credentials, userinfo and secret query parameters of URLs.
func TestAdminConfigRedacted(t *testing.T) {
	cfg, err := config.Parse([]byte(`
service: orders
appPort: 8080
probes:
  readiness:
    http: /ready?token=q-s3cret&verbose=1
    headers: {Authorization: "Bearer h-s3cret", Proxy-Authorization: "Basic p-s3cret", Cookie: "sid=c-s3cret",
              X-Api-Key: k-s3cret, X-Session-Token: t-s3cret, X-Password: pw-s3cret, X-Mode: probe}
tracing: {endpoint: "https://user:u-s3cret@collector.example:4318"}
`), "sidecar.yaml")
	if err != nil {
		t.Fatal(err)
	}
	static, err := discovery.NewStatic(nil)
	if err != nil {
		t.Fatal(err)
	}
	addr := hostip.Serve(t, "127.0.0.1", Handler(Sources{Config: func() any { return cfg }, Resolver: discovery.Chain{static}}))
	code, body := hostip.Call(t, addr, "GET", "/config", "", nil)
	if code != 200 {
		t.Fatalf("GET /config = %d %s", code, body)
	}
	if strings.Contains(body, "s3cret") {
		t.Errorf("GET /config shows a secret:\n%s", body)
	}
	for _, want := range []string{`"Authorization": "[redacted]"`, `"Cookie": "[redacted]"`, `"X-Api-Key": "[redacted]"`,
		`"X-Mode": "probe"`, `"/ready?token=[redacted]\u0026verbose=1"`, `"https://[redacted]@collector.example:4318"`} {
		if !strings.Contains(body, want) {
			t.Errorf("GET /config lacks %s:\n%s", want, body)
		}
	}
	if cfg.Probes.Readiness.Headers["Authorization"] != "Bearer h-s3cret" || cfg.Tracing.Endpoint != "https://user:u-s3cret@collector.example:4318" {
		t.Errorf("the configuration itself lost its values: %v %s", map[string]string(cfg.Probes.Readiness.Headers), string(cfg.Tracing.Endpoint))
	}
}

// A tap client that stops reading loses its tap once a write has waited
// tapWriteTimeout: its slot is free again, and the admin server's
// shutdown is not held by it.
func TestStalledTapLetsGo(t *testing.T) {
	defer func(d time.Duration) { tapWriteTimeout = d }(tapWriteTimeout)
	tapWriteTimeout = 200 * time.Millisecond
	rec := requestlog.New(requestlog.Config{MaxWatchers: 1, TapRate: 1 << 30})
	defer rec.Close()
	static, _ := discovery.NewStatic(nil)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: Handler(Sources{Config: func() any { return nil }, Resolver: discovery.Chain{static}, Requests: rec})}
	srv.RegisterOnShutdown(rec.CloseTaps)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	defer func() { <-served }()
	defer srv.Close()

	// A client with a small receive buffer that asks for a tap and never
	// reads it.
	d := net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
		return c.Control(func(fd uintptr) { _ = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 1024) })
	}}
	c, err := d.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "GET /tap HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
	for !rec.Wants() {
		time.Sleep(5 * time.Millisecond)
	}
	path := "/" + strings.Repeat("a", 250)
	for i := 0; rec.Wants(); i++ {
		if i > 2_000_000 {
			t.Fatal("the stalled tap still holds its slot after 2,000,000 requests")
		}
		rec.Record(&requestlog.Request{Service: "users", Method: "GET", Path: path, Status: 503})
		if i%1000 == 0 {
			time.Sleep(time.Millisecond)
		}
	}
	// The slot is free: a new tap is served.
	resp, err := http.Get("http://" + ln.Addr().String() + "/tap")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("a new tap after the stalled one: %d, want 200", resp.StatusCode)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
}
