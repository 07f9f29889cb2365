package discovery_test

import (
	"bufio"
	"context"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/hashicorp/consul/api"

	"github.com/sidecar-mesh/sidecar/internal/consultest"
	"github.com/sidecar-mesh/sidecar/internal/logtest"
	"github.com/sidecar-mesh/sidecar/pkg/discovery"
)

// An address that is neither an IP address nor a host name is no
// endpoint, even with loopback endpoints allowed: it would fail only when
// called, or be read by a resolver as an address of its own ("127.1" is
// 127.0.0.1 to inet_aton). Each is counted once, as malformed. IP
// addresses are written as netip writes them.
func TestConsulDropsMalformedAddresses(t *testing.T) {
	agent := consultest.Start(t)
	c := client(t, agent)
	malformed := []string{"127.1", "0177.0.0.1", "0x7f.0.0.1", "1.0x7f", "2130706433", "[::1]", "[10.0.0.1]",
		"10.0.0.1:80", "fd00::1%eth0", "a b", "-a.test", "a-.test", "a..test", "a/b", "a.test..", strings.Repeat("a", 64) + ".test"}
	for i, addr := range malformed {
		register(t, c, &api.AgentServiceRegistration{ID: "bad-" + itoa(i), Name: "web", Address: addr, Port: 80})
	}
	for i, addr := range []string{"10.0.0.1", "FD00::2", "::ffff:10.0.0.3", "web-4.test", "web_5.example.", "b.0x7g", "1e100.net", "127.0.0.1"} {
		register(t, c, &api.AgentServiceRegistration{ID: "ok-" + itoa(i), Name: "web", Address: addr, Port: 80})
	}
	log, logs := logtest.New()
	d := newConsul(t, discovery.ConsulConfig{Client: c, Logger: log, AllowLoopbackEndpoints: true})
	set, err := d.Resolve(context.Background(), "web")
	want := []string{"10.0.0.1:80", "127.0.0.1:80", "1e100.net:80", "[::ffff:10.0.0.3]:80", "[fd00::2]:80", "b.0x7g:80", "web-4.test:80", "web_5.example.:80"}
	if err != nil || !slices.Equal(addrs(set), want) {
		t.Fatalf("Resolve(web) = %q, %v; want %q", addrs(set), err, want)
	}
	if got := d.DroppedEndpoints()[discovery.DropMalformed]; got != uint64(len(malformed)) {
		t.Errorf("DroppedEndpoints()[%s] = %d, want %d", discovery.DropMalformed, got, len(malformed))
	}
	if n := logs.Count("neither an IP address nor a host name"); n != len(malformed) {
		t.Errorf("%d malformed addresses logged, want %d:\n%s", n, len(malformed), logs)
	}
}

// A host name that resolves to the sidecar's own host is dropped as the
// address itself would be: a catalog entry cannot reach the sidecar's
// listeners or the pod's private ports through a name. A name that does
// not resolve is kept (it cannot be called before it does; the dialer
// checks what it resolves to then).
func TestConsulDropsHostNamesOfThisHost(t *testing.T) {
	agent := consultest.Start(t)
	c := client(t, agent)
	hosts := map[string][]netip.Addr{
		"own.test":   {netip.MustParseAddr("127.0.0.1")},
		"own6.test":  {netip.MustParseAddr("::1")},
		"mixed.test": {netip.MustParseAddr("10.0.0.8"), netip.MustParseAddr("127.0.1.1")},
		"meta.test":  {netip.MustParseAddr("169.254.169.254")},
		"any.test":   {netip.MustParseAddr("::ffff:0.0.0.0")},
		"away.test":  {netip.MustParseAddr("10.0.0.7")},
	}
	var mu sync.Mutex // guards looked
	looked := map[string]bool{}
	lookup := func(_ context.Context, host string) ([]netip.Addr, error) {
		mu.Lock()
		looked[host] = true
		mu.Unlock()
		if a, ok := hosts[strings.TrimSuffix(host, ".")]; ok {
			return a, nil
		}
		return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
	}
	for i, addr := range []string{"own.test", "own6.test", "mixed.test", "meta.test", "any.test", "away.test", "nxdomain.test", "Own.Localhost."} {
		register(t, c, &api.AgentServiceRegistration{ID: "web-" + itoa(i), Name: "web", Address: addr, Port: 80})
	}
	register(t, c, &api.AgentServiceRegistration{ID: "web-again", Name: "web", Address: "own.test", Port: 81})
	log, logs := logtest.New()
	d := newConsul(t, discovery.ConsulConfig{Client: c, Logger: log, LookupNetIP: lookup})
	set, err := d.Resolve(context.Background(), "web")
	if want := []string{"away.test:80", "nxdomain.test:80"}; err != nil || !slices.Equal(addrs(set), want) {
		t.Fatalf("Resolve(web) = %q, %v; want %q", addrs(set), err, want)
	}
	want := map[string]uint64{discovery.DropLoopback: 5, discovery.DropLinkLocal: 1, discovery.DropUnspecified: 1}
	if got := d.DroppedEndpoints(); !equalCounts(got, want) {
		t.Errorf("DroppedEndpoints() = %v, want %v", got, want)
	}
	if n := logs.Count("host name resolves to this host"); n != 6 {
		t.Errorf("%d names logged as resolving to this host, want 6:\n%s", n, logs)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(looked) != 7 || looked["Own.Localhost."] {
		t.Errorf("looked up %v; want the 7 names but localhost's subdomain, which needs no lookup", looked)
	}
}

// The default lookup reads the hosts file: a name there for a loopback
// address (the machine's own name often is) is dropped.
func TestConsulDropsHostsFileNamesOfThisHost(t *testing.T) {
	name := loopbackHostsName(t)
	agent := consultest.Start(t)
	c := client(t, agent)
	register(t, c, &api.AgentServiceRegistration{ID: "own-1", Name: "web", Address: name, Port: 80})
	register(t, c, &api.AgentServiceRegistration{ID: "ok-1", Name: "web", Address: "10.0.0.1", Port: 80})
	d := newConsul(t, discovery.ConsulConfig{Client: c})
	set, err := d.Resolve(context.Background(), "web")
	if err != nil || !slices.Equal(addrs(set), []string{"10.0.0.1:80"}) {
		t.Fatalf("Resolve(web), one instance at %q (loopback in /etc/hosts) = %q, %v; want only 10.0.0.1:80", name, addrs(set), err)
	}
	if n := d.DroppedEndpoints()[discovery.DropLoopback]; n != 1 {
		t.Errorf("DroppedEndpoints()[loopback] = %d, want 1", n)
	}
}

// loopbackHostsName is a name other than localhost that /etc/hosts has
// for a loopback address; the test is skipped without one.
func loopbackHostsName(t *testing.T) string {
	t.Helper()
	f, err := os.Open("/etc/hosts")
	if err != nil {
		t.Skipf("no hosts file: %v", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line, _, _ := strings.Cut(sc.Text(), "#")
		fields := strings.Fields(line)
		if len(fields) < 2 {
			continue
		}
		if a, err := netip.ParseAddr(fields[0]); err != nil || !a.IsLoopback() {
			continue
		}
		for _, name := range fields[1:] {
			n := strings.ToLower(strings.TrimSuffix(name, "."))
			if n != "localhost" && !strings.HasSuffix(n, ".localhost") && !strings.Contains(n, "localhost") {
				return name
			}
		}
	}
	t.Skip("/etc/hosts has no name for a loopback address but localhost")
	return ""
}
