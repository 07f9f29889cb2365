// Package hostip finds an address of this machine that is not loopback,
// for tests of what a server answers to a peer on another host: a server
// listening on that address and a client dialing it from this machine make
// a connection whose peer address is not loopback.
package hostip

import (
	"net"
	"net/netip"
	"testing"
)

// NonLoopback returns an IPv4 address of one of this machine's interfaces
// that is neither loopback nor link-local, and skips the test when there
// is none.
func NonLoopback(t testing.TB) string {
	t.Helper()
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		t.Fatalf("listing this machine's addresses: %v", err)
	}
	for _, a := range addrs {
		p, err := netip.ParsePrefix(a.String())
		if err != nil {
			continue
		}
		ip := p.Addr()
		if ip.Is4() && !ip.IsLoopback() && !ip.IsLinkLocalUnicast() && !ip.IsUnspecified() {
			return ip.String()
		}
	}
	t.Skip("this machine has no IPv4 address other than loopback: the non-loopback peer is tested by table only")
	return ""
}
