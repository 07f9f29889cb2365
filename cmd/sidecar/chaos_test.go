package main

// The fault suite. Each scenario runs a real sidecar (`sidecar run`
// in-process) against a real Consul agent, with real upstream processes
// (internal/cmd/faultorigin) as the instances of service "users", injects
// one fault under load, asserts its count and logs its figure as
// "chaos: <scenario>: <figure>". `make test` runs the short version of
// every scenario; `make chaos` sets CHAOS=long for the long one and prints
// the figures as a summary. Two scenarios live with the tests they grew
// from: TestPolicyReloadsUnderLoad (policies_test.go) and
// TestSIGTERMUnderLoad (lifecycle_test.go).

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/sidecar-mesh/sidecar/internal/toolbin"
)

// chaosLong reports whether the long versions run (CHAOS=long).
func chaosLong() bool { return os.Getenv("CHAOS") == "long" }

// chaosSize is short in `make test`, long in `make chaos`.
func chaosSize[T any](short, long T) T {
	if chaosLong() {
		return long
	}
	return short
}

// chaosFigure logs a scenario's figure in the suite's format.
func chaosFigure(t *testing.T, scenario, format string, args ...any) {
	t.Helper()
	mode := "short"
	if chaosLong() {
		mode = "long"
	}
	t.Logf("chaos: %s: %s (%s)", scenario, fmt.Sprintf(format, args...), mode)
}

// origin is a faultorigin process: a real upstream that fails on purpose.
type origin struct {
	cmd           *exec.Cmd
	addr, control string
	exited        chan struct{}
}

// startOrigin starts faultorigin with args; it is stopped when t ends.
func startOrigin(t *testing.T, args ...string) *origin {
	t.Helper()
	o := &origin{cmd: exec.Command(goBinary(t, "../../internal/cmd/faultorigin"), args...), exited: make(chan struct{})}
	stdout, err := o.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	o.cmd.Stderr = &stderr
	if err := o.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(stdout).ReadString('\n')
	go func() {
		_ = o.cmd.Wait()
		close(o.exited)
	}()
	t.Cleanup(func() {
		_ = o.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-o.exited:
		case <-time.After(5 * time.Second):
			_ = o.cmd.Process.Kill()
			<-o.exited
		}
	})
	if _, err := fmt.Sscanf(line, "listening %s control %s", &o.addr, &o.control); err != nil {
		t.Fatalf("faultorigin %v: first line %q (%v); stderr: %s", args, line, err, stderr.String())
	}
	return o
}

// kill ends the process at once, as a crash or an OOM kill does.
func (o *origin) kill() {
	_ = o.cmd.Process.Kill()
	<-o.exited
}

// originStats are a faultorigin's counts.
type originStats struct{ Requests, InFlight, Failed int64 }

func (o *origin) stats(t *testing.T) originStats {
	t.Helper()
	var st originStats
	if err := json.Unmarshal([]byte(fetch(t, "http://"+o.control+"/stats")), &st); err != nil {
		t.Fatalf("faultorigin stats: %v", err)
	}
	return st
}

// sumRequests is how many requests the origins have executed.
func sumRequests(t *testing.T, origins []*origin) (n int64) {
	for _, o := range origins {
		n += o.stats(t).Requests
	}
	return n
}

// chaosCluster is a scenario's world: a Consul agent, a sidecar against
// it, and upstream processes registered as instances of "users".
type chaosCluster struct {
	*consulSidecar
	origins []*origin
}

