package main

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httptrace"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// binaries are the programs built for tests, by package path.
var binaries sync.Map // string -> *binary

type binary struct {
	once sync.Once
	path string
	err  error
}

// sidecarBinary builds the sidecar once per test run, for tests that need
// a real process (signals, exit codes).
func sidecarBinary(t *testing.T) string { return goBinary(t, ".") }

// goBinary builds the Go package pkg (a path as `go build` takes it, from
// this directory) once per test run and returns the program.
func goBinary(t *testing.T, pkg string) string {
	t.Helper()
	v, _ := binaries.LoadOrStore(pkg, &binary{})
	b := v.(*binary)
	b.once.Do(func() {
		dir, err := os.MkdirTemp("", "sidecar-bin-")
		if err != nil {
			b.err = err
			return
		}
		b.path = filepath.Join(dir, filepath.Base(filepath.Join("sidecar", pkg)))
		if out, err := exec.Command("go", "build", "-o", b.path, pkg).CombinedOutput(); err != nil {
			b.err = errors.New("go build " + pkg + ": " + err.Error() + "\n" + string(out))
		}
	})
	if b.err != nil {
		t.Fatal(b.err)
	}
	return b.path
}

func status(c *http.Client, url string) int {
	resp, err := c.Get(url)
	if err != nil {
		return 0
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}

// waitStatus polls url until it answers want (polling the sidecar's
// startup, not on a request path) and returns how long that took.
func waitStatus(t *testing.T, c *http.Client, url string, want int, limit time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	for got := status(c, url); got != want; got = status(c, url) {
		if time.Since(start) > limit {
			t.Fatalf("GET %s: %d after %v, want %d", url, got, limit, want)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return time.Since(start)
}

// loadResult counts the outcomes of a stream of requests.
type loadResult struct {
	ok, refused, failed atomic.Int64
	// unaccepted counts requests reset on a new connection before any
	// answer (see send).
	unaccepted   atomic.Int64
	mu           sync.Mutex
	firstFailure string
}

// send sends req with c and records the outcome. A request that fails
// with a reset or an EOF on a new connection before any byte of an answer
// never reached the server: the connection was still in the kernel's
// accept queue when the listener closed, and the kernel reset it. It is
// refused, not accepted and lost, and counts as unaccepted.
func (r *loadResult) send(c *http.Client, req *http.Request) {
	var reused, answered atomic.Bool
	req = req.WithContext(httptrace.WithClientTrace(req.Context(), &httptrace.ClientTrace{
		GotConn:              func(i httptrace.GotConnInfo) { reused.Store(i.Reused) },
		GotFirstResponseByte: func() { answered.Store(true) },
	}))
	resp, err := c.Do(req)
	if err != nil && !reused.Load() && !answered.Load() && (errors.Is(err, syscall.ECONNRESET) || errors.Is(err, io.EOF)) {
		r.unaccepted.Add(1)
		return
	}
	r.record(resp, err)
}

func (r *loadResult) record(resp *http.Response, err error) {
	switch {
	case err != nil && errors.Is(err, syscall.ECONNREFUSED):
		r.refused.Add(1) // the listener is closed: refused cleanly, never accepted
	case err != nil:
		r.fail(err.Error())
	default:
		b, rerr := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || rerr != nil {
			r.fail(resp.Status + " " + string(b))
			return
		}
		r.ok.Add(1)
	}
}

func (r *loadResult) fail(why string) {
	if r.failed.Add(1) == 1 {
		r.mu.Lock()
		r.firstFailure = why
		r.mu.Unlock()
	}
}

// SIGTERM under steady inbound and outbound load: the sidecar reports not
// ready, keeps serving through the drain window, then refuses new
// connections, finishes what it accepted (a slow request included) and
// exits 0. Not one accepted request fails.
func TestSIGTERMUnderLoad(t *testing.T) {
	bin := sidecarBinary(t)
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		d := 10 * time.Millisecond
		if r.URL.Path == "/slow" {
			d = 2 * time.Second
		}
		time.Sleep(d) // the app's own work
		io.WriteString(w, "app")
	}))
	defer app.Close()
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(10 * time.Millisecond)
		io.WriteString(w, "upstream")
	}))
	defer upstream.Close()
	_, appPort, _ := net.SplitHostPort(strings.TrimPrefix(app.URL, "http://"))
	in, out, adm, health, metrics := freePort(t), freePort(t), freePort(t), freePort(t), freePort(t)
	cmd := exec.Command(bin, "run", "--app-port", appPort, "--inbound-addr", in, "--outbound-addr", out,
		"--admin-addr", adm, "--health-addr", health, "--metrics-addr", metrics,
		"--static", "up="+strings.TrimPrefix(upstream.URL, "http://"),
		"--readiness-probe", "http:/,interval=100ms", "--drain-window", "1s", "--shutdown-timeout", "10s")
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		if cmd.ProcessState == nil {
			_ = cmd.Process.Kill()
			<-exited
		}
	}()
	probe := &http.Client{Timeout: 2 * time.Second}
	waitStatus(t, probe, "http://"+health+"/healthz/ready", 200, 10*time.Second)

	var inRes, outRes loadResult
	stop := make(chan struct{})
	var wg sync.WaitGroup
	load := func(res *loadResult, url, host string) {
		defer wg.Done()
		tr := &http.Transport{MaxIdleConnsPerHost: 4}
		defer tr.CloseIdleConnections()
		c := &http.Client{Transport: tr, Timeout: 15 * time.Second}
		for {
			select {
			case <-stop:
				return
			default:
			}
			req, _ := http.NewRequest("GET", url, nil)
			if host != "" {
				req.Host = host
			}
			res.send(c, req)
		}
	}
	clients := chaosSize(3, 8) // the fault suite's SIGTERM scenario
	for range clients {
		wg.Add(2)
		go load(&inRes, "http://"+in+"/", "")
		go load(&outRes, "http://"+out+"/", "up")
	}
	time.Sleep(500 * time.Millisecond) // steady load before the signal
	slow := make(chan error, 1)
	go func() {
		resp, err := http.Get("http://" + in + "/slow")
		if err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 || string(b) != "app" {
				err = errors.New("slow request: " + resp.Status + " " + string(b))
			}
		}
		slow <- err
	}()
	time.Sleep(100 * time.Millisecond) // the slow request is in flight
	okBefore := inRes.ok.Load() + outRes.ok.Load()
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if got := waitStatus(t, probe, "http://"+health+"/healthz/ready", 503, 2*time.Second); got > time.Second {
		t.Errorf("readiness went 503 %v after SIGTERM, want at once", got)
	}
	time.Sleep(1500 * time.Millisecond) // past the drain window; the slow request still runs
	if c, err := net.Dial("tcp", in); err == nil || !errors.Is(err, syscall.ECONNREFUSED) {
		if c != nil {
			c.Close()
		}
		t.Errorf("a new inbound connection after the drain window: %v, want connection refused", err)
	}
	if err := <-slow; err != nil {
		t.Errorf("the request in flight at SIGTERM: %v, want the app's answer", err)
	}
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("sidecar exited with %v, want 0\n%s", err, stderr.String())
		}
	case <-time.After(15 * time.Second):
		t.Fatalf("sidecar still running 15s after SIGTERM\n%s", stderr.String())
	}
	close(stop)
	wg.Wait()
	unaccepted := inRes.unaccepted.Load() + outRes.unaccepted.Load()
	chaosFigure(t, "SIGTERM", "inbound %d ok, %d refused, %d failed; outbound %d ok, %d refused, %d failed; %d reset in the accept queue as the listeners closed; %d served after SIGTERM; accepted lost %d",
		inRes.ok.Load(), inRes.refused.Load(), inRes.failed.Load(), outRes.ok.Load(), outRes.refused.Load(), outRes.failed.Load(),
		unaccepted, inRes.ok.Load()+outRes.ok.Load()-okBefore, inRes.failed.Load()+outRes.failed.Load())
	if max := int64(2 * clients); unaccepted > max {
		t.Errorf("%d requests reset before any answer on new connections, want at most %d (one a client, at the listeners' close)", unaccepted, max)
	}
	if n := inRes.failed.Load() + outRes.failed.Load(); n != 0 {
		t.Fatalf("%d accepted requests failed (first: %s %s), want 0\n%s", n, inRes.firstFailure, outRes.firstFailure, stderr.String())
	}
	if inRes.ok.Load()+outRes.ok.Load()-okBefore < 10 {
		t.Fatalf("only %d requests served after SIGTERM: the drain window did not keep serving", inRes.ok.Load()+outRes.ok.Load()-okBefore)
	}
}

