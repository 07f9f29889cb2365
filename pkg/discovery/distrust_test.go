package discovery_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"slices"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/hashicorp/consul/api"

	"github.com/sidecar-mesh/sidecar/internal/consultest"
	"github.com/sidecar-mesh/sidecar/internal/logtest"
	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/panics"
)

// panicCount is how many panics package panics recovered at where so far.
func panicCount(where string) uint64 {
	for _, c := range panics.Counts() {
		if c.Where == where {
			return c.N
		}
	}
	return 0
}

// A name from the wire never reaches a Consul URL unless it is a service
// name: "a/../../../kv/sidecar/policies/web" in /v1/health/service/<name>
// made a real agent redirect to the KV key, whose answer, decoded as
// service entries without a Service, crashed the process.
func TestConsulCraftedNameAsksNothing(t *testing.T) {
	agent := consultest.Start(t)
	c := client(t, agent)
	if _, err := c.KV().Put(&api.KVPair{Key: "sidecar/policies/web", Value: []byte("timeout: 1s\n")}, nil); err != nil {
		t.Fatal(err)
	}
	register(t, c, &api.AgentServiceRegistration{ID: "web-1", Name: "web", Address: "10.0.0.1", Port: 80})
	obs := consultest.Observe(t, agent)
	d := newConsul(t, discovery.ConsulConfig{Client: clientAt(t, obs.Addr())})
	ctx := context.Background()
	for _, name := range []string{
		"a/../../../kv/sidecar/policies/web", "web/../../kv/sidecar/policies/web", "..", "web/", "/web",
		"web?dc=other", "web#x", "web%2f..", "web%2F..%2F..%2Fkv", "Web", "web ", "", ".web", "web.",
		strings.Repeat("a", 254),
	} {
		if set, err := d.Resolve(ctx, name); !errors.Is(err, discovery.ErrUnknownService) {
			t.Errorf("Resolve(%q) = %v, %v; want ErrUnknownService", name, set, err)
		}
	}
	if asked := obs.Paths(""); len(asked) != 0 {
		t.Fatalf("names that are no service names made %d requests to the agent: %q; want none", len(asked), asked)
	}

	// A service name still works, and asks only for itself.
	set, err := d.Resolve(ctx, "web")
	if err != nil || !slices.Equal(addrs(set), []string{"10.0.0.1:80"}) {
		t.Fatalf("Resolve(web) = %v, %v; want 10.0.0.1:80", set, err)
	}
	for _, p := range obs.Paths("") {
		if p != "/v1/catalog/services" && p != "/v1/health/service/web" {
			t.Errorf("the agent was asked for %s; want only /v1/catalog/services and /v1/health/service/web", p)
		}
	}
}

// The reverse lookup puts names from the catalog into URLs too: a service
// registered under a name that is a path is never asked for, nor answered.
func TestConsulServiceAtSkipsNamesThatArePaths(t *testing.T) {
	agent := consultest.Start(t)
	c := client(t, agent)
	if _, err := c.KV().Put(&api.KVPair{Key: "sidecar/policies/web", Value: []byte("timeout: 1s\n")}, nil); err != nil {
		t.Fatal(err)
	}
	// No address of their own: found through their node's address.
	register(t, c, &api.AgentServiceRegistration{ID: "crafted-1", Name: "x/../../../kv/sidecar/policies/web", Port: 9005})
	register(t, c, &api.AgentServiceRegistration{ID: "bare-1", Name: "Bare", Port: 9006})
	obs := consultest.Observe(t, agent)
	d := newConsul(t, discovery.ConsulConfig{Client: clientAt(t, obs.Addr())})
	ctx := context.Background()
	if got, err := d.ServiceAt(ctx, netip.MustParseAddrPort("127.0.0.1:9005")); !errors.Is(err, discovery.ErrUnknownService) {
		t.Errorf("ServiceAt(127.0.0.1:9005), a service named as a path = %q, %v; want ErrUnknownService", got, err)
	}
	if got, err := d.ServiceAt(ctx, netip.MustParseAddrPort("127.0.0.1:9006")); err != nil || got != "bare" {
		t.Errorf("ServiceAt(127.0.0.1:9006) = %q, %v; want bare (names are lower-cased, as ServiceName does)", got, err)
	}
	for _, p := range obs.Paths("") {
		if strings.Contains(p, "kv") {
			t.Errorf("the agent was asked for %s", p)
		}
	}
}