// startChaosCluster starts n origins (argsFor gives each one's flags),
// registers each at the address at gives it (its own, or a proxy in front
// of it), puts policy (if any) in Consul KV for "users", and waits until
// the sidecar routes to all n.
func startChaosCluster(t *testing.T, n int, argsFor func(i int) []string, at func(i int, o *origin) string, policy string) *chaosCluster {
	t.Helper()
	c := &chaosCluster{consulSidecar: startConsulSidecar(t)}
	for i := range n {
		o := startOrigin(t, argsFor(i)...)
		c.origins = append(c.origins, o)
		addr := o.addr
		if at != nil {
			addr = at(i, o)
		}
		c.registerAt(t, "users", "users-"+strconv.Itoa(i), addr, nil)
	}
	if policy != "" {
		index := strconv.FormatUint(putKV(t, c.consul, "users", policy), 10)
		eventually(t, "the users policy in force", func() (bool, string) {
			st := policyStatus(t, c.adm, "users")
			return st.Version == index, "version " + st.Version + ", want " + index
		})
	}
	eventually(t, "the sidecar routing to every instance", func() (bool, string) {
		c.call("users") // the first call starts the watch
		var eps struct {
			Services []struct {
				Service   string
				Endpoints []struct{ Addr string }
			}
		}
		_ = json.Unmarshal([]byte(fetch(t, "http://"+c.adm+"/endpoints")), &eps)
		for _, s := range eps.Services {
			if s.Service == "users" {
				return len(s.Endpoints) == n, strconv.Itoa(len(s.Endpoints)) + " endpoints"
			}
		}
		return false, "users unknown"
	})
	return c
}

// chaosLoad is an open-loop load on GET http://users/ through a sidecar:
// each request starts when it is due, however long earlier ones take, and
// its latency counts from then.
type chaosLoad struct {
	loadResult
	sent    atomic.Int64
	skipped atomic.Int64 // due while the generator was saturated
	mu      sync.Mutex   // guards lat
	lat     []time.Duration
	done    chan struct{}
}

// startLoad sends rate requests a second for d; wait for the end with wait.
func startLoad(out string, rate int, d time.Duration) *chaosLoad {
	l := &chaosLoad{done: make(chan struct{})}
	tr := &http.Transport{MaxIdleConnsPerHost: 512}
	client := &http.Client{Transport: tr, Timeout: 15 * time.Second}
	slots := make(chan struct{}, 512)
	go func() {
		defer close(l.done)
		defer tr.CloseIdleConnections()
		var inFlight sync.WaitGroup
		start := time.Now()
		interval := time.Second / time.Duration(rate)
		for i := 0; ; i++ {
			due := start.Add(time.Duration(i) * interval)
			if due.Sub(start) >= d {
				break
			}
			if wait := time.Until(due); wait > 0 {
				time.Sleep(wait) // the generator's own pacing
			}
			select {
			case slots <- struct{}{}:
			default:
				l.skipped.Add(1)
				continue
			}
			l.sent.Add(1)
			inFlight.Add(1)
			go func() {
				defer inFlight.Done()
				defer func() { <-slots }()
				req, _ := http.NewRequest("GET", "http://"+out+"/", nil)
				req.Host = "users"
				l.send(client, req)
				l.mu.Lock()
				l.lat = append(l.lat, time.Since(due))
				l.mu.Unlock()
			}()
		}
		inFlight.Wait()
	}()
	return l
}

func (l *chaosLoad) wait() { <-l.done }

// lost is how many requests failed or were refused.
func (l *chaosLoad) lost() int64 { return l.failed.Load() + l.refused.Load() + l.unaccepted.Load() }

// percentile of the latencies, q in [0, 1].
func (l *chaosLoad) percentile(q float64) time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.lat) == 0 {
		return 0
	}
	s := slices.Clone(l.lat)
	slices.Sort(s)
	return s[min(len(s)-1, int(math.Ceil(q*float64(len(s))))-1)]
}

// checkGenerator fails the test when the generator itself fell behind.
func (l *chaosLoad) checkGenerator(t *testing.T) {
	t.Helper()
	if n := l.skipped.Load(); n > 0 {
		t.Fatalf("the load generator skipped %d requests (512 in flight): the figures would not be open loop", n)
	}
}

// metricSum adds up the samples of metric whose labels contain every one
// of labels.
func metricSum(t *testing.T, metrics, metric string, labels ...string) (sum float64) {
	t.Helper()
	for _, line := range strings.Split(fetch(t, "http://"+metrics+"/metrics"), "\n") {
		if !strings.HasPrefix(line, metric+"{") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 || !containsAll(line[:i], labels) {
			continue
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("metric line %q: %v", line, err)
		}
		sum += v
	}
	return sum
}

func containsAll(s string, subs []string) bool {
	for _, sub := range subs {
		if !strings.Contains(s, sub) {
			return false
		}
	}
	return true
}

