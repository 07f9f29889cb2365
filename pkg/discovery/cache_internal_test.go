package discovery

import (
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// A confirmation of an unchanged set is written to the file only once a
// tenth of maxAge has passed since the one there; a change at once. Sets
// Consul has not confirmed for maxAge are forgotten.
func TestSetCacheWritesConfirmationsNowAndThen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "endpoints.json")
	c := newSetCache(path, time.Hour, slog.New(slog.DiscardHandler))
	persisted := func() map[string]*EndpointSet {
		t.Helper()
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		var sets map[string]*EndpointSet
		if err := json.Unmarshal(b, &sets); err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		return sets
	}
	t0 := time.Now().Add(-30 * time.Minute).Round(0)
	old := &EndpointSet{Service: "old", Endpoints: []Endpoint{{Addr: "10.0.0.9:80"}}, Source: "consul"}
	c.put(old, t0.Add(-55*time.Minute))
	users := &EndpointSet{Service: "users", Endpoints: []Endpoint{{Addr: "10.0.0.1:80"}}, Source: "consul", UpdatedAt: t0}
	c.put(users, t0)

	for _, step := range []struct {
		at        time.Duration // after t0
		set       *EndpointSet
		wantFile  time.Duration // users in the file as of t0 + this
		wantAddrs int
	}{
		{5 * time.Minute, users, 0, 1}, // within a tenth of maxAge: not written
		{7 * time.Minute, users, 7 * time.Minute, 1},
		{8 * time.Minute, &EndpointSet{Service: "users", Endpoints: []Endpoint{{Addr: "10.0.0.1:80"}, {Addr: "10.0.0.2:80"}}, Source: "consul"},
			8 * time.Minute, 2}, // a change: at once
	} {
		at := t0.Add(step.at)
		c.put(step.set, at)
		if got := c.get("users"); got == nil || !got.UpdatedAt.Equal(at) {
			t.Fatalf("put(users, t0+%v), then get(users) = %+v; want it as of t0+%v", step.at, got, step.at)
		}
		got := persisted()["users"]
		if got == nil || !got.UpdatedAt.Equal(t0.Add(step.wantFile)) || len(got.Endpoints) != step.wantAddrs {
			t.Fatalf("put(users, t0+%v): users in the file = %+v; want %d endpoints as of t0+%v", step.at, got, step.wantAddrs, step.wantFile)
		}
	}
	if got := persisted()["old"]; got != nil {
		t.Errorf("a set last confirmed more than maxAge ago is still in the file: %+v", got)
	}
	if got := c.get("old"); got != nil {
		t.Errorf("a set last confirmed more than maxAge ago is still served: %+v", got)
	}

	// Without a file, the sets are kept in memory all the same.
	mem := newSetCache("", time.Hour, slog.New(slog.DiscardHandler))
	mem.put(users, t0)
	if got := mem.get("users"); got == nil || got.Source != "consul-persisted" || len(got.Endpoints) != 1 {
		t.Fatalf("without a file, get(users) = %+v; want the set put, marked consul-persisted", got)
	}
}
