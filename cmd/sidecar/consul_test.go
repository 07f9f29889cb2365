package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/sidecar-mesh/sidecar/internal/consultest"
)

// consulSidecar is a real sidecar (in-process `sidecar run`) against a real
// Consul agent.
type consulSidecar struct {
	agent    *consultest.Agent
	consul   *api.Client
	out, adm string
	metrics  string
	health   string
	client   *http.Client
}

func startConsulSidecar(t *testing.T, extraArgs ...string) *consulSidecar {
	t.Helper()
	cs := &consulSidecar{agent: consultest.Start(t), client: &http.Client{Timeout: 5 * time.Second}}
	cc := api.DefaultConfig()
	cc.Address = cs.agent.Addr()
	var err error
	if cs.consul, err = api.NewClient(cc); err != nil {
		t.Fatal(err)
	}
	cs.out, cs.adm, cs.metrics, cs.health = freePort(t), freePort(t), freePort(t), freePort(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	// Every instance here is on 127.0.0.1, which a sidecar in production
	// drops (TestConsulDropsLoopbackEndpoints).
	args := append([]string{"run", "--outbound-addr", cs.out, "--admin-addr", cs.adm, "--metrics-addr", cs.metrics, "--health-addr", cs.health, "--drain-window", "1ms",
		"--log-level", "error", "--consul-allow-loopback-endpoints=true"}, extraArgs...)
	go func() {
		_, _, err := cli(t, ctx, map[string]string{"CONSUL_HTTP_ADDR": cs.agent.Addr(), "POD_IP": "10.1.2.3"}, args...)
		done <- err
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("sidecar run: %v", err)
		}
	})
	return cs
}

// instance is a real upstream that answers with its own name.
func instance(t *testing.T, name string) (host string, port int) {
	t.Helper()
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, name) }))
	t.Cleanup(up.Close)
	h, p, _ := net.SplitHostPort(strings.TrimPrefix(up.URL, "http://"))
	port, _ = strconv.Atoi(p)
	return h, port
}

func (cs *consulSidecar) register(t *testing.T, service, id string, check *api.AgentServiceCheck) {
	t.Helper()
	host, port := instance(t, id)
	cs.registerAt(t, service, id, net.JoinHostPort(host, strconv.Itoa(port)), check)
}

// registerAt registers an instance of service at addr (host:port).
func (cs *consulSidecar) registerAt(t *testing.T, service, id, addr string, check *api.AgentServiceCheck) {
	t.Helper()
	host, p, _ := net.SplitHostPort(addr)
	port, _ := strconv.Atoi(p)
	if err := cs.consul.Agent().ServiceRegister(&api.AgentServiceRegistration{ID: id, Name: service, Address: host, Port: port, Check: check}); err != nil {
		t.Fatalf("register %s: %v", id, err)
	}
}

// call sends GET http://service/ through the sidecar; it returns the
// answering instance, or "" and the failure.
func (cs *consulSidecar) call(service string) (string, string) {
	req, _ := http.NewRequest("GET", "http://"+cs.out+"/", nil)
	req.Host = service
	resp, err := cs.client.Do(req)
	if err != nil {
		return "", err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		return "", fmt.Sprintf("%d %s", resp.StatusCode, b)
	}
	return string(b), ""
}

// until calls service until pred holds for the answering instance, and
// returns how long that took.
func (cs *consulSidecar) until(t *testing.T, service, what string, limit time.Duration, pred func(instance string) bool) time.Duration {
	t.Helper()
	start := time.Now()
	last := ""
	for time.Since(start) < limit {
		got, failure := cs.call(service)
		if failure == "" && pred(got) {
			return time.Since(start)
		}
		last = got + failure
	}
	t.Fatalf("%s: not within %v (last answer %q)", what, limit, last)
	return 0
}

// Instances appear within 1 s of registration and leave within 1 s of a
// failing check or a deregistration; no request goes to them after that.
func TestConsulPropagation(t *testing.T) {
	cs := startConsulSidecar(t)
	cs.register(t, "users", "users-a", nil)
	cs.until(t, "users", "first instance", 10*time.Second, func(i string) bool { return i == "users-a" })

	cs.register(t, "users", "users-b", &api.AgentServiceCheck{CheckID: "b-ttl", TTL: "5m", Status: api.HealthPassing})
	took := cs.until(t, "users", "users-b appears", time.Second, func(i string) bool { return i == "users-b" })
	t.Logf("a registration reached the sidecar in %v", took)

	if err := cs.consul.Agent().UpdateTTL("b-ttl", "failing", api.HealthCritical); err != nil {
		t.Fatal(err)
	}
	cs.expectGone(t, "users-b", "after its check failed")

	cs.register(t, "users", "users-c", nil)
	cs.until(t, "users", "users-c appears", time.Second, func(i string) bool { return i == "users-c" })
	if err := cs.consul.Agent().ServiceDeregister("users-c"); err != nil {
		t.Fatal(err)
	}
	cs.expectGone(t, "users-c", "after its deregistration")
}