func plainOrigin(int) []string { return nil }

// An instance killed (SIGKILL) under load: its requests in flight are
// reset and retried on the others, new ones are refused and retried,
// then it is ejected. Idempotent requests lost: 0.
func TestChaosInstanceKilled(t *testing.T) {
	c := startChaosCluster(t, 3, func(int) []string { return []string{"-latency", "20ms"} }, nil, "")
	rate, d := chaosSize(200, 500), chaosSize(3*time.Second, 30*time.Second)
	l := startLoad(c.out, rate, d)
	time.Sleep(d / 3) // steady load before the kill
	inFlight := c.origins[0].stats(t).InFlight
	c.origins[0].kill()
	l.wait()
	l.checkGenerator(t)
	retries := metricSum(t, c.metrics, "sidecar_retries_total", `service="users"`)
	// A GET cut off on a pooled connection may be sent again by the
	// transport itself on a new connection: refused, it is a
	// connect-failure retry.
	var reasons []string
	for _, r := range []string{"reset", "connect-failure"} {
		n := metricSum(t, c.metrics, "sidecar_retries_total", `service="users"`, `reason="`+r+`"`)
		reasons = append(reasons, fmt.Sprintf("%.0f %s", n, r))
	}
	chaosFigure(t, "instance killed", "%d GETs at %d/s, one of 3 instances SIGKILLed at %v with %d in flight: lost %d, %.0f retries (%s), p99 %v",
		l.sent.Load(), rate, d/3, inFlight, l.lost(), retries, strings.Join(reasons, ", "), l.percentile(0.99).Round(time.Millisecond))
	if n := l.lost(); n != 0 {
		t.Fatalf("%d of %d GETs lost when an instance was killed, want 0 (first: %s)", n, l.sent.Load(), l.firstFailure)
	}
	if retries == 0 {
		t.Fatal("no retry after an instance was killed under load: the fault was not exercised")
	}
}

// One of three instances answers 503 to half its calls for the whole run
// (outlier ejection off, so retries alone carry it): success stays at
// 99.9% or more. The long run also shows the default policy, which ejects
// the instance.
func TestChaosFlakyInstance(t *testing.T) {
	const noEjection = "outlierDetection: {consecutiveFailures: 100000}\n"
	c := startChaosCluster(t, 3, func(i int) []string {
		if i == 0 {
			return []string{"-error-ratio", "0.5"}
		}
		return nil
	}, nil, noEjection)
	run := func(label string) {
		t.Helper()
		base, flakyBase := sumRequests(t, c.origins), c.origins[0].stats(t)
		rate, d := chaosSize(300, 500), chaosSize(5*time.Second, 60*time.Second)
		l := startLoad(c.out, rate, d)
		l.wait()
		l.checkGenerator(t)
		sent, ok := l.sent.Load(), l.ok.Load()
		attempts := sumRequests(t, c.origins) - base
		flaky := c.origins[0].stats(t)
		share := 100 * float64(ok) / float64(sent)
		chaosFigure(t, "flaky instance", "%s: %d GETs at %d/s, one of 3 instances failing 50%% (%d of its %d answers were 503): %.2f%% succeeded (%d lost), %.3f attempts a request",
			label, sent, rate, flaky.Failed-flakyBase.Failed, flaky.Requests-flakyBase.Requests, share, sent-ok, float64(attempts)/float64(sent))
		if ok*1000 < sent*999 {
			t.Errorf("%s: %d of %d GETs succeeded (%.2f%%), want at least 99.9%% (first failure: %s)", label, ok, sent, share, l.firstFailure)
		}
	}
	run("retries, no ejection")
	if chaosLong() {
		putKV(t, c.consul, "users", "service: users\n")
		eventually(t, "the default policy in force", func() (bool, string) {
			st := policyStatus(t, c.adm, "users")
			return *st.Effective.OutlierDetection.ConsecutiveFailures == 5, "outlierDetection.consecutiveFailures " + strconv.Itoa(*st.Effective.OutlierDetection.ConsecutiveFailures)
		})
		run("default policy (ejection on)")
	}
}

// toxiproxy is a toxiproxy-server process, driven through its HTTP API.
type toxiproxy struct{ api string }

