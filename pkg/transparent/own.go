package transparent

import (
	"net"
	"net/netip"
	"sync"
	"time"
)

// OwnAddrs returns a Config.IsOwn for the sidecar's listeners: a
// destination is its own when it is one of their addresses, or has the port
// of one bound to an unspecified address (0.0.0.0, ::) and an address of
// this host (loopback or an interface's, looked up at most every 10 s). Safe
// for concurrent use.
func OwnAddrs(listeners ...net.Addr) func(netip.AddrPort) bool {
	exact := map[netip.AddrPort]bool{}
	anyPort := map[uint16]bool{}
	for _, a := range listeners {
		ta, ok := a.(*net.TCPAddr)
		if !ok {
			continue
		}
		ap := unmap(ta.AddrPort())
		if ap.Addr().IsUnspecified() || !ap.Addr().IsValid() {
			anyPort[ap.Port()] = true
		} else {
			exact[ap] = true
		}
	}
	var (
		mu      sync.Mutex // guards local and checked
		local   map[netip.Addr]bool
		checked time.Time
	)
	isLocal := func(a netip.Addr) bool {
		if a.IsLoopback() {
			return true
		}
		mu.Lock()
		defer mu.Unlock()
		if local == nil || time.Since(checked) > 10*time.Second {
			local = map[netip.Addr]bool{}
			if addrs, err := net.InterfaceAddrs(); err == nil {
				for _, ia := range addrs {
					if n, ok := ia.(*net.IPNet); ok {
						if ip, ok := netip.AddrFromSlice(n.IP); ok {
							local[ip.Unmap()] = true
						}
					}
				}
			}
			checked = time.Now()
		}
		return local[a]
	}
	return func(dst netip.AddrPort) bool {
		dst = unmap(dst)
		if exact[dst] {
			return true
		}
		return anyPort[dst.Port()] && isLocal(dst.Addr())
	}
}