// Every answer is decoded without trusting its shape: entries without a
// Service or a Node, null checks, a null catalog. A server stands in for
// Consul, since a real agent does not send these.
func TestConsulAnswersWithMissingParts(t *testing.T) {
	answers := map[string]string{
		"/v1/catalog/services": `{"web": [], "Upper": null}`,
		"/v1/health/service/web": `[null, {}, {"Node": null, "Service": null},
			{"Node": null, "Service": {"Port": 80}},
			{"Node": {"Address": "10.0.0.2"}, "Service": {"Address": "", "Port": 81}},
			{"Node": null, "Service": {"Address": "10.0.0.1", "Port": 80}},
			{"Node": null, "Service": {"Address": "10.0.0.3", "Port": 70000}},
			{"Service": {"Address": "10.0.0.5", "Port": 80}, "Checks": [null]},
			{"Service": {"Address": "10.0.0.6", "Port": 80}, "Checks": null},
			{"Node": null, "Service": {"Address": "10.0.0.7", "Port": 80, "Weights": null},
				"Checks": [null, {"CheckID": "serfHealth", "Status": "warning"}, null]},
			{"Service": {"Address": "10.0.0.8", "Port": 80}, "Checks": [null, {"CheckID": "c", "Status": "critical"}]},
			{"Service": {"Address": "10.0.0.9", "Port": 80}, "Checks": [{"CheckID": "_service_maintenance:web", "Status": "passing"}, null]},
			{"Service": {"Address": "10.0.0.10", "Port": 80}, "Checks": [null, {"CheckID": "c", "Status": "bogus"}]}]`,
		"/v1/health/service/upper": `[{"Node": null, "Service": {"Address": "10.0.0.4", "Port": 80}}]`,
	}
	fake := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, ok := answers[r.URL.Path]
		if r.URL.Query().Get("dc") == "dc2" {
			body, ok = "null", r.URL.Path == "/v1/catalog/services"
		}
		if !ok {
			http.NotFound(w, r)
			return
		}
		if r.URL.Query().Get("index") == "5" { // nothing new: block until the client goes
			<-r.Context().Done()
			return
		}
		w.Header().Set("X-Consul-Index", "5")
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, body)
	}))
	t.Cleanup(fake.Close)
	before := panicCount("discovery.watch") + panicCount("discovery.catalog")
	d := newConsul(t, discovery.ConsulConfig{Client: clientAt(t, strings.TrimPrefix(fake.URL, "http://")),
		Services: map[string]discovery.ServiceOptions{"other": {Datacenter: "dc2"}}})
	ctx := context.Background()

	set, err := d.Resolve(ctx, "web")
	want := []string{"10.0.0.1:80", "10.0.0.2:81", "10.0.0.5:80", "10.0.0.6:80", "10.0.0.7:80"}
	if err != nil || !slices.Equal(addrs(set), want) {
		t.Fatalf("Resolve(web) = %v, %v; want %v (entries without a Service, an address or a valid port skipped, "+
			"null checks skipped, a critical, maintenance or unknown check excluding its instance)", set, err, want)
	}
	set, err = d.Resolve(ctx, "upper")
	if err != nil || !slices.Equal(addrs(set), []string{"10.0.0.4:80"}) {
		t.Fatalf("Resolve(upper), in the catalog as Upper = %v, %v; want 10.0.0.4:80", set, err)
	}
	if _, err := d.Resolve(ctx, "other"); !errors.Is(err, discovery.ErrUnknownService) {
		t.Fatalf("Resolve(other), whose datacenter's catalog answered null = %v; want ErrUnknownService", err)
	}
	if n := panicCount("discovery.watch") + panicCount("discovery.catalog") - before; n != 0 {
		t.Fatalf("%d panics recovered while decoding; want none", n)
	}
}

// panicOnce is a slog handler that panics the first time msg is logged
// through it or any handler derived from it.
type panicOnce struct {
	slog.Handler
	msg  string
	done *atomic.Bool
}

func (panicOnce) Enabled(context.Context, slog.Level) bool { return true }

func (h panicOnce) Handle(ctx context.Context, r slog.Record) error {
	if r.Message == h.msg && h.done.CompareAndSwap(false, true) {
		panic("a bug while handling " + h.msg)
	}
	return h.Handler.Handle(ctx, r)
}

func (h panicOnce) WithAttrs(as []slog.Attr) slog.Handler {
	return panicOnce{Handler: h.Handler.WithAttrs(as), msg: h.msg, done: h.done}
}

func (h panicOnce) WithGroup(name string) slog.Handler {
	return panicOnce{Handler: h.Handler.WithGroup(name), msg: h.msg, done: h.done}
}