func startToxiproxy(t *testing.T) *toxiproxy {
	t.Helper()
	bin := toolbin.Path(t, "toxiproxy-server")
	api := freePort(t)
	host, port, _ := strings.Cut(api, ":")
	cmd := exec.Command(bin, "-host", host, "-port", port)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(exited)
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
	})
	waitStatus(t, &http.Client{Timeout: time.Second}, "http://"+api+"/version", 200, 10*time.Second)
	return &toxiproxy{api: api}
}

// call sends one API call and returns the body; want is the status
// expected.
func (x *toxiproxy) call(method, path, body string, want int) ([]byte, error) {
	req, _ := http.NewRequest(method, "http://"+x.api+path, strings.NewReader(body))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("toxiproxy %s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != want {
		return b, fmt.Errorf("toxiproxy %s %s: %d %s, want %d", method, path, resp.StatusCode, b, want)
	}
	return b, nil
}

// proxy puts a proxy named name in front of upstream and returns its
// listening address.
func (x *toxiproxy) proxy(t *testing.T, name, upstream string) string {
	t.Helper()
	var p struct{ Listen string }
	b, err := x.call("POST", "/proxies", `{"name":"`+name+`","listen":"127.0.0.1:0","upstream":"`+upstream+`","enabled":true}`, http.StatusCreated)
	if err == nil {
		err = json.Unmarshal(b, &p)
	}
	if err != nil || p.Listen == "" {
		t.Fatalf("toxiproxy proxy %s: %s (%v)", name, b, err)
	}
	return p.Listen
}

// spikes adds a latency spike to one proxy after another (each for on,
// then off for off) until stop is closed; it returns how many it made.
func (x *toxiproxy) spikes(t *testing.T, names []string, latency, on, off time.Duration, stop <-chan struct{}) <-chan int {
	made := make(chan int, 1)
	go func() {
		n := 0
		defer func() { made <- n }()
		toxic := fmt.Sprintf(`{"name":"spike","type":"latency","stream":"downstream","toxicity":1,"attributes":{"latency":%d}}`, latency.Milliseconds())
		for i := 0; ; i++ {
			name := names[i%len(names)]
			if _, err := x.call("POST", "/proxies/"+name+"/toxics", toxic, http.StatusOK); err != nil {
				t.Error(err)
				return
			}
			n++
			select {
			case <-time.After(on):
			case <-stop:
			}
			if _, err := x.call("DELETE", "/proxies/"+name+"/toxics/spike", "", http.StatusNoContent); err != nil {
				t.Error(err)
				return
			}
			select {
			case <-time.After(off):
			case <-stop:
				return
			}
		}
	}()
	return made
}

// Latency spikes through toxiproxy: one instance after another answers a
// second late (a 1 s latency toxic, held 1 s, then 0.5 s without). A
// 100 ms per-try timeout cuts the slow attempts and retries them
// elsewhere: success stays at 99.9% or more and p99 far below the spike.
func TestChaosLatencySpikes(t *testing.T) {
	tp := startToxiproxy(t)
	names := []string{"users-0", "users-1", "users-2"}
	const perTry = "retry: {attempts: 3, perTryTimeout: 100ms, on: [timeout, connect-failure, reset, 503], backoff: {base: 5ms, max: 20ms}, budget: {ratio: 0.5, minPerSecond: 50}}\n"
	const keep = "timeout: 5s\noutlierDetection: {consecutiveFailures: 100000}\n" // the spiking instance stays in rotation
	c := startChaosCluster(t, 3, plainOrigin, func(i int, o *origin) string { return tp.proxy(t, names[i], o.addr) }, keep+perTry)
	run := func(label string) *chaosLoad {
		rate, d := chaosSize(100, 300), chaosSize(4*time.Second, 30*time.Second)
		stop := make(chan struct{})
		made := tp.spikes(t, names, time.Second, time.Second, 500*time.Millisecond, stop)
		l := startLoad(c.out, rate, d)
		l.wait()
		close(stop)
		spikes := <-made
		l.checkGenerator(t)
		sent, ok := l.sent.Load(), l.ok.Load()
		chaosFigure(t, "latency spikes", "%s: %d GETs at %d/s, %d spikes of 1s: %.2f%% succeeded, p50 %v, p99 %v, max %v",
			label, sent, rate, spikes, 100*float64(ok)/float64(sent), l.percentile(0.5).Round(time.Millisecond),
			l.percentile(0.99).Round(time.Millisecond), l.percentile(1).Round(time.Millisecond))
		return l
	}
	l := run("perTryTimeout 100ms")
	if sent, ok := l.sent.Load(), l.ok.Load(); ok*1000 < sent*999 {
		t.Errorf("%d of %d GETs succeeded under latency spikes, want at least 99.9%% (first failure: %s)", ok, sent, l.firstFailure)
	}
	if p99 := l.percentile(0.99); p99 > 500*time.Millisecond {
		t.Errorf("p99 %v under 1s spikes with a 100ms per-try timeout, want under 500ms", p99)
	}
	if chaosLong() { // the same spikes without a per-try timeout, for comparison
		putKV(t, c.consul, "users", keep+"retry: {perTryTimeout: 0s}\n")
		eventually(t, "the per-try timeout removed", func() (bool, string) {
			st := policyStatus(t, c.adm, "users")
			return st.Effective.Retry.PerTryTimeout.D() == 0, st.Effective.Retry.PerTryTimeout.String()
		})
		run("no perTryTimeout")
	}
}

