package inbound_test

import (
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/sidecar-mesh/sidecar/pkg/inbound"
)

// probeRun is a started Prober; every probe's result arrives on results,
// with the time it ended, and every transition is appended to changes.
//
// The tests whose probes wait for time run the prober in a testing/synctest
// bubble, where the initial delay, the intervals and the timeouts are
// virtual. The bubble's clock moves only while every goroutine in it waits
// on something of the bubble's, never during I/O on a real socket: a probe
// of an app outside the bubble, on loopback, takes no virtual time, and
// one due after an interval comes exactly one interval after the previous
// one. An app that must hold a probe while virtual time passes is served
// in memory, in the bubble (startMemApp).
type probeRun struct {
	p        *inbound.Prober
	interval time.Duration
	results  chan probeResult
	last     time.Time // when the previous probe's result came (Start before the first)

	mu      sync.Mutex // guards changes
	changes []bool
}

// probeResult is one probe's error (nil: passed) and when it ended.
type probeResult struct {
	err error
	at  time.Time
}

func startProber(t *testing.T, addr string, probe inbound.Probe, initiallyOK bool) *probeRun {
	t.Helper()
	return startProberWith(t, inbound.ProberConfig{AppAddr: addr, Probe: probe, InitiallyOK: initiallyOK})
}

// startProberWith starts a prober named readiness with cfg, whose OnChange
// and OnResult it sets.
func startProberWith(t *testing.T, cfg inbound.ProberConfig) *probeRun {
	t.Helper()
	r := &probeRun{interval: cfg.Probe.WithDefaults().Interval, results: make(chan probeResult, 64)}
	cfg.Name = "readiness"
	cfg.OnChange = func(ok bool) {
		r.mu.Lock()
		r.changes = append(r.changes, ok)
		r.mu.Unlock()
	}
	cfg.OnResult = func(err error) { r.results <- probeResult{err, time.Now()} }
	p, err := inbound.NewProber(cfg)
	if err != nil {
		t.Fatalf("NewProber: %v", err)
	}
	r.p = p
	r.last = time.Now()
	p.Start()
	t.Cleanup(p.Stop)
	return r
}

// take waits for the next probe's result and returns how long after the
// previous one (after Start for the first) it came, and its error.
func (r *probeRun) take(t *testing.T, what string) (time.Duration, error) {
	t.Helper()
	res := within(t, r.results, what)
	after := res.at.Sub(r.last)
	r.last = res.at
	return after, res.err
}

// first waits for the probe that runs at Start (no initial delay): it ends
// before an interval has passed, in a bubble or not.
func (r *probeRun) first(t *testing.T) error {
	t.Helper()
	after, err := r.take(t, "first probe result")
	if after >= r.interval {
		t.Fatalf("the first probe ended %v after Start, want it at Start (the interval is %v)", after, r.interval)
	}
	return err
}

// after waits for the next probe's result, which must come exactly want
// after the previous one (after Start for the first). In a bubble only:
// elsewhere a probe takes time too.
func (r *probeRun) after(t *testing.T, what string, want time.Duration) error {
	t.Helper()
	got, err := r.take(t, what)
	if got != want {
		t.Fatalf("%s came %v after the previous one (or Start), want %v", what, got, want)
	}
	return err
}

// afterDelay waits for the first probe's result, due when the initial
// delay ends.
func (r *probeRun) afterDelay(t *testing.T, delay time.Duration) error {
	t.Helper()
	return r.after(t, "the probe after the initial delay", delay)
}

// next waits for the result of the probe due one interval after the
// previous one.
func (r *probeRun) next(t *testing.T) error {
	t.Helper()
	return r.after(t, "the next probe", r.interval)
}

