package discovery

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"sort"
	"strconv"
	"time"
)

// Static is a Resolver over a fixed map of services to addresses, from the
// config file. Its sets never change, so it is safe for concurrent use
// without locking. The zero value knows no service.
type Static struct {
	sets map[string]*EndpointSet
}

var _ Resolver = (*Static)(nil)

// NewStatic validates every address and builds the static source. Service
// names are normalized with ServiceName. Addresses must be IP:port: a static
// entry is resolved once, so it must not depend on DNS.
func NewStatic(services map[string][]string) (*Static, error) {
	s := &Static{sets: make(map[string]*EndpointSet, len(services))}
	now := time.Now()
	for name, addrs := range services {
		svc := ServiceName(name)
		if svc == "" || svc != name {
			return nil, fmt.Errorf("service %q: name must be lower-case, without port or .service.consul (want %q)", name, svc)
		}
		set := &EndpointSet{Service: svc, Source: "static", UpdatedAt: now, Endpoints: make([]Endpoint, 0, len(addrs))}
		for i, a := range addrs {
			if err := validateAddr(a); err != nil {
				return nil, fmt.Errorf("service %q endpoint [%d] %q: %w", name, i, a, err)
			}
			set.Endpoints = append(set.Endpoints, Endpoint{Addr: a})
		}
		s.sets[svc] = set
	}
	return s, nil
}

func validateAddr(a string) error {
	host, port, err := net.SplitHostPort(a)
	if err != nil {
		return fmt.Errorf("want IP:port: %w", err)
	}
	if _, err := netip.ParseAddr(host); err != nil {
		return fmt.Errorf("want an IP address, got host %q", host)
	}
	if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 {
		return fmt.Errorf("port %q out of range 1-65535", port)
	}
	return nil
}

// Resolve implements Resolver; it never blocks.
func (s *Static) Resolve(_ context.Context, service string) (*EndpointSet, error) {
	if set, ok := s.sets[service]; ok {
		return set, nil
	}
	return nil, ErrUnknownService
}

// Services implements Resolver, sorted by name.
func (s *Static) Services() []*EndpointSet {
	out := make([]*EndpointSet, 0, len(s.sets))
	for _, set := range s.sets {
		out = append(out, set)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Service < out[j].Service })
	return out
}
