package discovery_test

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/sidecar-mesh/sidecar/internal/consultest"
	"github.com/sidecar-mesh/sidecar/internal/logtest"
	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/policy"
)

// An instance whose check flaps as fast as the agent takes it is applied
// at most once per settle window (50 ms), and the last state wins.
func TestConsulFlappingInstanceIsCoalesced(t *testing.T) {
	agent := consultest.Start(t)
	c := client(t, agent)
	register(t, c, &api.AgentServiceRegistration{ID: "steady", Name: "web", Address: "10.0.0.1", Port: 80})
	register(t, c, &api.AgentServiceRegistration{ID: "flap", Name: "web", Address: "10.0.0.2", Port: 80,
		Check: &api.AgentServiceCheck{CheckID: "flap-ttl", TTL: "5m", Status: api.HealthPassing}})
	log, logs := logtest.New()
	d := newConsul(t, discovery.ConsulConfig{Client: c, Logger: log})
	ctx := context.Background()
	if set, err := d.Resolve(ctx, "web"); err != nil || len(set.Endpoints) != 2 {
		t.Fatalf("Resolve(web) = %v, %v; want 2 endpoints", set, err)
	}
	applied := logs.Count("endpoints changed")

	const changes = 100 // the last one leaves the check critical
	start := time.Now()
	for i := range changes {
		status := api.HealthPassing
		if i%2 == 1 {
			status = api.HealthCritical
		}
		if err := c.Agent().UpdateTTL("flap-ttl", "", status); err != nil {
			t.Fatal(err)
		}
	}
	wrote := time.Since(start)
	eventually(t, "the last state", func() string {
		set, _ := d.Resolve(ctx, "web")
		if got := addrs(set); !slices.Equal(got, []string{"10.0.0.1:80"}) {
			return "web endpoints " + join(got) + ", want [10.0.0.1:80] after the last change (critical)"
		}
		return ""
	})
	took := time.Since(start)
	applied = logs.Count("endpoints changed") - applied
	// One apply at once, then at most one per window while it lasts.
	bound := 2 + int(took/(50*time.Millisecond))
	t.Logf("%d changes written in %v, %d applied (bound %d over %v)", changes, wrote, applied, bound, took)
	if applied > bound {
		t.Fatalf("%d changes over %v were applied %d times; want at most %d (one per 50 ms window)", changes, took, applied, bound)
	}
}

// A policy key written in a burst is pushed at most once per 100 ms, the
// last value winning; keys under the prefix that are no policies (a deeper
// '/') push nothing.
func TestPolicyWatcherCoalescesBursts(t *testing.T) {
	agent := consultest.Start(t)
	c := client(t, agent)
	pushes := make(chan map[string]policy.KVDocument, 1000)
	w, err := discovery.WatchPolicies(discovery.PolicyWatchConfig{Client: c, WaitTime: 10 * time.Second},
		func(docs map[string]policy.KVDocument) { pushes <- docs })
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	<-w.Synced()
	<-pushes
	put := func(key, value string) {
		t.Helper()
		if _, err := c.KV().Put(&api.KVPair{Key: key, Value: []byte(value)}, nil); err != nil {
			t.Fatalf("put %s: %v", key, err)
		}
	}

	for i := range 20 {
		put("sidecar/policies/team/notes", "not a policy "+itoa(i))
	}
	put("sidecar/policies/users", "timeout: 1s\n")
	select {
	case docs := <-pushes:
		if len(docs) != 1 || string(docs["users"].Value) != "timeout: 1s\n" {
			t.Fatalf("first push after 20 writes of a key that is no policy: %v; want users alone", docs)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no push within 10s of writing sidecar/policies/users")
	}

	const writes = 200
	start := time.Now()
	for i := range writes {
		put("sidecar/policies/users", "timeout: "+itoa(i+1)+"ms\n")
	}
	last := "timeout: " + itoa(writes) + "ms\n"
	n := 0
	for deadline := time.After(15 * time.Second); ; {
		select {
		case docs := <-pushes:
			n++
			if string(docs["users"].Value) != last {
				continue
			}
		case <-deadline:
			t.Fatalf("the last value %q never pushed (%d pushes)", last, n)
		}
		break
	}
	took := time.Since(start)
	bound := 2 + int(took/(100*time.Millisecond))
	t.Logf("%d writes, %d pushes over %v (bound %d)", writes, n, took, bound)
	if n > bound {
		t.Fatalf("%d writes over %v made %d pushes; want at most %d (one per 100 ms)", writes, took, n, bound)
	}
}