// expect checks the state after thresholds and the transitions so far.
func (r *probeRun) expect(t *testing.T, step string, ok bool, changes ...bool) {
	t.Helper()
	if got := r.p.OK(); got != ok {
		t.Fatalf("%s: OK() = %v, want %v (state %+v)", step, got, ok, r.p.State())
	}
	if (r.p.Err() == nil) != ok {
		t.Fatalf("%s: Err() = %v while OK() = %v", step, r.p.Err(), ok)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if !slices.Equal(r.changes, changes) {
		t.Fatalf("%s: OnChange calls %v, want %v", step, r.changes, changes)
	}
}

func TestHTTPProbeThresholds(t *testing.T) {
	var code atomic.Int64
	code.Store(200)
	var paths sync.Map
	app := startApp(t, func(w http.ResponseWriter, r *http.Request) {
		paths.Store(r.URL.RequestURI()+" "+r.Header.Get("User-Agent"), true)
		w.WriteHeader(int(code.Load()))
	})
	synctest.Test(t, func(t *testing.T) {
		run := startProber(t, app.addr(), inbound.Probe{
			HTTP:             &inbound.HTTPProbe{Path: "/health?full=1"},
			FailureThreshold: 3,
			SuccessThreshold: 2,
		}, false)

		if err := run.first(t); err != nil {
			t.Fatalf("probe 1 against a healthy app: %v", err)
		}
		run.expect(t, "1 success of 2 needed", false)
		if err := run.p.Err(); err == nil || !strings.Contains(err.Error(), "1 of 2") {
			t.Fatalf("Err() = %v, want it to say 1 of 2 successes", err)
		}
		run.next(t)
		run.expect(t, "2 successes", true, true)

		code.Store(503)
		for i := 1; i <= 2; i++ {
			if err := run.next(t); err == nil || !strings.Contains(err.Error(), "status 503") {
				t.Fatalf("probe against an app answering 503: err %v, want one naming status 503", err)
			}
			run.expect(t, strconv.Itoa(i)+" failures of 3", true, true)
		}
		run.next(t)
		run.expect(t, "3 failures", false, true, false)
		if err := run.p.Err(); err == nil || !strings.Contains(err.Error(), "status 503") {
			t.Fatalf("Err() = %v, want the last failure", err)
		}
		run.next(t)
		run.expect(t, "4 failures", false, true, false)

		code.Store(204)
		run.next(t)
		run.expect(t, "1 success after failing", false, true, false)
		run.next(t)
		run.expect(t, "2 successes after failing", true, true, false, true)

		if s := run.p.State(); s.Probes != 8 || s.ConsecutiveSuccesses != 2 || !s.LastProbe.Equal(run.last) {
			t.Fatalf("State() = %+v, want 8 probes, 2 successes in a row and the last probe at %v", s, run.last)
		}
	})
	if _, ok := paths.Load("/health?full=1 sidecar-probe/1"); !ok {
		t.Fatalf("the app never saw GET /health?full=1 from sidecar-probe/1")
	}
}

func TestHTTPProbeStatusRangeHeadersAndPort(t *testing.T) {
	var code atomic.Int64
	var host, probeHeader atomic.Value
	app := startApp(t, func(w http.ResponseWriter, r *http.Request) {
		host.Store(r.Host)
		probeHeader.Store(r.Header.Get("X-Probe"))
		w.WriteHeader(int(code.Load()))
	})
	_, port, _ := net.SplitHostPort(app.addr())
	portNum, _ := strconv.Atoi(port)

	for _, tc := range []struct {
		name     string
		min, max int
		pass     []int
		fail     []int
	}{
		{"default 200-399", 0, 0, []int{200, 302, 399}, []int{400, 404, 500}},
		{"204 only", 204, 204, []int{204}, []int{200, 302}},
		{"max 299, min by default", 0, 299, []int{200, 299}, []int{302, 404}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				code.Store(int64(tc.pass[0]))
				run := startProber(t, closedAddr(t), inbound.Probe{
					HTTP: &inbound.HTTPProbe{
						Headers:   http.Header{"Host": {"orders.internal"}, "X-Probe": {"yes"}},
						StatusMin: tc.min, StatusMax: tc.max,
					},
					Port:             portNum, // the app address's port is closed: only the override reaches the app
					FailureThreshold: 1,
				}, false)
				if err := run.first(t); err != nil {
					t.Fatalf("status %d: %v, want a pass", tc.pass[0], err)
				}
				for _, c := range tc.pass[1:] {
					code.Store(int64(c))
					if err := run.next(t); err != nil {
						t.Errorf("status %d: %v, want a pass", c, err)
					}
				}
				for _, c := range tc.fail {
					code.Store(int64(c))
					if err := run.next(t); err == nil {
						t.Errorf("status %d passed, want a failure", c)
					}
				}
			})
		})
	}
	if host.Load() != "orders.internal" || probeHeader.Load() != "yes" {
		t.Fatalf("app saw Host %v and X-Probe %v, want orders.internal and yes", host.Load(), probeHeader.Load())
	}
}