// Consul stopped under load: the sidecar routes on the last endpoints it
// knew, however long the outage. Lost: 0.
func TestChaosConsulDown(t *testing.T) {
	c := startChaosCluster(t, 3, plainOrigin, nil, "")
	c.agent.Stop()
	rate, d := 500, chaosSize(5*time.Second, 60*time.Second)
	l := startLoad(c.out, rate, d)
	l.wait()
	l.checkGenerator(t)
	age := c.staleness(t, "users")
	chaosFigure(t, "consul down", "%d GETs at %d/s through a %v Consul outage: lost %d, p99 %v, endpoints %.0fs stale at the end",
		l.sent.Load(), rate, d, l.lost(), l.percentile(0.99).Round(time.Millisecond), age)
	if n := l.lost(); n != 0 {
		t.Fatalf("%d of %d GETs lost while Consul was down, want 0 (first: %s)", n, l.sent.Load(), l.firstFailure)
	}
	if age < d.Seconds()/2 {
		t.Fatalf("discovery staleness %.1fs after a %v outage: the outage was not seen", age, d)
	}
}

// Every instance answering 503, breaker and ejection off: the retry
// budget alone keeps upstream attempts per request at most 1.2 plus the
// budget's floor (minPerSecond in each second the run spans).
func TestChaosAllDown(t *testing.T) {
	c := startChaosCluster(t, 3, func(int) []string { return []string{"-error-ratio", "1"} }, nil,
		"retry: {attempts: 3, backoff: {base: 1ms, max: 2ms}, budget: {ratio: 0.2, minPerSecond: 10}}\n"+
			"circuitBreaker: {consecutiveFailures: 100000, minRequests: 1000000}\noutlierDetection: {consecutiveFailures: 100000}\n")
	base := sumRequests(t, c.origins) // the warm-up's attempts
	rate, d := 100, chaosSize(4*time.Second, 30*time.Second)
	l := startLoad(c.out, rate, d)
	l.wait()
	l.checkGenerator(t)
	requests, attempts := l.sent.Load(), sumRequests(t, c.origins)-base
	floor := int64(10 * (d.Seconds() + 1)) // a run starts within a second
	// The ratio counts the requests of the last 10 s, the warm-up's too
	// (at most base); rounding takes one more in each of two windows.
	limit := requests + (requests+base)/5 + 2 + floor
	chaosFigure(t, "all instances down", "%d GETs at %d/s, every instance 503: %d attempts, %.3f a request (bound %.3f: 1.2 + %d floor retries)",
		requests, rate, attempts, float64(attempts)/float64(requests), float64(limit)/float64(requests), floor)
	if l.ok.Load() != 0 {
		t.Fatalf("%d requests succeeded with every instance down", l.ok.Load())
	}
	if attempts > limit {
		t.Fatalf("%d attempts for %d requests, want at most %d: retries multiplied the load", attempts, requests, limit)
	}
}