// expectGone waits 1 s, then checks that 200 calls never reach gone.
func (cs *consulSidecar) expectGone(t *testing.T, gone, when string) {
	t.Helper()
	time.Sleep(time.Second)
	for i := range 200 {
		got, failure := cs.call("users")
		if failure != "" || got == gone {
			t.Fatalf("call %d, 1 s %s: got %q %s; want another instance", i, when, got, failure)
		}
	}
}

// With Consul stopped for 30 s under steady load, no request fails; when it
// returns, new instances are picked up. The app's registration comes back
// by itself, and shutdown deregisters it.
func TestConsulOutageUnderLoad(t *testing.T) {
	in := freePort(t)
	cs := startConsulSidecar(t, "--service", "orders", "--app-port", "8080", "--inbound-addr", in)
	cs.register(t, "users", "users-a", nil)
	cs.until(t, "users", "first instance", 10*time.Second, func(i string) bool { return i == "users-a" })
	_, inPort, _ := net.SplitHostPort(in)
	registered := func() *api.AgentService {
		svcs, _ := cs.consul.Agent().Services()
		for _, s := range svcs {
			if s.Service == "orders" {
				return s
			}
		}
		return nil
	}
	deadline := time.Now().Add(10 * time.Second)
	for registered() == nil && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if s := registered(); s == nil || s.Address != "10.1.2.3" || strconv.Itoa(s.Port) != inPort {
		t.Fatalf("app registration %+v, want orders at 10.1.2.3:%s", s, inPort)
	}

	cs.agent.Stop()
	outage := 30 * time.Second
	if testing.Short() {
		outage = 3 * time.Second
	}
	sent, failed := 0, 0
	var firstFailure string
	tick := time.NewTicker(10 * time.Millisecond) // 100 requests/s
	for end := time.Now().Add(outage); time.Now().Before(end); <-tick.C {
		sent++
		if _, failure := cs.call("users"); failure != "" {
			failed++
			if firstFailure == "" {
				firstFailure = failure
			}
		}
	}
	tick.Stop()
	if failed != 0 {
		t.Fatalf("%d of %d requests failed during a %v Consul outage, want 0 (first: %s)", failed, sent, outage, firstFailure)
	}
	t.Logf("%d requests during a %v Consul outage, 0 failed", sent, outage)
	if age := cs.staleness(t, "users"); age < outage.Seconds()/2 {
		t.Fatalf("sidecar_discovery_staleness_seconds for users is %v after a %v outage, want it to grow with the outage", age, outage)
	}

	cs.agent.Restart(t) // a -dev agent comes back empty
	cs.register(t, "users", "users-new", nil)
	cs.until(t, "users", "a new instance after Consul returned", 10*time.Second, func(i string) bool { return i == "users-new" })
	deadline = time.Now().Add(10 * time.Second)
	for registered() == nil && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if registered() == nil {
		t.Fatal("the app was not registered again after the agent came back")
	}
}