// The app holds the probe's request until the probe gives up: it is served
// in memory, in the bubble, so that the timeout's virtual 50 ms pass.
func TestHTTPProbeTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		app := startMemApp(t, func(w http.ResponseWriter, r *http.Request) { <-r.Context().Done() })
		run := startProberWith(t, inbound.ProberConfig{
			AppAddr:     "127.0.0.1:8080",
			DialContext: app.Dial,
			Probe:       inbound.Probe{HTTP: &inbound.HTTPProbe{}, Timeout: 50 * time.Millisecond, FailureThreshold: 1},
			InitiallyOK: true,
		})
		err := run.after(t, "the probe of an app that never answers", 50*time.Millisecond)
		if err == nil || !strings.Contains(err.Error(), "no answer within 50ms") {
			t.Fatalf("probe of an app that never answers: %v, want a timeout", err)
		}
		run.expect(t, "timed out", false, false)
		if n := app.dials.Load(); n != 1 {
			t.Fatalf("the probe dialed the app %d times through DialContext, want 1", n)
		}
	})
}

func TestTCPProbe(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		run := startProber(t, addr, inbound.Probe{TCP: true, FailureThreshold: 1}, false)
		if err := run.first(t); err != nil {
			t.Fatalf("TCP probe of a listening port: %v", err)
		}
		run.expect(t, "listening", true, true)

		ln.Close()
		if err := run.next(t); err == nil || !strings.Contains(err.Error(), "refused") {
			t.Fatalf("TCP probe of a closed port: %v, want connection refused", err)
		}
		run.expect(t, "closed", false, true, false)

		ln, err = net.Listen("tcp", addr)
		if err != nil {
			t.Fatalf("listening again on %s: %v", addr, err)
		}
		defer ln.Close()
		if err := run.next(t); err != nil {
			t.Fatalf("TCP probe of the port listening again: %v", err)
		}
		run.expect(t, "listening again", true, true, false, true)
	})
}

// startGRPCApp serves a real grpc-go server with the standard health
// service on ln until stop or the end of the test. A server in a synctest
// bubble must be stopped in it, one outside outside it: Stop waits on a
// sync.Cond its connections' goroutines signal.
func startGRPCApp(t *testing.T, ln net.Listener) (hs *health.Server, stop func()) {
	t.Helper()
	srv := grpc.NewServer()
	hs = health.NewServer()
	healthpb.RegisterHealthServer(srv, hs)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(ln)
	}()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			srv.Stop()
			<-done
		})
	}
	t.Cleanup(stop)
	return hs, stop
}

