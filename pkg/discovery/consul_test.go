package discovery_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"path/filepath"
	"slices"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/sidecar-mesh/sidecar/internal/consultest"
	"github.com/sidecar-mesh/sidecar/pkg/discovery"
)

func client(t testing.TB, a *consultest.Agent) *api.Client {
	t.Helper()
	return clientAt(t, a.Addr())
}

// clientAt is a Consul client for the HTTP API at addr (host:port).
func clientAt(t testing.TB, addr string) *api.Client {
	t.Helper()
	return newClient(t, addr, nil)
}

// countingClient is a client of a that counts in failed the requests that
// got no answer at all (the agent down): a test waits for queries to fail,
// not for time to pass.
func countingClient(t *testing.T, a *consultest.Agent) (c *api.Client, failed *atomic.Int64) {
	t.Helper()
	failed = new(atomic.Int64)
	return newClient(t, a.Addr(), failed), failed
}

// newClient is a client for addr; a nil failed counts nothing.
func newClient(t testing.TB, addr string, failed *atomic.Int64) *api.Client {
	t.Helper()
	cfg := api.DefaultConfig()
	cfg.Address = addr
	if failed != nil {
		cfg.HttpClient = &http.Client{Transport: failCounter{cfg.Transport, failed}}
	}
	c, err := api.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// failCounter counts the round trips of rt that end in an error.
type failCounter struct {
	rt http.RoundTripper
	n  *atomic.Int64
}

func (f failCounter) RoundTrip(r *http.Request) (*http.Response, error) {
	resp, err := f.rt.RoundTrip(r)
	if err != nil {
		f.n.Add(1)
	}
	return resp, err
}

func register(t *testing.T, c *api.Client, reg *api.AgentServiceRegistration) {
	t.Helper()
	if err := c.Agent().ServiceRegister(reg); err != nil {
		t.Fatalf("register %s: %v", reg.ID, err)
	}
}

func newConsul(t *testing.T, cfg discovery.ConsulConfig) *discovery.Consul {
	t.Helper()
	if cfg.FirstWait == 0 {
		cfg.FirstWait = 5 * time.Second // a cold agent may take a moment
	}
	c, err := discovery.NewConsul(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

func addrs(set *discovery.EndpointSet) []string {
	var out []string
	if set == nil {
		return nil
	}
	for _, e := range set.Endpoints {
		out = append(out, e.Addr)
	}
	return out
}

// eventually polls f until it returns "" or 15 s pass; the last message is
// the failure. It is the tests' one wait: the agent is a real process, on
// real time, and says when something changed only to a blocking query.
func eventually(t *testing.T, what string, f func() string) {
	t.Helper()
	deadline := time.NewTimer(15 * time.Second)
	defer deadline.Stop()
	poll := time.NewTicker(10 * time.Millisecond)
	defer poll.Stop()
	for {
		msg := f()
		if msg == "" {
			return
		}
		select {
		case <-deadline.C:
			t.Fatalf("%s: still, after 15s: %s", what, msg)
		case <-poll.C:
		}
	}
}

func TestConsulWatch(t *testing.T) {
	agent := consultest.Start(t)
	c := client(t, agent)
	register(t, c, &api.AgentServiceRegistration{ID: "users-1", Name: "users", Address: "10.0.0.2", Port: 8080})
	register(t, c, &api.AgentServiceRegistration{ID: "users-2", Name: "users", Port: 8081, Tags: []string{"v2"}})
	register(t, c, &api.AgentServiceRegistration{ID: "sick-1", Name: "sick", Address: "10.0.0.9", Port: 80,
		Check: &api.AgentServiceCheck{TTL: "1m", Status: api.HealthCritical}})

	// The dev agent's node is at 127.0.0.1.
	d := newConsul(t, discovery.ConsulConfig{Client: c, Services: map[string]discovery.ServiceOptions{"tagged": {}},
		AllowLoopbackEndpoints: true})
	ctx := context.Background()

	set, err := d.Resolve(ctx, "users")
	if err != nil {
		t.Fatalf("Resolve(users): %v", err)
	}
	// An instance without a service address is reached at its node address.
	if got := addrs(set); !slices.Equal(got, []string{"10.0.0.2:8080", "127.0.0.1:8081"}) || set.Source != "consul" {
		t.Fatalf("users endpoints %v from %q, want [10.0.0.2:8080 127.0.0.1:8081] from consul", got, set.Source)
	}
	if _, err := d.Resolve(ctx, "nope"); !errors.Is(err, discovery.ErrUnknownService) {
		t.Fatalf("Resolve(nope): %v, want ErrUnknownService", err)
	}
	set, err = d.Resolve(ctx, "sick")
	if err != nil || len(set.Endpoints) != 0 {
		t.Fatalf("Resolve(sick) = %v, %v; want a known service with no healthy endpoint", set, err)
	}

	// Changes arrive through the blocking query.
	if err := c.Agent().ServiceDeregister("users-1"); err != nil {
		t.Fatal(err)
	}
	if err := c.Agent().UpdateTTL("service:sick-1", "", api.HealthPassing); err != nil {
		t.Fatal(err)
	}
	eventually(t, "after changes", func() string {
		u, _ := d.Resolve(ctx, "users")
		s, _ := d.Resolve(ctx, "sick")
		if got := addrs(u); !slices.Equal(got, []string{"127.0.0.1:8081"}) {
			return "users endpoints " + join(got) + ", want 127.0.0.1:8081 after deregistering users-1"
		}
		if got := addrs(s); !slices.Equal(got, []string{"10.0.0.9:80"}) {
			return "sick endpoints " + join(got) + ", want 10.0.0.9:80 once its check passes"
		}
		return ""
	})

	// A service that appears after it was asked for is picked up.
	register(t, c, &api.AgentServiceRegistration{ID: "late-1", Name: "late", Address: "10.0.0.5", Port: 9})
	eventually(t, "late service", func() string {
		s, err := d.Resolve(ctx, "late")
		if err != nil || len(s.Endpoints) != 1 {
			return "late not resolved yet"
		}
		return ""
	})
}

func join(s []string) string {
	out := "["
	for i, x := range s {
		if i > 0 {
			out += " "
		}
		out += x
	}
	return out + "]"
}

func TestConsulTagFilter(t *testing.T) {
	agent := consultest.Start(t)
	c := client(t, agent)
	register(t, c, &api.AgentServiceRegistration{ID: "a-1", Name: "a", Address: "10.0.0.1", Port: 1, Tags: []string{"v1"}})
	register(t, c, &api.AgentServiceRegistration{ID: "a-2", Name: "a", Address: "10.0.0.2", Port: 1, Tags: []string{"v2", "canary"}})
	d := newConsul(t, discovery.ConsulConfig{Client: c, Services: map[string]discovery.ServiceOptions{"a": {Tags: []string{"v2"}}}})
	set, err := d.Resolve(context.Background(), "a")
	if err != nil || !slices.Equal(addrs(set), []string{"10.0.0.2:1"}) {
		t.Fatalf("Resolve(a) with tag v2 = %v, %v; want only 10.0.0.2:1", set, err)
	}
}

// Consul going away never empties a set: the last known good one is served,
// its age grows, and the watch recovers when the agent is back.
func TestConsulOutageKeepsLastKnownGood(t *testing.T) {
	agent := consultest.Start(t)
	c := client(t, agent)
	register(t, c, &api.AgentServiceRegistration{ID: "users-1", Name: "users", Address: "10.0.0.2", Port: 8080})
	cache := filepath.Join(t.TempDir(), "endpoints.json")
	watched, failed := countingClient(t, agent)
	d := newConsul(t, discovery.ConsulConfig{Client: watched, CacheFile: cache, WaitTime: time.Second})
	ctx := context.Background()
	if _, err := d.Resolve(ctx, "users"); err != nil {
		t.Fatal(err)
	}

	agent.Stop()
	// Several failed queries (backoff from 250ms): the last known set is
	// served all along, and its age grows.
	before := failed.Load()
	eventually(t, "the outage", func() string {
		set, err := d.Resolve(ctx, "users")
		if err != nil || !slices.Equal(addrs(set), []string{"10.0.0.2:8080"}) {
			t.Fatalf("during the outage Resolve(users) = %v, %v; want the last known set", set, err)
		}
		if n := failed.Load() - before; n < 3 {
			return fmt.Sprintf("%d failed queries since the agent stopped, want 3", n)
		}
		if age := d.Staleness()["users"]; age < time.Second {
			return fmt.Sprintf("staleness %v after 3 failed queries, want it to grow past 1s", age)
		}
		return ""
	})

	// A sidecar started during the outage routes from the persisted sets.
	d2 := newConsul(t, discovery.ConsulConfig{Client: c, CacheFile: cache, FirstWait: 200 * time.Millisecond})
	set, err := d2.Resolve(ctx, "users")
	if err != nil || !slices.Equal(addrs(set), []string{"10.0.0.2:8080"}) || set.Source != "consul-persisted" {
		t.Fatalf("restarted during the outage: Resolve(users) = %+v, %v; want the persisted set", set, err)
	}
	if _, err := d2.Resolve(ctx, "other"); !errors.Is(err, discovery.ErrNoAnswer) {
		t.Fatalf("a service never seen, Consul down: %v, want ErrNoAnswer", err)
	}

	// The agent comes back empty (-dev keeps no state) with lower indexes;
	// until users is registered again, an answer may well say it is unknown.
	agent.Restart(t)
	register(t, c, &api.AgentServiceRegistration{ID: "users-9", Name: "users", Address: "10.0.0.9", Port: 8080})
	for _, r := range []*discovery.Consul{d, d2} {
		eventually(t, "after the agent restart", func() string {
			set, err := r.Resolve(ctx, "users")
			if err != nil {
				return "Resolve(users): " + err.Error()
			}
			if got := addrs(set); !slices.Equal(got, []string{"10.0.0.9:8080"}) || set.Source != "consul" {
				return "users endpoints " + join(got) + " from " + set.Source + ", want 10.0.0.9:8080 from consul"
			}
			return ""
		})
	}
}

func TestConsulIdleWatchStops(t *testing.T) {
	agent := consultest.Start(t)
	c := client(t, agent)
	register(t, c, &api.AgentServiceRegistration{ID: "a-1", Name: "a", Address: "10.0.0.1", Port: 1})
	d := newConsul(t, discovery.ConsulConfig{Client: c, IdleTimeout: 300 * time.Millisecond})
	if _, err := d.Resolve(context.Background(), "a"); err != nil {
		t.Fatal(err)
	}
	if n := len(d.Services()); n != 1 {
		t.Fatalf("%d watched services, want 1", n)
	}
	eventually(t, "idle watch", func() string {
		if n := len(d.Services()); n != 0 {
			return "the watch of an unused service is still running"
		}
		return ""
	})
}

func TestRegistration(t *testing.T) {
	agent := consultest.Start(t)
	c := client(t, agent)
	var ready atomic.Bool
	ready.Store(true)
	reg, err := discovery.Register(discovery.RegistrationConfig{
		Client: c, Service: "orders", Address: "10.1.1.1", Port: 15006,
		Tags: []string{"v1"}, Meta: map[string]string{"team": "x"},
		TTL: time.Second, DeregisterCriticalAfter: time.Minute, Ready: ready.Load,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Deregister(context.Background())
	health := func() (int, string) {
		entries, _, err := c.Health().Service("orders", "", false, nil)
		if err != nil || len(entries) == 0 {
			return 0, ""
		}
		return len(entries), entries[0].Checks.AggregatedStatus()
	}
	eventually(t, "registered and passing", func() string {
		n, status := health()
		if n != 1 || status != api.HealthPassing {
			return "orders has " + itoa(n) + " instance(s), status " + status + "; want 1 passing"
		}
		return ""
	})
	svc, _, err := c.Agent().Service(reg.ID(), nil)
	if err != nil || svc.Port != 15006 || svc.Address != "10.1.1.1" || svc.Meta["team"] != "x" || !slices.Equal(svc.Tags, []string{"v1"}) {
		t.Fatalf("registered %+v, %v", svc, err)
	}

	ready.Store(false)
	reg.Refresh()
	eventually(t, "not ready", func() string {
		if _, status := health(); status != api.HealthCritical {
			return "status " + status + " after the app became unready, want critical"
		}
		return ""
	})
	ready.Store(true)

	// The agent forgets everything: the instance comes back by itself.
	agent.Stop()
	agent.Restart(t)
	eventually(t, "re-registered after an agent restart", func() string {
		if n, status := health(); n != 1 || status != api.HealthPassing {
			return "orders has " + itoa(n) + " instance(s), status " + status + "; want 1 passing"
		}
		return ""
	})

	if err := reg.Deregister(context.Background()); err != nil {
		t.Fatal(err)
	}
	if n, _ := health(); n != 0 {
		t.Fatalf("%d instances after Deregister, want 0", n)
	}
}

func itoa(n int) string { return strconv.Itoa(n) }

// Each instance carries its weight: Weights.Passing while its checks
// pass, Weights.Warning while one warns (Consul's defaults, 1 and 1,
// without weights); a critical instance, and a warning one whose Warning
// weight is 0, get no traffic.
func TestConsulWeights(t *testing.T) {
	agent := consultest.Start(t)
	c := client(t, agent)
	ttl := func(status string) *api.AgentServiceCheck {
		return &api.AgentServiceCheck{TTL: "10m", Status: status}
	}
	for _, reg := range []*api.AgentServiceRegistration{
		{ID: "heavy", Name: "weighted", Address: "10.0.0.1", Port: 80, Weights: &api.AgentWeights{Passing: 3, Warning: 1}},
		{ID: "light", Name: "weighted", Address: "10.0.0.2", Port: 80, Weights: &api.AgentWeights{Passing: 1, Warning: 1}},
		{ID: "plain", Name: "weighted", Address: "10.0.0.3", Port: 80},
		{ID: "warning", Name: "weighted", Address: "10.0.0.4", Port: 80, Weights: &api.AgentWeights{Passing: 5, Warning: 2}, Check: ttl(api.HealthWarning)},
		{ID: "warning-off", Name: "weighted", Address: "10.0.0.5", Port: 80, Weights: &api.AgentWeights{Passing: 5, Warning: 0}, Check: ttl(api.HealthWarning)},
		{ID: "critical", Name: "weighted", Address: "10.0.0.6", Port: 80, Weights: &api.AgentWeights{Passing: 5, Warning: 5}, Check: ttl(api.HealthCritical)},
	} {
		register(t, c, reg)
	}
	d := newConsul(t, discovery.ConsulConfig{Client: c})
	set, err := d.Resolve(context.Background(), "weighted")
	if err != nil {
		t.Fatal(err)
	}
	want := []discovery.Endpoint{{Addr: "10.0.0.1:80", Weight: 3}, {Addr: "10.0.0.2:80", Weight: 1}, {Addr: "10.0.0.3:80", Weight: 1}, {Addr: "10.0.0.4:80", Weight: 2}}
	if !slices.Equal(set.Endpoints, want) {
		t.Fatalf("endpoints %v, want %v", set.Endpoints, want)
	}
	// An instance whose check passes again is back at its Passing weight.
	if err := c.Agent().UpdateTTL("service:warning", "", api.HealthPassing); err != nil {
		t.Fatal(err)
	}
	eventually(t, "passing again", func() string {
		s, _ := d.Resolve(context.Background(), "weighted")
		for _, ep := range s.Endpoints {
			if ep.Addr == "10.0.0.4:80" && ep.Weight == 5 {
				return ""
			}
		}
		return "10.0.0.4:80 not at its Passing weight 5 yet"
	})
}
