package transparent

import (
	"context"
	"net"
	"net/netip"
	"strconv"
	"testing"
	"time"

	"github.com/sidecar-mesh/sidecar/internal/netnstest"
	"github.com/sidecar-mesh/sidecar/pkg/iptables"
)

// Addresses inside the test's namespaces only: the veth pair links two
// namespaces the test made, and nothing else.
const (
	podV4    = "198.18.0.1/24"
	remoteV4 = "198.18.0.2/24"
	podV6    = "fd00:5c::1/64"
	remoteV6 = "fd00:5c::2/64"
)

// TestOriginalDstInNetns redirects connections with the rules of `sidecar
// iptables` inside a namespace and reads their original destinations, IPv4
// and IPv6, from a listener on 127.0.0.1 and [::1].
func TestOriginalDstInNetns(t *testing.T) {
	if !netnstest.InNamespace(t) {
		netnstest.Require(t, "iptables", "ip6tables")
		pod, remote := netnstest.New(t, "od"), netnstest.New(t, "odr")
		netnstest.Veth(t, pod, []string{podV4, podV6}, remote, []string{remoteV4, remoteV6})
		pod.RunTest(t, "TestOriginalDstInNetns")
		return
	}
	// Inside the pod namespace, as root: this process is "the app" (its
	// uid is not exempt), and also the listener.
	ln4, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln4.Close()
	port := ln4.Addr().(*net.TCPAddr).Port
	ln6, err := net.Listen("tcp", "[::1]:"+strconv.Itoa(port))
	if err != nil {
		t.Fatal(err)
	}
	defer ln6.Close()
	cfg := iptables.DefaultConfig()
	cfg.ProxyPort = uint16(port)
	cfg.ExcludePorts = []uint16{9998}
	if err := iptables.Apply(context.Background(), iptables.Exec{}, cfg); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		ln         net.Listener
		dial       string
		redirected bool
		want       string
	}{
		{ln4, "198.18.0.2:9999", true, "198.18.0.2:9999"},
		{ln6, "[fd00:5c::2]:80", true, "[fd00:5c::2]:80"},
		{ln4, ln4.Addr().String(), false, ""}, // the app calling 127.0.0.1:15001 itself
		{ln6, ln6.Addr().String(), false, ""},
	} {
		c, err := net.DialTimeout("tcp", tc.dial, 2*time.Second)
		if err != nil {
			t.Fatalf("dial %s: %v", tc.dial, err)
		}
		a, err := tc.ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		dst, redirected := Redirected(a)
		if redirected != tc.redirected || (tc.redirected && dst != netip.MustParseAddrPort(tc.want)) {
			t.Errorf("dial %s: Redirected = %v, %v; want %s, %v", tc.dial, dst, redirected, tc.want, tc.redirected)
		}
		c.Close()
		a.Close()
	}
	// An excluded port is not redirected: the dial goes out to the remote
	// namespace, where nothing listens.
	if c, err := net.DialTimeout("tcp", "198.18.0.2:9998", 2*time.Second); err == nil {
		c.Close()
		t.Error("a dial to an excluded port reached a listener")
	}
}