// A panic in a watch is reported and counted, and the watch starts over:
// changes keep arriving, and the process goes on.
func TestConsulWatchSurvivesAPanic(t *testing.T) {
	agent := consultest.Start(t)
	c := client(t, agent)
	register(t, c, &api.AgentServiceRegistration{ID: "users-1", Name: "users", Address: "10.0.0.1", Port: 80})
	panicLog, panicLogs := logtest.New()
	panics.SetLogger(panicLog)
	t.Cleanup(func() { panics.SetLogger(nil) })
	before := panicCount("discovery.watch")
	log := slog.New(panicOnce{Handler: slog.DiscardHandler, msg: "endpoints changed", done: new(atomic.Bool)})
	d := newConsul(t, discovery.ConsulConfig{Client: c, Logger: log})
	ctx := context.Background()

	set, err := d.Resolve(ctx, "users")
	if err != nil || !slices.Equal(addrs(set), []string{"10.0.0.1:80"}) {
		t.Fatalf("Resolve(users) = %v, %v; want 10.0.0.1:80", set, err)
	}
	register(t, c, &api.AgentServiceRegistration{ID: "users-2", Name: "users", Address: "10.0.0.2", Port: 80})
	eventually(t, "a change after the panic", func() string {
		set, _ := d.Resolve(ctx, "users")
		if got := addrs(set); !slices.Equal(got, []string{"10.0.0.1:80", "10.0.0.2:80"}) {
			return "users endpoints " + join(got) + ", want [10.0.0.1:80 10.0.0.2:80]"
		}
		return ""
	})
	if n := panicCount("discovery.watch") - before; n != 1 {
		t.Fatalf("sidecar_panics_total{where=discovery.watch} grew by %d, want 1", n)
	}
	if n := panicLogs.Count("recovered from a panic"); n != 1 || panicLogs.Count("a bug while handling endpoints changed") != 1 {
		t.Fatalf("the panic was logged %d times, want once with its value:\n%s", n, panicLogs)
	}
}

// Endpoints that name the sidecar's own host (loopback, link-local,
// unspecified) are dropped unless allowed; each is logged and counted once,
// not at every answer that still has it.
func TestConsulDropsOwnHostEndpoints(t *testing.T) {
	agent := consultest.Start(t)
	c := client(t, agent)
	own := map[string]string{ // address: reason
		"127.0.0.1":        discovery.DropLoopback,
		"127.9.9.9":        discovery.DropLoopback,
		"::1":              discovery.DropLoopback,
		"::ffff:127.0.0.1": discovery.DropLoopback,
		"localhost":        discovery.DropLoopback,
		"169.254.169.254":  discovery.DropLinkLocal,
		"fe80::1":          discovery.DropLinkLocal,
	}
	want := map[string]uint64{}
	i := 0
	for addr, reason := range own {
		i++
		register(t, c, &api.AgentServiceRegistration{ID: "own-" + itoa(i), Name: "web", Address: addr, Port: 80})
		want[reason]++
	}
	// No address of its own: at the node's, the dev agent's 127.0.0.1, or
	// that of a node registered in the catalog (an agent refuses an
	// unspecified service address, not an unspecified node address).
	register(t, c, &api.AgentServiceRegistration{ID: "node-1", Name: "web", Port: 81})
	want[discovery.DropLoopback]++
	for _, node := range []string{"0.0.0.0", "::"} {
		i++
		if _, err := c.Catalog().Register(&api.CatalogRegistration{Node: "node-" + itoa(i), Address: node,
			Service: &api.AgentService{ID: "own-" + itoa(i), Service: "web", Port: 82}}, nil); err != nil {
			t.Fatalf("register a node at %s: %v", node, err)
		}
		own[node] = discovery.DropUnspecified
		want[discovery.DropUnspecified]++
	}
	register(t, c, &api.AgentServiceRegistration{ID: "ok-1", Name: "web", Address: "10.0.0.1", Port: 80})
	log, logs := logtest.New()
	d := newConsul(t, discovery.ConsulConfig{Client: c, Logger: log})
	ctx := context.Background()

	set, err := d.Resolve(ctx, "web")
	if err != nil || !slices.Equal(addrs(set), []string{"10.0.0.1:80"}) {
		t.Fatalf("Resolve(web) = %v, %v; want only 10.0.0.1:80", set, err)
	}
	register(t, c, &api.AgentServiceRegistration{ID: "ok-2", Name: "web", Address: "10.0.0.2", Port: 80})
	eventually(t, "another instance", func() string {
		set, _ := d.Resolve(ctx, "web")
		if got := addrs(set); !slices.Equal(got, []string{"10.0.0.1:80", "10.0.0.2:80"}) {
			return "web endpoints " + join(got) + ", want [10.0.0.1:80 10.0.0.2:80]"
		}
		return ""
	})
	if got := d.DroppedEndpoints(); !equalCounts(got, want) {
		t.Errorf("DroppedEndpoints() = %v after two answers, want %v (each endpoint once)", got, want)
	}
	if n := logs.Count("dropped an endpoint from Consul"); n != len(own)+1 {
		t.Errorf("%d drops logged after two answers, want %d (each endpoint once):\n%s", n, len(own)+1, logs)
	}

	// With the switch on, they are all used.
	all := newConsul(t, discovery.ConsulConfig{Client: c, AllowLoopbackEndpoints: true})
	set, err = all.Resolve(ctx, "web")
	if err != nil || len(set.Endpoints) != len(own)+3 {
		t.Fatalf("with AllowLoopbackEndpoints, Resolve(web) = %v, %v; want all %d endpoints", addrs(set), err, len(own)+3)
	}
}

func equalCounts(got, want map[string]uint64) bool {
	for k, v := range got {
		if want[k] != v {
			return false
		}
	}
	for k, v := range want {
		if got[k] != v {
			return false
		}
	}
	return true
}
