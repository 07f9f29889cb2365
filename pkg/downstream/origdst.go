package downstream

import (
	"context"
	"net"
	"net/netip"
)

// Redirected is a connection that netfilter redirected to the listener
// (transparent interception): OriginalDst is where the app sent it.
type Redirected interface {
	OriginalDst() netip.AddrPort
}

type origDstKey struct{}

// withOriginalDst records c's original destination in ctx when c was
// redirected.
func withOriginalDst(ctx context.Context, c net.Conn) context.Context {
	if rc, ok := c.(Redirected); ok {
		return context.WithValue(ctx, origDstKey{}, rc.OriginalDst())
	}
	return ctx
}

// OriginalDst returns the original destination of the connection a request
// came in on, when that connection was redirected to the listener; ok is
// false for a connection the client made to the listener itself.
func OriginalDst(ctx context.Context) (dst netip.AddrPort, ok bool) {
	dst, ok = ctx.Value(origDstKey{}).(netip.AddrPort)
	return dst, ok
}

// WrapListener puts wrap's listener between the bound socket and the
// framing check, before the server serves: the listener of transparent
// interception, which hands over redirected connections with their
// original destination (see Redirected).
func (s *Server) WrapListener(wrap func(net.Listener) net.Listener) {
	if fl, ok := s.Listener.(*FramingListener); ok {
		fl.Listener = wrap(fl.Listener)
		return
	}
	s.Listener = wrap(s.Listener)
}
