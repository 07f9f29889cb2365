//go:build !linux

package transparent

import (
	"errors"
	"net"
	"net/netip"
)

// OriginalDst is only available on Linux (netfilter); elsewhere no
// connection is ever seen as redirected.
func OriginalDst(c *net.TCPConn) (netip.AddrPort, error) {
	return netip.AddrPort{}, errors.ErrUnsupported
}
