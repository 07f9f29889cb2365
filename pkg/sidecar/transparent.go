package sidecar

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/sidecar-mesh/sidecar/pkg/config"
	"github.com/sidecar-mesh/sidecar/pkg/metrics"
	"github.com/sidecar-mesh/sidecar/pkg/transparent"
)

// listenTransparent puts the listener of transparent interception under the
// outbound server when transparent.enabled is set: redirected connections
// carry their original destination to the outbound proxy, or are passed
// through at L4. With an IPv4 outbound address it also listens on [::1] at
// the same port, where ip6tables redirects. Call it after the outbound
// listener is bound and before it serves.
func (s *Sidecar) listenTransparent() error {
	t := s.cfg.Transparent
	if !t.Enabled {
		return nil
	}
	outAddr, _ := s.outbound.Addr().(*net.TCPAddr)
	var extra []net.Listener
	if outAddr != nil && outAddr.IP.To4() != nil && t.IPv6Listener() {
		addr := net.JoinHostPort("::1", strconv.Itoa(outAddr.Port))
		ln, err := net.Listen("tcp", addr)
		switch {
		case err == nil:
			extra = append(extra, ln)
		case errors.Is(err, syscall.EADDRNOTAVAIL), errors.Is(err, syscall.EAFNOSUPPORT):
			s.log.Warn("no IPv6 on this host: redirected IPv6 connections are not served", "address", addr, "err", err)
		default:
			return fmt.Errorf("outbound listener for redirected IPv6 on %s: %w (set transparent.ipv6: false to go without)", addr, err)
		}
	}
	var (
		ownOnce sync.Once
		own     func(netip.AddrPort) bool
	)
	isOwn := func(dst netip.AddrPort) bool {
		// The listeners bound after the outbound one are known by the
		// time a connection comes.
		ownOnce.Do(func() { own = transparent.OwnAddrs(s.listenerAddrs()...) })
		return own(dst)
	}
	var allow func(context.Context, netip.AddrPort) bool
	switch t.Passthrough() {
	case config.PassthroughNone:
		allow = func(context.Context, netip.AddrPort) bool { return false }
	case config.PassthroughKnown:
		allowed := map[string]bool{}
		for _, h := range s.cfg.AllowHosts {
			allowed[strings.ToLower(strings.TrimSpace(h))] = true
		}
		allow = func(ctx context.Context, dst netip.AddrPort) bool {
			if allowed[dst.Addr().String()] || allowed[dst.String()] {
				return true
			}
			_, err := s.resolver.ServiceAt(ctx, dst)
			return err == nil
		}
	}
	tc := transparent.Config{
		SniffTimeout:   t.SniffTimeout.D(),
		ConnectTimeout: t.ConnectTimeout.D(),
		OpaquePorts:    t.Opaque(),
		IsOwn:          isOwn,
		AllowTCP:       allow,
		Observer:       metrics.NewTransparent(s.registry),
		Logger:         s.log,
	}
	s.outbound.WrapListener(func(ln net.Listener) net.Listener {
		s.transparent = transparent.NewListener(tc, append([]net.Listener{ln}, extra...)...)
		return s.transparent
	})
	v6 := ""
	if len(extra) > 0 {
		v6 = extra[0].Addr().String()
	}
	s.log.Info("transparent interception on", "outbound", s.outbound.Addr().String(), "ipv6", v6,
		"sniffTimeout", t.SniffTimeout.String(), "tcpPassthrough", t.Passthrough())
	return nil
}

// isOwnEndpoint reports whether an endpoint discovery names is one of the
// sidecar's listeners that no request should be sent to: the outbound
// port (a loop), the admin, health and metrics ports (the app would reach
// the admin API through the proxy). The inbound port is not among them: a
// service that calls itself reaches its app through it. The listeners are
// all bound before the first request is served.
func (s *Sidecar) isOwnEndpoint(ap netip.AddrPort) bool {
	s.ownOnce.Do(func() {
		var addrs []net.Addr
		for _, a := range s.listenerAddrs() {
			if s.inbound == nil || a.String() != s.inbound.Addr().String() {
				addrs = append(addrs, a)
			}
		}
		s.own = transparent.OwnAddrs(addrs...)
	})
	return s.own(ap)
}

// listenerAddrs are the addresses the sidecar listens on.
func (s *Sidecar) listenerAddrs() []net.Addr {
	var out []net.Addr
	for _, ln := range []net.Listener{s.adminLn, s.metricLn, s.healthLn} {
		if ln != nil {
			out = append(out, ln.Addr())
		}
	}
	if s.outbound != nil {
		out = append(out, s.outbound.Addr())
	}
	if s.inbound != nil {
		out = append(out, s.inbound.Addr())
	}
	if s.transparent != nil {
		out = append(out, &net.TCPAddr{IP: net.IPv6loopback, Port: s.outbound.Addr().(*net.TCPAddr).Port})
	}
	return out
}

// shutdownTransparent ends the connections passed through, once the
// outbound server has stopped: they may go on until ctx ends.
func (s *Sidecar) shutdownTransparent(ctx context.Context) error {
	if s.transparent == nil {
		return nil
	}
	if err := s.transparent.Shutdown(ctx); err != nil {
		return fmt.Errorf("TCP passthrough connections still open at the shutdown timeout were closed: %w", err)
	}
	return nil
}
