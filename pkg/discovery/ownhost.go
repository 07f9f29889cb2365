package discovery

import (
	"context"
	"net/netip"
	"strings"
	"sync/atomic"
	"time"
)

// Why an endpoint from Consul is not used: its address names the sidecar's
// own host, where the sidecar's listeners (outbound, admin) and the pod's
// private ports are; or it is no address at all.
const (
	DropLoopback    = "loopback"    // 127.0.0.0/8, ::1, localhost
	DropLinkLocal   = "link-local"  // 169.254.0.0/16, fe80::/10
	DropUnspecified = "unspecified" // 0.0.0.0, ::
	// DropMalformed is an address that is neither an IP address nor a host
	// name ("127.1", "0177.0.0.1", "[::1]", "10.0.0.1:80"): dialing it
	// fails, or reads it in a way of the resolver's own.
	DropMalformed = "malformed"
)

// OwnHostReason returns why a is the sidecar's own host (DropLoopback,
// DropLinkLocal, DropUnspecified), or "" when it is not. An IPv4-mapped
// IPv6 address is read as the IPv4 address it maps. It is the check of an
// instance's address, for a dialer to make of the address a host name
// resolved to when it connects.
func OwnHostReason(a netip.Addr) string {
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

// ownHostAddr returns why host, an IP address or a host name as
// endpointHost returns them, is the sidecar's own host without a lookup,
// or "": an IP address by OwnHostReason, localhost and its subdomains
// always (they resolve to loopback).
func ownHostAddr(host string) string {
	if a, err := netip.ParseAddr(host); err == nil {
		return OwnHostReason(a)
	}
	h := strings.TrimSuffix(strings.ToLower(host), ".")
	if h == "localhost" || strings.HasSuffix(h, ".localhost") {
		return DropLoopback
	}
	return ""
}

// endpointHost returns host (an instance's address as Consul has it) as an
// endpoint carries it, and whether it is a host name. An IP address is
// written as netip writes it; a zone is refused, since it names an
// interface of the host that registered the instance. A host name is at
// most 253 bytes, with an optional final dot, of labels of 1 to 63
// letters, digits, '-' and '_' that do not start or end with '-'; its last
// label is no number (decimal, or hexadecimal after 0x), which would make
// the name an IPv4 address to resolvers that read "127.1", "0177.0.0.1" or
// "1.0x7f" as one. ok is false for anything else ("[::1]", "10.0.0.1:80",
// "a b"): such an address fails only when called.
func endpointHost(host string) (h string, name, ok bool) {
	if a, err := netip.ParseAddr(host); err == nil {
		if a.Zone() != "" {
			return "", false, false
		}
		return a.String(), false, true
	}
	n := strings.TrimSuffix(host, ".")
	if n == "" || len(n) > 253 {
		return "", false, false
	}
	var last string
	for label := range strings.SplitSeq(n, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return "", false, false
		}
		for i := 0; i < len(label); i++ {
			switch c := label[i]; {
			case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9', c == '-', c == '_':
			default:
				return "", false, false
			}
		}
		last = label
	}
	if numeric(last) {
		return "", false, false
	}
	return host, true, true
}

// numeric reports whether label is a number as inet_aton reads the parts
// of an IPv4 address: decimal (octal with a leading 0), or hexadecimal
// after 0x.
func numeric(label string) bool {
	digits := "0123456789"
	if len(label) >= 2 && label[0] == '0' && (label[1] == 'x' || label[1] == 'X') {
		label, digits = label[2:], "0123456789abcdefABCDEF"
	}
	for i := 0; i < len(label); i++ {
		if strings.IndexByte(digits, label[i]) < 0 {
			return false
		}
	}
	return true
}

// lookupBudget bounds the lookups of the host names of one answer: a slow
// resolver delays an answer's endpoints by this much at most.
const lookupBudget = 2 * time.Second

// hostNames checks the host names of one answer: each is looked up once,
// and all the lookups share lookupBudget. Used by one goroutine.
type hostNames struct {
	lookup func(ctx context.Context, host string) ([]netip.Addr, error)
	ctx    context.Context
	cancel context.CancelFunc
	seen   map[string]ownName
}

// ownName is why a name is the sidecar's own host, and the address that
// makes it so.
type ownName struct {
	reason string
	addr   netip.Addr
}

// ownHost returns why the host name h is the sidecar's own host, and the
// address it resolved to that makes it so; "" when none of its addresses
// is. localhost needs no lookup. A name that cannot be resolved now is not
// dropped: it cannot be called before it resolves, and what it resolves to
// then is for the dialer to check (a name may resolve to other addresses
// at each lookup).
func (n *hostNames) ownHost(ctx context.Context, h string) (string, netip.Addr) {
	if reason := ownHostAddr(h); reason != "" {
		return reason, netip.Addr{}
	}
	if own, ok := n.seen[h]; ok {
		return own.reason, own.addr
	}
	if n.seen == nil {
		n.seen = map[string]ownName{}
		n.ctx, n.cancel = context.WithTimeout(ctx, lookupBudget)
	}
	var own ownName
	addrs, _ := n.lookup(n.ctx, h)
	for _, a := range addrs {
		if reason := OwnHostReason(a); reason != "" {
			own = ownName{reason, a}
			break
		}
	}
	n.seen[h] = own
	return own.reason, own.addr
}

func (n *hostNames) close() {
	if n.cancel != nil {
		n.cancel()
	}
}

// droppedCounts counts dropped endpoints by reason. The zero value is ready.
type droppedCounts struct {
	loopback, linkLocal, unspecified, malformed atomic.Uint64
}

func (d *droppedCounts) add(reason string) {
	switch reason {
	case DropLoopback:
		d.loopback.Add(1)
	case DropLinkLocal:
		d.linkLocal.Add(1)
	case DropUnspecified:
		d.unspecified.Add(1)
	case DropMalformed:
		d.malformed.Add(1)
	}
}

// DroppedEndpoints returns, by reason (DropLoopback, DropLinkLocal,
// DropUnspecified, DropMalformed), how many endpoints Consul answered that
// were not used because they point at the sidecar's own host or have no
// usable address. An endpoint is counted once when it appears in a
// service's answers, not at every answer that still has it. Safe for
// concurrent use.
func (c *Consul) DroppedEndpoints() map[string]uint64 {
	return map[string]uint64{
		DropLoopback:    c.dropped.loopback.Load(),
		DropLinkLocal:   c.dropped.linkLocal.Load(),
		DropUnspecified: c.dropped.unspecified.Load(),
		DropMalformed:   c.dropped.malformed.Load(),
	}
}
