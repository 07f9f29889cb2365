package transparent

import (
	"errors"
	"net"
	"net/netip"
	"unsafe"

	"golang.org/x/sys/unix"
)

// soOriginalDst is SO_ORIGINAL_DST (linux/netfilter_ipv4.h), and also
// IP6T_SO_ORIGINAL_DST (linux/netfilter_ipv6/ip6_tables.h) at SOL_IPV6.
const soOriginalDst = 80

// OriginalDst returns the destination c was sent to before a netfilter
// REDIRECT (or DNAT) sent it to this host's listener, as conntrack recorded
// it: SO_ORIGINAL_DST for IPv4, IP6T_SO_ORIGINAL_DST for IPv6. For a
// connection no rule rewrote, conntrack answers with the local address (or
// ENOENT when conntrack does not track it); Redirected tells those apart.
func OriginalDst(c *net.TCPConn) (netip.AddrPort, error) {
	local, ok := c.LocalAddr().(*net.TCPAddr)
	if !ok {
		return netip.AddrPort{}, errors.New("not a TCP connection")
	}
	rc, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, err
	}
	var dst netip.AddrPort
	var serr error
	err = rc.Control(func(fd uintptr) {
		if local.IP.To4() != nil {
			var sa unix.RawSockaddrInet4
			size := uint32(unsafe.Sizeof(sa))
			serr = getsockopt(int(fd), unix.SOL_IP, soOriginalDst, unsafe.Pointer(&sa), &size)
			if serr == nil {
				dst = netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), netPort(&sa.Port))
			}
			return
		}
		var sa unix.RawSockaddrInet6
		size := uint32(unsafe.Sizeof(sa))
		serr = getsockopt(int(fd), unix.SOL_IPV6, soOriginalDst, unsafe.Pointer(&sa), &size)
		if serr == nil {
			dst = netip.AddrPortFrom(netip.AddrFrom16(sa.Addr).Unmap(), netPort(&sa.Port))
		}
	})
	if err != nil {
		return netip.AddrPort{}, err
	}
	return dst, serr
}

func getsockopt(fd, level, name int, val unsafe.Pointer, size *uint32) error {
	_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(name),
		uintptr(val), uintptr(unsafe.Pointer(size)), 0)
	if errno != 0 {
		return errno
	}
	return nil
}

// netPort reads a sockaddr's port, stored in network byte order.
func netPort(p *uint16) uint16 {
	b := (*[2]byte)(unsafe.Pointer(p))
	return uint16(b[0])<<8 | uint16(b[1])
}