// With 1000 services registered and 5 used, only those 5 are watched.
func TestConsulWatchesOnlyServicesUsed(t *testing.T) {
	cs := startConsulSidecar(t)
	host, port := instance(t, "shared")
	var wg sync.WaitGroup
	errs := make(chan error, 1000)
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < 1000; i += 8 {
				name := fmt.Sprintf("svc-%04d", i)
				errs <- cs.consul.Agent().ServiceRegister(&api.AgentServiceRegistration{ID: name, Name: name, Address: host, Port: port})
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	for i := range 5 {
		name := fmt.Sprintf("svc-%04d", i*100)
		cs.until(t, name, "calling "+name, 10*time.Second, func(i string) bool { return i == "shared" })
	}
	resp, err := cs.client.Get("http://" + cs.adm + "/endpoints")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var eps struct {
		Services []struct{ Service, Source string }
	}
	if err := json.NewDecoder(resp.Body).Decode(&eps); err != nil {
		t.Fatal(err)
	}
	watched := 0
	for _, s := range eps.Services {
		if s.Source == "consul" {
			watched++
		}
	}
	if watched != 5 {
		t.Fatalf("the sidecar watches %d services, want the 5 used of the 1000 registered: %+v", watched, eps.Services)
	}
}

// By default an instance Consul has at a loopback address is not used:
// the sidecar never calls itself, its admin API or the pod's private ports
// through a catalog entry. The drop is counted once, not at every answer.
func TestConsulDropsLoopbackEndpoints(t *testing.T) {
	cs := startConsulSidecar(t, "--consul-allow-loopback-endpoints=false")
	cs.register(t, "users", "users-lo", nil)
	cs.registerAt(t, "users", "users-admin", cs.adm, nil)
	got, failure := cs.call("users")
	for deadline := time.Now().Add(10 * time.Second); strings.Contains(failure, "connection refused") && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond) // the sidecar is starting
		got, failure = cs.call("users")
	}
	if !strings.HasPrefix(failure, "503 ") || !strings.Contains(failure, "no_healthy_endpoints") {
		t.Fatalf("calling users, whose instances are all on loopback: %q %s; want 503 no_healthy_endpoints", got, failure)
	}
	cs.registerAt(t, "users", "users-far", "10.255.255.1:80", nil)
	deadline := time.Now().Add(10 * time.Second)
	for !cs.adminHasEndpoints("users", "10.255.255.1:80") {
		if time.Now().After(deadline) {
			t.Fatal("users never reached the sidecar's admin API")
		}
		time.Sleep(20 * time.Millisecond)
	}
	cs.registerAt(t, "users", "users-far2", "10.255.255.2:80", nil)
	for !cs.adminHasEndpoints("users", "10.255.255.1:80", "10.255.255.2:80") {
		if time.Now().After(deadline) {
			t.Fatal("a second instance never reached the sidecar's admin API")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if got := cs.metric(t, `sidecar_discovery_dropped_endpoints_total{reason="loopback"}`); got != 2 {
		t.Fatalf(`sidecar_discovery_dropped_endpoints_total{reason="loopback"} = %v after two answers with 2 loopback instances; want 2`, got)
	}
}

// adminHasEndpoints reports whether the admin API shows exactly these
// endpoints for service.
func (cs *consulSidecar) adminHasEndpoints(service string, want ...string) bool {
	resp, err := cs.client.Get("http://" + cs.adm + "/endpoints")
	if err != nil {
		return false
	}
	defer resp.Body.Close()
	var eps struct {
		Services []struct {
			Service   string
			Endpoints []struct{ Addr string }
		}
	}
	if json.NewDecoder(resp.Body).Decode(&eps) != nil {
		return false
	}
	for _, s := range eps.Services {
		if s.Service != service {
			continue
		}
		var got []string
		for _, e := range s.Endpoints {
			got = append(got, e.Addr)
		}
		return strings.Join(got, " ") == strings.Join(want, " ")
	}
	return false
}

// staleness reads sidecar_discovery_staleness_seconds of a Consul service
// from the metrics endpoint.
func (cs *consulSidecar) staleness(t *testing.T, service string) float64 {
	t.Helper()
	return cs.metric(t, `sidecar_discovery_staleness_seconds{service="`+service+`",source="consul"}`)
}

// metric reads the value of one series (name and labels as /metrics
// writes them) from the metrics endpoint.
func (cs *consulSidecar) metric(t *testing.T, series string) float64 {
	t.Helper()
	prefix := series + " "
	m := fetch(t, "http://"+cs.metrics+"/metrics")
	for _, line := range strings.Split(m, "\n") {
		if v, ok := strings.CutPrefix(line, prefix); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("metric line %q: %v", line, err)
			}
			return f
		}
	}
	t.Fatalf("no %s... line in /metrics:\n%s", prefix, m)
	return 0
}

// Consul's instance weights split a service's traffic: weights 3 and 1
// give 75% and 25% of 4,000 requests through a running sidecar, within 3
// points, under the default round robin.
func TestConsulWeightsSplitTraffic(t *testing.T) {
	cs := startConsulSidecar(t)
	for id, w := range map[string]int{"heavy": 3, "light": 1} {
		host, port := instance(t, id)
		if err := cs.consul.Agent().ServiceRegister(&api.AgentServiceRegistration{ID: id, Name: "weighted", Address: host, Port: port,
			Weights: &api.AgentWeights{Passing: w, Warning: 1}}); err != nil {
			t.Fatal(err)
		}
	}
	seen := map[string]bool{}
	cs.until(t, "weighted", "both instances answering", 10*time.Second, func(inst string) bool { seen[inst] = true; return len(seen) == 2 })
	counts := map[string]int{}
	const n = 4000
	for range n {
		inst, fail := cs.call("weighted")
		if fail != "" {
			t.Fatal(fail)
		}
		counts[inst]++
	}
	if share := float64(counts["heavy"]) / n; share < 0.72 || share > 0.78 {
		t.Fatalf("weights 3 and 1: %v of %d requests; want the heavy one 75%% within 3 points", counts, n)
	}
	t.Logf("weights 3 and 1: %v of %d requests", counts, n)
}