// The app's readiness probe drives /healthz/ready, /app-health/readyz and
// the Consul check, which follows the app within one probe interval; a
// drain from the admin API deregisters the app, and /quitquitquit ends
// the sidecar cleanly.
func TestReadinessFollowsTheApp(t *testing.T) {
	var healthy atomic.Bool
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/health" && !healthy.Load() {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		io.WriteString(w, "app")
	}))
	defer app.Close()
	_, appPort, _ := net.SplitHostPort(strings.TrimPrefix(app.URL, "http://"))
	in := freePort(t)
	cs := startConsulSidecar(t, "--service", "orders", "--app-port", appPort, "--inbound-addr", in,
		"--readiness-probe", "http:/health,interval=100ms,failureThreshold=1", "--advertise-addr", "127.0.0.1")
	c := &http.Client{Timeout: 2 * time.Second}
	ready, appReady := "http://"+cs.health+"/healthz/ready", "http://"+cs.health+"/app-health/readyz"
	checkStatus := func() string {
		checks, _, err := cs.consul.Health().Checks("orders", nil)
		if err != nil || len(checks) == 0 {
			return "absent"
		}
		return checks[0].Status
	}
	until := func(what, want string, limit time.Duration) time.Duration {
		t.Helper()
		start := time.Now()
		for got := checkStatus(); got != want; got = checkStatus() {
			if time.Since(start) > limit {
				t.Fatalf("%s: Consul check %q after %v, want %q", what, got, limit, want)
			}
			time.Sleep(5 * time.Millisecond)
		}
		return time.Since(start)
	}

	waitStatus(t, c, "http://"+cs.health+"/healthz/sidecar", 200, 10*time.Second)
	if got := status(c, ready); got != 503 {
		t.Fatalf("/healthz/ready with the app failing its probe: %d, want 503", got)
	}
	until("app not ready yet", api.HealthCritical, 10*time.Second)

	healthy.Store(true)
	d := until("app became ready", api.HealthPassing, 5*time.Second)
	t.Logf("Consul check passing %v after the app became ready (probe interval 100ms)", d)
	if status(c, ready) != 200 || status(c, appReady) != 200 {
		t.Fatalf("app ready: /healthz/ready %d, /app-health/readyz %d; want 200, 200", status(c, ready), status(c, appReady))
	}
	if resp, err := c.Get("http://" + in + "/"); err != nil || resp.StatusCode != 200 {
		t.Fatalf("inbound to the app: %v %v, want 200", resp, err)
	} else {
		resp.Body.Close()
	}

	healthy.Store(false)
	d = until("app became unready", api.HealthCritical, 5*time.Second)
	t.Logf("Consul check critical %v after the app failed (probe interval 100ms)", d)
	if d > time.Second {
		t.Errorf("the Consul check followed the app after %v, want within about one probe interval", d)
	}
	if status(c, ready) != 503 || status(c, appReady) != 503 {
		t.Fatalf("app unready: /healthz/ready %d, /app-health/readyz %d; want 503, 503", status(c, ready), status(c, appReady))
	}

	healthy.Store(true)
	until("app ready again", api.HealthPassing, 5*time.Second)
	resp, err := c.Post("http://"+cs.adm+"/drain", "", nil)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("POST /drain: %v %v", resp, err)
	}
	resp.Body.Close()
	until("drained", "absent", 5*time.Second)
	if got := status(c, ready); got != 503 {
		t.Fatalf("/healthz/ready while draining: %d, want 503", got)
	}
	if resp, err := c.Get("http://" + in + "/"); err != nil || resp.StatusCode != 200 {
		t.Fatalf("inbound while draining: %v %v, want still served", resp, err)
	} else {
		resp.Body.Close()
	}
	resp, err = c.Post("http://"+cs.adm+"/quitquitquit", "", nil)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("POST /quitquitquit: %v %v", resp, err)
	}
	resp.Body.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for {
		conn, err := net.Dial("tcp", cs.out)
		if err != nil {
			break // the sidecar has stopped listening
		}
		conn.Close()
		if ctx.Err() != nil {
			t.Fatal("the sidecar still listens 10s after /quitquitquit")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Liveness and readiness probing wait for the startup probe to pass once,
// as the kubelet's do.
func TestStartupProbeGatesTheOthers(t *testing.T) {
	var started atomic.Bool
	var healthChecks atomic.Int64
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/started":
			if !started.Load() {
				w.WriteHeader(http.StatusServiceUnavailable)
			}
		case "/health":
			healthChecks.Add(1)
		}
	}))
	defer app.Close()
	_, appPort, _ := net.SplitHostPort(strings.TrimPrefix(app.URL, "http://"))
	rs := runSidecar(t, "", "--app-port", appPort, "--inbound-addr", freePort(t),
		"--startup-probe", "http:/started,interval=50ms", "--readiness-probe", "http:/health,interval=50ms")
	c := &http.Client{Timeout: 2 * time.Second}
	base := "http://" + rs.health
	waitStatus(t, c, base+"/healthz/sidecar", 200, 10*time.Second)
	time.Sleep(300 * time.Millisecond) // six startup probe intervals
	if n := healthChecks.Load(); n != 0 || status(c, base+"/app-health/startupz") != 503 || status(c, base+"/healthz/ready") != 503 {
		t.Fatalf("before startup passed: %d readiness probes, startupz %d, ready %d; want 0, 503, 503",
			n, status(c, base+"/app-health/startupz"), status(c, base+"/healthz/ready"))
	}
	if metricValue(t, rs.metrics, `sidecar_app_probe_passing{probe="startup"}`) != 0 || metricValue(t, rs.metrics, "sidecar_ready") != 0 {
		t.Fatal("before startup passed: sidecar_app_probe_passing{probe=startup} or sidecar_ready is not 0")
	}
	started.Store(true)
	waitStatus(t, c, base+"/healthz/ready", 200, 5*time.Second)
	if metricValue(t, rs.metrics, `sidecar_app_probe_passing{probe="readiness"}`) != 1 || metricValue(t, rs.metrics, "sidecar_ready") != 1 {
		t.Fatal("app ready: sidecar_app_probe_passing{probe=readiness} or sidecar_ready is not 1")
	}
	if healthChecks.Load() == 0 || status(c, base+"/app-health/startupz") != 200 {
		t.Fatalf("after startup passed: %d readiness probes, startupz %d", healthChecks.Load(), status(c, base+"/app-health/startupz"))
	}
}

