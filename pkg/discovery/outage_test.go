package discovery_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/sidecar-mesh/sidecar/internal/consultest"
	"github.com/sidecar-mesh/sidecar/pkg/discovery"
)

// An idle service's watch is not stopped while Consul fails its queries:
// its set is the last known good one, which a new watch would not have.
func TestConsulIdleWatchKeptDuringAnOutage(t *testing.T) {
	agent := consultest.Start(t)
	c := client(t, agent)
	register(t, c, &api.AgentServiceRegistration{ID: "users-1", Name: "users", Address: "10.0.0.2", Port: 8080})
	watched, failed := countingClient(t, agent)
	const idle = 300 * time.Millisecond
	d := newConsul(t, discovery.ConsulConfig{Client: watched, IdleTimeout: idle, FirstWait: 200 * time.Millisecond})
	ctx := context.Background()
	if _, err := d.Resolve(ctx, "users"); err != nil {
		t.Fatal(err)
	}
	used := time.Now()

	agent.Stop()
	eventually(t, "idle during the outage", func() string {
		if failed.Load() == 0 || time.Since(used) < 3*idle {
			return fmt.Sprintf("%d failed queries, %v idle; want some, and 3 idle timeouts", failed.Load(), time.Since(used))
		}
		return ""
	})
	var watched1 []string
	for _, s := range d.Services() {
		watched1 = append(watched1, s.Service+" "+join(addrs(s)))
	}
	if !slices.Equal(watched1, []string{"users [10.0.0.2:8080]"}) {
		t.Fatalf("watched %q after 3 idle timeouts with the agent stopped; want users [10.0.0.2:8080], its last known good set", watched1)
	}
	set, err := d.Resolve(ctx, "users")
	if err != nil || !slices.Equal(addrs(set), []string{"10.0.0.2:8080"}) || set.Source != "consul" {
		t.Fatalf("Resolve(users), idle during the outage = %+v, %v; want 10.0.0.2:8080 from consul", set, err)
	}
}

// An idle service whose watch was stopped just before Consul hung (an
// agent that is stopped fails nothing: its queries get no answer) keeps
// its last known good set: its new watch stands in with it after
// FirstWait, as with a persisted set, though there is no cache file.
func TestConsulIdleServiceAfterTheAgentHangs(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("finds the agent's process through /proc")
	}
	agent := consultest.Start(t)
	c := client(t, agent)
	register(t, c, &api.AgentServiceRegistration{ID: "users-1", Name: "users", Address: "10.0.0.2", Port: 8080})
	d := newConsul(t, discovery.ConsulConfig{Client: c, IdleTimeout: 300 * time.Millisecond, FirstWait: 200 * time.Millisecond})
	ctx := context.Background()
	if _, err := d.Resolve(ctx, "users"); err != nil {
		t.Fatal(err)
	}

	agent.Freeze(t)
	eventually(t, "the idle watch stopped", func() string {
		if n := len(d.Services()); n != 0 {
			return fmt.Sprintf("%d services watched, want 0 once users is idle", n)
		}
		return ""
	})
	set, err := d.Resolve(ctx, "users")
	if err != nil || !slices.Equal(addrs(set), []string{"10.0.0.2:8080"}) || set.Source != "consul-persisted" {
		t.Fatalf("Resolve(users), idle, then asked for with the agent hung = %+v, %v; want its last known set, 10.0.0.2:8080 from consul-persisted", set, err)
	}
}

// A persisted set ages from Consul's last confirmation, not from its last
// change: a stable service is still restored by a sidecar restarted during
// an outage, CacheMaxAge after its endpoints last changed.
func TestConsulPersistedSetAgesFromConfirmation(t *testing.T) {
	agent := consultest.Start(t)
	c := client(t, agent)
	register(t, c, &api.AgentServiceRegistration{ID: "users-1", Name: "users", Address: "10.0.0.2", Port: 8080})
	cache := filepath.Join(t.TempDir(), "endpoints.json")
	const maxAge = 2 * time.Second
	d := newConsul(t, discovery.ConsulConfig{Client: c, CacheFile: cache, CacheMaxAge: maxAge, WaitTime: 200 * time.Millisecond})
	ctx := context.Background()
	set, err := d.Resolve(ctx, "users")
	if err != nil {
		t.Fatal(err)
	}
	changed := set.UpdatedAt
	eventually(t, "the confirmations persisted", func() string {
		b, err := os.ReadFile(cache)
		if err != nil {
			return err.Error()
		}
		var sets map[string]*discovery.EndpointSet
		if err := json.Unmarshal(b, &sets); err != nil || sets["users"] == nil {
			return fmt.Sprintf("%s holds %s (%v), want the set of users", cache, b, err)
		}
		if at := sets["users"].UpdatedAt; at.Sub(changed) < maxAge+maxAge/4 {
			return fmt.Sprintf("users persisted as of %v after its last change, want more than %v", at.Sub(changed), maxAge+maxAge/4)
		}
		return ""
	})

	// A sidecar that starts now, Consul out of its reach.
	down := clientAt(t, "127.0.0.1:1")
	d2 := newConsul(t, discovery.ConsulConfig{Client: down, CacheFile: cache, CacheMaxAge: maxAge, FirstWait: 200 * time.Millisecond})
	set, err = d2.Resolve(ctx, "users")
	if err != nil || !slices.Equal(addrs(set), []string{"10.0.0.2:8080"}) || set.Source != "consul-persisted" {
		t.Fatalf("started without Consul, %v after users last changed (CacheMaxAge %v) but confirmed since: Resolve(users) = %+v, %v; want the persisted set",
			time.Since(changed).Round(time.Millisecond), maxAge, set, err)
	}
}