// The app is served in memory, in the bubble, to be stopped there
// (TestGRPCProbeErrors probes over loopback).
func TestGRPCProbe(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		app := newMemListener()
		hs, stop := startGRPCApp(t, app)
		hs.SetServingStatus("orders", healthpb.HealthCheckResponse_SERVING)
		run := startProberWith(t, inbound.ProberConfig{AppAddr: "127.0.0.1:8080", DialContext: app.Dial,
			Probe: inbound.Probe{GRPC: &inbound.GRPCProbe{Service: "orders"}, FailureThreshold: 2}})

		if err := run.first(t); err != nil {
			t.Fatalf("gRPC probe of a SERVING service: %v", err)
		}
		run.expect(t, "SERVING", true, true)

		hs.SetServingStatus("orders", healthpb.HealthCheckResponse_NOT_SERVING)
		if err := run.next(t); err == nil || !strings.Contains(err.Error(), "NOT_SERVING") {
			t.Fatalf("gRPC probe of a NOT_SERVING service: %v, want an error naming NOT_SERVING", err)
		}
		run.expect(t, "NOT_SERVING once", true, true)
		run.next(t)
		run.expect(t, "NOT_SERVING twice", false, true, false)

		hs.SetServingStatus("orders", healthpb.HealthCheckResponse_SERVING)
		run.next(t)
		run.expect(t, "SERVING again", true, true, false, true)

		stop()
		if err := run.next(t); err == nil {
			t.Fatalf("gRPC probe of a stopped server passed")
		}
		run.next(t)
		run.expect(t, "server stopped", false, true, false, true, false)
	})
}

// Each kind of probe connects through ProberConfig.DialContext when it is
// set: here to apps served in memory.
func TestProbesDialThroughDialContext(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		httpApp := startMemApp(t, func(w http.ResponseWriter, r *http.Request) {})
		grpcApp := newMemListener()
		startGRPCApp(t, grpcApp)

		for _, tc := range []struct {
			probe inbound.Probe
			app   *memListener
		}{
			{inbound.Probe{HTTP: &inbound.HTTPProbe{}}, httpApp},
			{inbound.Probe{TCP: true}, httpApp},
			{inbound.Probe{GRPC: &inbound.GRPCProbe{}}, grpcApp},
		} {
			before := tc.app.dials.Load()
			run := startProberWith(t, inbound.ProberConfig{AppAddr: "127.0.0.1:8080", DialContext: tc.app.Dial, Probe: tc.probe})
			if err := run.first(t); err != nil {
				t.Errorf("%+v probe of an app in memory: %v, want a pass", tc.probe, err)
			}
			if n := tc.app.dials.Load() - before; n != 1 {
				t.Errorf("%+v probe: %d dials through DialContext, want 1", tc.probe, n)
			}
			run.p.Stop()
		}
	})
}

func TestGRPCProbeErrors(t *testing.T) {
	app, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	startGRPCApp(t, app)
	addr := app.Addr().String()
	noHealth := grpc.NewServer()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = noHealth.Serve(ln)
	}()
	t.Cleanup(func() { noHealth.Stop(); <-served })

	for _, tc := range []struct {
		name, addr, service, want string
	}{
		{"unknown service", addr, "nope", "does not know"},
		{"no health service", ln.Addr().String(), "", "does not serve grpc.health.v1.Health"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			run := startProber(t, tc.addr, inbound.Probe{GRPC: &inbound.GRPCProbe{Service: tc.service}}, false)
			if err := run.first(t); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error saying %q", err, tc.want)
			}
		})
	}
	// The empty name asks about the server as a whole, SERVING by default.
	run := startProber(t, addr, inbound.Probe{GRPC: &inbound.GRPCProbe{}}, false)
	if err := run.first(t); err != nil {
		t.Fatalf("gRPC probe of the whole server: %v", err)
	}
}