// A gRPC call crosses both listeners of a sidecar, as it crosses two
// sidecars between pods: the app's client dials the outbound port with the
// service's authority, the outbound side routes it to the inbound port
// (the service's registered endpoint), and the inbound side hands it to
// the app's gRPC server. Health checks go the same way.
func TestGRPCThroughBothListeners(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	hs := health.NewServer()
	healthpb.RegisterHealthServer(srv, hs)
	go srv.Serve(ln)
	defer srv.Stop()
	_, appPort, _ := net.SplitHostPort(ln.Addr().String())
	in := freePort(t)
	rs := runSidecar(t, "", "--app-port", appPort, "--inbound-addr", in, "--static", "orders="+in,
		"--readiness-probe", "grpc,interval=100ms")
	cc, err := grpc.NewClient(rs.out, grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithAuthority("orders"))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health through outbound and inbound: %v %v, want SERVING", resp, err)
	}
	c := &http.Client{Timeout: 2 * time.Second}
	waitStatus(t, c, "http://"+rs.health+"/app-health/readyz", 200, 5*time.Second)
	hs.SetServingStatus("", healthpb.HealthCheckResponse_NOT_SERVING)
	waitStatus(t, c, "http://"+rs.health+"/app-health/readyz", 503, 5*time.Second)
}
