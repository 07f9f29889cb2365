package main

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

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"

	"github.com/sidecar-mesh/sidecar/pkg/config"
	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/transparent"
)

// startTransparent puts the listener of transparent interception under the
// outbound server when transparent.enabled is set: redirected connections
// carry their original destination to the outbound proxy, or are passed
// through at L4. With an IPv4 outbound address it also listens on [::1] at
// the same port, where ip6tables redirects. Call it after the outbound
// listener is bound and before it serves.
func (s *sidecar) startTransparent(cfg *config.Config, resolver discovery.Chain, reg prometheus.Registerer) error {
	t := cfg.Transparent
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
		for _, h := range cfg.AllowHosts {
			allowed[strings.ToLower(strings.TrimSpace(h))] = true
		}
		allow = func(ctx context.Context, dst netip.AddrPort) bool {
			if allowed[dst.Addr().String()] || allowed[dst.String()] {
				return true
			}
			_, err := resolver.ServiceAt(ctx, dst)
			return err == nil
		}
	}
	tc := transparent.Config{
		SniffTimeout:   t.SniffTimeout.D(),
		ConnectTimeout: t.ConnectTimeout.D(),
		OpaquePorts:    t.Opaque(),
		IsOwn:          isOwn,
		AllowTCP:       allow,
		Observer:       newTransparentMetrics(reg),
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

// listenerAddrs are the addresses the sidecar listens on.
// isOwnEndpoint reports whether an endpoint discovery names is one of the
// sidecar's listeners that no request should be sent to: the outbound
// port (a loop), the admin, health and metrics ports (the app would reach
// the admin API through the proxy). The inbound port is not among them: a
// service that calls itself reaches its app through it. The listeners are
// all bound before the first request is served.
func (s *sidecar) isOwnEndpoint(ap netip.AddrPort) bool {
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

func (s *sidecar) listenerAddrs() []net.Addr {
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
func (s *sidecar) shutdownTransparent(ctx context.Context) error {
	if s.transparent == nil {
		return nil
	}
	if err := s.transparent.Shutdown(ctx); err != nil {
		return fmt.Errorf("TCP passthrough connections still open at the shutdown timeout were closed: %w", err)
	}
	return nil
}

func setBool(v string, dst *bool) error {
	b, err := strconv.ParseBool(v)
	if err != nil {
		return fmt.Errorf("want true or false, got %q", v)
	}
	*dst = b
	return nil
}

// transparentMetrics counts redirected connections (it is the
// transparent.Listener's Observer). Every label is a fixed word.
type transparentMetrics struct {
	accepted *prometheus.CounterVec
	refused  *prometheus.CounterVec
	bytes    *prometheus.CounterVec
	opened   prometheus.Counter
	active   prometheus.Gauge
}

var _ transparent.Observer = (*transparentMetrics)(nil)

func newTransparentMetrics(reg prometheus.Registerer) *transparentMetrics {
	f := promauto.With(reg)
	return &transparentMetrics{
		accepted: f.NewCounterVec(prometheus.CounterOpts{Name: "sidecar_intercepted_connections_total",
			Help: "Connections redirected to the outbound port (transparent interception), by the protocol they were taken for: http or tcp."},
			[]string{"protocol"}),
		refused: f.NewCounterVec(prometheus.CounterOpts{Name: "sidecar_intercepted_refused_total",
			Help: "Redirected connections closed without being served: loop (to the sidecar's own listener), not_allowed (tcpPassthrough), connect_failure (the original destination did not answer)."},
			[]string{"reason"}),
		bytes: f.NewCounterVec(prometheus.CounterOpts{Name: "sidecar_tcp_passthrough_bytes_total",
			Help: "Bytes of TCP passed through to original destinations: sent (app to destination) or received."},
			[]string{"direction"}),
		opened: f.NewCounter(prometheus.CounterOpts{Name: "sidecar_tcp_passthrough_connections_total",
			Help: "TCP connections passed through to their original destination."}),
		active: f.NewGauge(prometheus.GaugeOpts{Name: "sidecar_tcp_passthrough_active_connections",
			Help: "TCP connections being passed through now."}),
	}
}

func (m *transparentMetrics) Accepted(protocol string) { m.accepted.WithLabelValues(protocol).Inc() }
func (m *transparentMetrics) Refused(reason string)    { m.refused.WithLabelValues(reason).Inc() }
func (m *transparentMetrics) PassthroughOpened() {
	m.opened.Inc()
	m.active.Inc()
}
func (m *transparentMetrics) PassthroughClosed() { m.active.Dec() }
func (m *transparentMetrics) Bytes(direction string, n int) {
	m.bytes.WithLabelValues(direction).Add(float64(n))
}
