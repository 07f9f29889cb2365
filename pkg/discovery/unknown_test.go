package discovery_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/sidecar-mesh/sidecar/internal/consultest"
	"github.com/sidecar-mesh/sidecar/pkg/discovery"
)

// Names Consul does not know cost no watch, no goroutine and no query: after
// 10,000 random names (1,100 took every watch before), a service registered
// and used afterwards routes within a second.
func TestConsulUnknownNamesCostNothing(t *testing.T) {
	agent := consultest.Start(t)
	c := client(t, agent)
	register(t, c, &api.AgentServiceRegistration{ID: "users-1", Name: "users", Address: "10.0.0.1", Port: 80})
	obs := consultest.Observe(t, agent)
	d := newConsul(t, discovery.ConsulConfig{Client: clientAt(t, obs.Addr())})
	ctx := context.Background()
	if _, err := d.Resolve(ctx, "users"); err != nil {
		t.Fatalf("Resolve(users): %v", err)
	}
	// Counted once the resolver's blocking queries wait at the agent: the
	// same number in flight over ten looks.
	settled := func(what string) {
		t.Helper()
		n, same := -1, 0
		eventually(t, what, func() string {
			if b := obs.Blocking(); b == n && b > 0 {
				same++
			} else {
				n, same = b, 0
			}
			if same < 10 {
				return fmt.Sprintf("the blocking queries in flight have not settled (%d now, %d looks alike)", n, same)
			}
			return ""
		})
	}
	settled("before the names")
	asked := len(obs.Paths(""))
	goroutines := runtime.NumGoroutine()

	const names, workers = 10000, 8
	errs := make(chan string, names)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < names; i += workers {
				name := fmt.Sprintf("random-%d-%x", i, rand.Uint64())
				if set, err := d.Resolve(ctx, name); !errors.Is(err, discovery.ErrUnknownService) {
					errs <- fmt.Sprintf("Resolve(%s) = %v, %v; want ErrUnknownService", name, set, err)
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Fatal(e)
	}
	settled("after the names")
	grown := runtime.NumGoroutine() - goroutines
	t.Logf("after %d unknown names: %d more goroutines, %d more requests to the agent, at most %d blocking queries at once",
		names, grown, len(obs.Paths(""))-asked, obs.MaxBlocking())
	if grown > 5 {
		t.Errorf("%d unknown names left %d more goroutines; want at most 5", names, grown)
	}
	if n := len(obs.Paths("")) - asked; n > 5 {
		t.Errorf("%d unknown names made %d requests to the agent; want at most 5 (the catalog's own)", names, n)
	}
	if n := obs.MaxBlocking(); n > 2 {
		t.Errorf("the agent had %d blocking queries at once; want at most 2 (the catalog and users)", n)
	}
	if n := len(d.Services()); n != 1 {
		t.Errorf("%d services watched, want 1 (users)", n)
	}

	register(t, c, &api.AgentServiceRegistration{ID: "fresh-1", Name: "fresh", Address: "10.0.0.9", Port: 80})
	registered := time.Now()
	eventually(t, "a service registered afterwards", func() string {
		if set, err := d.Resolve(ctx, "fresh"); err != nil || !slices.Equal(addrs(set), []string{"10.0.0.9:80"}) {
			return fmt.Sprintf("Resolve(fresh) = %v, %v; want 10.0.0.9:80", set, err)
		}
		return ""
	})
	took := time.Since(registered)
	t.Logf("a service registered afterwards resolved %v after its registration", took)
	if took > time.Second {
		t.Fatalf("a service registered after %d unknown names resolved %v after its registration; want within a second", names, took)
	}
}

// When the watches are all taken, the least recently used one makes room:
// a real service is never refused for want of a watch.
func TestConsulMaxWatchesMakesRoom(t *testing.T) {
	agent := consultest.Start(t)
	c := client(t, agent)
	for i, name := range []string{"a", "b", "c"} {
		register(t, c, &api.AgentServiceRegistration{ID: name + "-1", Name: name, Address: "10.0.0." + itoa(i+1), Port: 80})
	}
	d := newConsul(t, discovery.ConsulConfig{Client: c, MaxWatches: 2})
	ctx := context.Background()
	for _, name := range []string{"a", "b", "c", "a"} {
		if _, err := d.Resolve(ctx, name); err != nil {
			t.Fatalf("Resolve(%s) with 2 watches at most: %v", name, err)
		}
	}
	var watched []string
	for _, s := range d.Services() {
		watched = append(watched, s.Service)
	}
	if !slices.Equal(watched, []string{"a", "c"}) {
		t.Fatalf("watched %v after a, b, c, a with 2 watches at most; want [a c] (b least recently used)", watched)
	}
}

// Services narrowed to a datacenter and tags are watched through that
// datacenter's catalog.
func TestConsulDatacenterOption(t *testing.T) {
	agent := consultest.Start(t)
	c := client(t, agent)
	register(t, c, &api.AgentServiceRegistration{ID: "a-1", Name: "a", Address: "10.0.0.1", Port: 80, Tags: []string{"v1"}})
	register(t, c, &api.AgentServiceRegistration{ID: "a-2", Name: "a", Address: "10.0.0.2", Port: 80, Tags: []string{"v2"}})
	obs := consultest.Observe(t, agent)
	d := newConsul(t, discovery.ConsulConfig{Client: clientAt(t, obs.Addr()),
		Services: map[string]discovery.ServiceOptions{"a": {Datacenter: "dc1", Tags: []string{"v2"}}}})
	set, err := d.Resolve(context.Background(), "a")
	if err != nil || !slices.Equal(addrs(set), []string{"10.0.0.2:80"}) {
		t.Fatalf("Resolve(a) in dc1 with tag v2 = %v, %v; want 10.0.0.2:80", set, err)
	}
	for _, p := range obs.Paths("") {
		if !strings.HasPrefix(p, "/v1/catalog/services") && p != "/v1/health/service/a" {
			t.Errorf("asked for %s", p)
		}
	}
}

// A service that leaves the catalog is no longer watched, and is watched
// again when it comes back.
func TestConsulServiceLeavesCatalog(t *testing.T) {
	agent := consultest.Start(t)
	c := client(t, agent)
	register(t, c, &api.AgentServiceRegistration{ID: "a-1", Name: "a", Address: "10.0.0.1", Port: 80})
	d := newConsul(t, discovery.ConsulConfig{Client: c})
	ctx := context.Background()
	if _, err := d.Resolve(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	if err := c.Agent().ServiceDeregister("a-1"); err != nil {
		t.Fatal(err)
	}
	eventually(t, "a gone", func() string {
		if _, err := d.Resolve(ctx, "a"); !errors.Is(err, discovery.ErrUnknownService) {
			return fmt.Sprintf("Resolve(a) after its deregistration: %v, want ErrUnknownService", err)
		}
		if n := len(d.Services()); n != 0 {
			return fmt.Sprintf("%d services watched, want 0", n)
		}
		return ""
	})
	register(t, c, &api.AgentServiceRegistration{ID: "a-2", Name: "a", Address: "10.0.0.2", Port: 80})
	eventually(t, "a back", func() string {
		set, err := d.Resolve(ctx, "a")
		if err != nil || !slices.Equal(addrs(set), []string{"10.0.0.2:80"}) {
			return fmt.Sprintf("Resolve(a) = %v, %v; want 10.0.0.2:80", addrs(set), err)
		}
		return ""
	})
}