func TestInitialDelay(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		run := startProber(t, ln.Addr().String(), inbound.Probe{TCP: true, InitialDelay: 5 * time.Second}, false)
		time.Sleep(5*time.Second - time.Millisecond) // virtual
		select {
		case res := <-run.results:
			t.Fatalf("a probe ran before the initial delay ended (%v)", res.err)
		default:
		}
		if s := run.p.State(); s.Probes != 0 || s.OK {
			t.Fatalf("State() before the initial delay = %+v, want no probes and not OK", s)
		}
		if err := run.p.Err(); err == nil || !strings.Contains(err.Error(), "no result yet") {
			t.Fatalf("Err() before the first probe = %v, want 'no result yet'", err)
		}
		if err := run.afterDelay(t, 5*time.Second); err != nil {
			t.Fatalf("first probe after the delay: %v", err)
		}
		run.expect(t, "after the delay", true, true)
	})
}

func TestStopMidProbeRecordsNothing(t *testing.T) {
	arrived := make(chan struct{}, 1)
	app := startApp(t, func(w http.ResponseWriter, r *http.Request) {
		arrived <- struct{}{}
		<-r.Context().Done()
	})
	run := startProber(t, app.addr(), inbound.Probe{HTTP: &inbound.HTTPProbe{}, Timeout: time.Minute}, true)
	within(t, arrived, "probe at the app")
	run.p.Stop()
	run.p.Stop()
	run.p.Start() // after Stop: nothing
	if s := run.p.State(); s.Probes != 0 || !s.OK {
		t.Fatalf("State() after Stop during the first probe = %+v, want no probes recorded and still OK", s)
	}
	run.expect(t, "stopped", true)
}

func TestNilProber(t *testing.T) {
	var p *inbound.Prober
	if !p.OK() || p.Err() != nil || !p.State().OK {
		t.Fatalf("nil Prober: OK %v Err %v State %+v, want passing", p.OK(), p.Err(), p.State())
	}
}

func TestProbeValidation(t *testing.T) {
	for _, tc := range []struct {
		name  string
		probe inbound.Probe
		want  string
	}{
		{"no kind", inbound.Probe{}, "exactly one"},
		{"two kinds", inbound.Probe{TCP: true, GRPC: &inbound.GRPCProbe{}}, "exactly one"},
		{"port", inbound.Probe{TCP: true, Port: 70000}, "port"},
		{"negative interval", inbound.Probe{TCP: true, Interval: -time.Second}, "interval"},
		{"negative threshold", inbound.Probe{TCP: true, FailureThreshold: -1}, "failureThreshold"},
		{"relative path", inbound.Probe{HTTP: &inbound.HTTPProbe{Path: "health"}}, "http.path"},
		{"status range", inbound.Probe{HTTP: &inbound.HTTPProbe{StatusMin: 400, StatusMax: 300}}, "status range"},
		{"status min over the default max", inbound.Probe{HTTP: &inbound.HTTPProbe{StatusMin: 400}}, "400-399"},
		{"status out of HTTP", inbound.Probe{HTTP: &inbound.HTTPProbe{StatusMax: 600}}, "status range"},
		{"header", inbound.Probe{HTTP: &inbound.HTTPProbe{Headers: http.Header{"Bad Name": {"x"}}}}, "http.headers"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := inbound.NewProber(inbound.ProberConfig{Name: "liveness", Probe: tc.probe, AppAddr: "127.0.0.1:8080"})
			if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.HasPrefix(err.Error(), "liveness probe: ") {
				t.Fatalf("NewProber: %v, want an error about %s", err, tc.want)
			}
		})
	}
	if _, err := inbound.NewProber(inbound.ProberConfig{Probe: inbound.Probe{TCP: true}, AppAddr: "nowhere"}); err == nil {
		t.Fatalf("NewProber with AppAddr %q: nil error", "nowhere")
	}
	d := inbound.Probe{HTTP: &inbound.HTTPProbe{}}.WithDefaults()
	if d.Interval != time.Second || d.Timeout != time.Second || d.FailureThreshold != 3 || d.SuccessThreshold != 1 ||
		d.HTTP.Path != "/" || d.HTTP.StatusMin != 200 || d.HTTP.StatusMax != 399 {
		t.Fatalf("defaults: %+v %+v", d, *d.HTTP)
	}
}
