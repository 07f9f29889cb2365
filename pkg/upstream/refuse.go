package upstream

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"syscall"
)

// RefusedAddrError is the cause of the *ConnectError for a connection not
// made because TransportConfig.RefuseResolved refused the address a host
// name resolved to.
type RefusedAddrError struct {
	Addr   netip.AddrPort // the address the name resolved to
	Reason string         // RefuseResolved's
}

func (e *RefusedAddrError) Error() string {
	return "not connecting to " + e.Addr.String() + ": " + e.Reason
}

// checkedDial returns the dial of host names under refuse. With dial (a
// DialContext of the config's) nil, it is d's own, which asks refuse
// about each address the name resolved to before connecting to it: a
// refused address is skipped for the next, as an unreachable one is. A
// dial of the config's resolves names its own way: refuse is asked about
// the remote address of the connection it made.
func checkedDial(d net.Dialer, dial func(ctx context.Context, network, addr string) (net.Conn, error),
	refuse func(netip.AddrPort) string) func(ctx context.Context, network, addr string) (net.Conn, error) {
	if dial != nil {
		return func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := dial(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			if ap, err := netip.ParseAddrPort(c.RemoteAddr().String()); err == nil {
				ap = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
				if why := refuse(ap); why != "" {
					_ = c.Close()
					return nil, &RefusedAddrError{Addr: ap, Reason: why}
				}
			}
			return c, nil
		}
	}
	d.ControlContext = func(_ context.Context, _, address string, _ syscall.RawConn) error {
		// address is the one about to be connected to: an IP address and
		// port, whatever the name.
		ap, err := netip.ParseAddrPort(address)
		if err != nil {
			return errors.New("not connecting to " + address + ": not an IP address and port to check")
		}
		ap = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
		if why := refuse(ap); why != "" {
			return &RefusedAddrError{Addr: ap, Reason: why}
		}
		return nil
	}
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := d.DialContext(ctx, network, addr)
		if re := (*RefusedAddrError)(nil); errors.As(err, &re) {
			// Not the *net.OpError around it, which names the address
			// again ("dial tcp 127.0.0.1:80: not connecting to
			// 127.0.0.1:80: ...").
			return nil, re
		}
		return c, err
	}
}

// isIPLiteral reports whether addr, a host:port, has an IP address for its
// host (with a zone or without).
func isIPLiteral(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	_, err = netip.ParseAddr(host)
	return err == nil
}
