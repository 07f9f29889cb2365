package discovery_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/sidecar-mesh/sidecar/internal/consultest"
	"github.com/sidecar-mesh/sidecar/internal/logtest"
	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/policy"
)

// The watcher pushes every policy key under the prefix (and nothing else)
// on each change; while Consul is down it pushes nothing, so the last set
// stays; when Consul is back it pushes what Consul has.
func TestPolicyWatcher(t *testing.T) {
	agent := consultest.Start(t)
	c := client(t, agent)
	watched, failed := countingClient(t, agent)
	log, logs := logtest.New()
	pushes := make(chan map[string]policy.KVDocument, 100)
	w, err := discovery.WatchPolicies(discovery.PolicyWatchConfig{Client: watched, WaitTime: 10 * time.Second, Logger: log},
		func(docs map[string]policy.KVDocument) { pushes <- docs })
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	next := func(what string) map[string]policy.KVDocument {
		t.Helper()
		select {
		case docs := <-pushes:
			return docs
		case <-time.After(15 * time.Second):
			t.Fatalf("%s: no push within 15s", what)
			return nil
		}
	}
	// until takes pushes until one satisfies ok, and returns it.
	until := func(what string, ok func(map[string]policy.KVDocument) bool) map[string]policy.KVDocument {
		t.Helper()
		for {
			if docs := next(what); ok(docs) {
				return docs
			}
		}
	}
	put := func(key, value string) {
		t.Helper()
		if _, err := c.KV().Put(&api.KVPair{Key: key, Value: []byte(value)}, nil); err != nil {
			t.Fatalf("put %s: %v", key, err)
		}
	}

	if docs := next("first answer"); len(docs) != 0 {
		t.Fatalf("first push %v, want no keys", docs)
	}
	<-w.Synced()
	put("sidecar/policies/team/users", "nested: not a policy")
	put("other/users", "outside the prefix")
	put("sidecar/policies/users", "timeout: 1s\n")
	put("sidecar/policies/*", "{\"timeout\": \"9s\"}")
	docs := until("keys put", func(d map[string]policy.KVDocument) bool { return len(d) == 2 })
	users, _, err := c.KV().Get("sidecar/policies/users", nil)
	if err != nil || users == nil {
		t.Fatalf("get sidecar/policies/users: %v", err)
	}
	usersIndex := users.ModifyIndex
	if u := docs["users"]; u.Key != "sidecar/policies/users" || string(u.Value) != "timeout: 1s\n" || u.ModifyIndex != usersIndex || string(docs["*"].Value) != `{"timeout": "9s"}` {
		t.Fatalf("pushed %+v; want users (index %d) and *", docs, usersIndex)
	}
	if _, err := c.KV().Delete("sidecar/policies/users", nil); err != nil {
		t.Fatal(err)
	}
	until("users deleted", func(d map[string]policy.KVDocument) bool { _, ok := d["users"]; return !ok && len(d) == 1 })

	agent.Stop()
	before, failedBefore := w.LastAnswer(), failed.Load()
	// Several failed queries (backoff from 250ms) and not one push.
	eventually(t, "failed queries while Consul is down", func() string {
		if n := failed.Load() - failedBefore; n < 3 {
			return fmt.Sprintf("%d failed queries since Consul stopped, want 3", n)
		}
		return ""
	})
	if n := len(pushes); n != 0 {
		t.Fatalf("%d pushes while Consul was down, want 0 (the last set stays)", n)
	}
	if !w.LastAnswer().Equal(before) {
		t.Fatal("LastAnswer moved while Consul was down")
	}
	if n := logs.Count("Consul KV query failed"); n != 1 {
		t.Fatalf("the outage was logged %d times, want once (transitions only)", n)
	}

	agent.Restart(t) // a -dev agent comes back empty
	until("Consul back, empty", func(d map[string]policy.KVDocument) bool { return len(d) == 0 })
	put("sidecar/policies/orders", "timeout: 2s\n")
	until("a key put after the restart", func(d map[string]policy.KVDocument) bool { return len(d) == 1 && d["orders"].Key != "" })
	if n := logs.Count("Consul KV answers again"); n != 1 {
		t.Fatalf("the recovery was logged %d times, want once", n)
	}
}
