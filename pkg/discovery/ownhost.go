package discovery

import (
	"net/netip"
	"strings"
	"sync/atomic"
)

// Why an endpoint from Consul is not used: its address names the sidecar's
// own host, where the sidecar's listeners (outbound, admin) and the pod's
// private ports are.
const (
	DropLoopback    = "loopback"    // 127.0.0.0/8, ::1, localhost
	DropLinkLocal   = "link-local"  // 169.254.0.0/16, fe80::/10
	DropUnspecified = "unspecified" // 0.0.0.0, ::
)

// ownHostAddr returns why host (an instance's address as Consul has it) is
// the sidecar's own host, or "" when it is not. An IPv4-mapped IPv6
// address is read as the IPv4 address it maps; a DNS name is trusted,
// except localhost and its subdomains, which resolve to loopback.
func ownHostAddr(host string) string {
	if a, err := netip.ParseAddr(host); err == nil {
		a = a.Unmap()
		switch {
		case a.IsLoopback():
			return DropLoopback
		case a.IsLinkLocalUnicast():
			return DropLinkLocal
		case a.IsUnspecified():
			return DropUnspecified
		}
		return ""
	}
	h := strings.TrimSuffix(strings.ToLower(host), ".")
	if h == "localhost" || strings.HasSuffix(h, ".localhost") {
		return DropLoopback
	}
	return ""
}

// droppedCounts counts dropped endpoints by reason. The zero value is ready.
type droppedCounts struct {
	loopback, linkLocal, unspecified atomic.Uint64
}

func (d *droppedCounts) add(reason string) {
	switch reason {
	case DropLoopback:
		d.loopback.Add(1)
	case DropLinkLocal:
		d.linkLocal.Add(1)
	case DropUnspecified:
		d.unspecified.Add(1)
	}
}

// DroppedEndpoints returns, by reason (DropLoopback, DropLinkLocal,
// DropUnspecified), how many endpoints Consul answered that were not used
// because they point at the sidecar's own host. An endpoint is counted
// once when it appears in a service's answers, not at every answer that
// still has it. Safe for concurrent use.
func (c *Consul) DroppedEndpoints() map[string]uint64 {
	return map[string]uint64{
		DropLoopback:    c.dropped.loopback.Load(),
		DropLinkLocal:   c.dropped.linkLocal.Load(),
		DropUnspecified: c.dropped.unspecified.Load(),
	}
}
