// Package discovery finds the endpoints of services. Sources publish
// immutable endpoint sets; they never pick an endpoint (that is the job of the
// outbound picker).
//
// Two outcomes are kept apart on purpose: a service no source knows
// (ErrUnknownService, so the outbound port is never an open proxy) and a known
// service that has no healthy endpoints right now (an EndpointSet with zero
// Endpoints).
package discovery

import (
	"context"
	"errors"
	"net"
	"strings"
	"time"
)

// ErrUnknownService is returned by a Resolver when no source knows the service.
var ErrUnknownService = errors.New("unknown service")

// Endpoint is one instance of a service.
type Endpoint struct {
	// Addr is host:port. The host is an IP address (as netip writes it),
	// or, from Consul, a host name when that is what an instance was
	// registered at: the dialer resolves it, and has to check what it
	// resolves to (see ConsulConfig.AllowLoopbackEndpoints).
	Addr string `json:"addr"`
	// Weight is the endpoint's share of the traffic against the others'
	// (Consul's Weights.Passing, or Weights.Warning while a check warns);
	// 0 is 1, the weight of every static endpoint.
	Weight int `json:"weight,omitempty"`
	// Mesh marks an endpoint of the service mesh (Consul Connect): a proxy
	// of the service's, or the service itself natively, called over mutual
	// TLS and required to prove it is the service.
	Mesh bool `json:"mesh,omitempty"`
}

// EndpointSet is the set of healthy endpoints of one service at one moment.
// A set is immutable once published: sources build a new set for every
// change, so readers may keep and share a pointer without locking.
type EndpointSet struct {
	Service   string     `json:"service"`
	Endpoints []Endpoint `json:"endpoints"`
	// Source names where the set came from ("static", "consul").
	Source string `json:"source"`
	// UpdatedAt is when the source last confirmed the set.
	UpdatedAt time.Time `json:"updatedAt"`
}

// Resolver returns the current endpoint set of a service. Implementations
// are safe for concurrent use. Resolve may block while a source fetches a
// service for the first time, never longer than ctx allows; once a service
// is known it returns at once.
type Resolver interface {
	// Resolve returns ErrUnknownService (possibly wrapped) when no source
	// knows service, and a set with zero endpoints when the service is known
	// but none of its instances is healthy.
	Resolve(ctx context.Context, service string) (*EndpointSet, error)
	// Services lists the services the resolver currently knows, for the
	// admin API. It does not block.
	Services() []*EndpointSet
}

// Chain consults resolvers in order and returns the first answer that is not
// ErrUnknownService. The static source goes first, so endpoints pinned in the
// config file always win over dynamic discovery.
type Chain []Resolver

var _ Resolver = Chain(nil)

// Resolve implements Resolver.
func (c Chain) Resolve(ctx context.Context, service string) (*EndpointSet, error) {
	for _, r := range c {
		set, err := r.Resolve(ctx, service)
		if errors.Is(err, ErrUnknownService) {
			continue
		}
		return set, err
	}
	return nil, ErrUnknownService
}

// Services implements Resolver. A service known to several resolvers is
// listed once, as the first resolver in the chain sees it.
func (c Chain) Services() []*EndpointSet {
	seen := make(map[string]bool)
	var out []*EndpointSet
	for _, r := range c {
		for _, s := range r.Services() {
			if !seen[s.Service] {
				seen[s.Service] = true
				out = append(out, s)
			}
		}
	}
	return out
}

// ServiceName turns what a client wrote as the host of a request into a
// service name: "user-service", "user-service:80" and
// "user-service.service.consul" all name "user-service". Names are
// lower-cased and a trailing dot is dropped. It returns "" for an empty host.
//
// The port is dropped: a service is one name, whichever port the client
// thought it had. ServiceName(ServiceName(h)) == ServiceName(h): the
// suffixes are trimmed until none is left ("a..", "a.service.consul.").
func ServiceName(host string) string {
	host = strings.ToLower(stripPort(host))
	for {
		n := strings.TrimSuffix(strings.TrimSuffix(host, "."), ".service.consul")
		if n == host {
			return n
		}
		host = n
	}
}

// IsIPLiteral reports whether host (with or without a port, IPv6 with or
// without brackets) is an IP address rather than a name. A host that
// ServiceName turns into an address ("127.0.0.1.", "10.0.0.1.service.consul")
// is one too.
func IsIPLiteral(host string) bool {
	h := stripPort(host)
	h = strings.TrimSuffix(strings.TrimPrefix(h, "["), "]")
	if i := strings.IndexByte(h, '%'); i >= 0 { // IPv6 zone
		h = h[:i]
	}
	return maybeIP(h) && net.ParseIP(h) != nil || maybeIP(ServiceName(host)) && net.ParseIP(ServiceName(host)) != nil
}

// maybeIP reports whether s has only the characters of an IP address. It
// spares net.ParseIP, which allocates its error, on every service name.
func maybeIP(s string) bool {
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case '0' <= c && c <= '9', 'a' <= c && c <= 'f', 'A' <= c && c <= 'F', c == '.', c == ':':
		default:
			return false
		}
	}
	return s != ""
}

// stripPort drops a ":port" suffix; it leaves a bare IPv6 address alone and
// does not allocate (net.SplitHostPort does, for a host without a port).
func stripPort(host string) string {
	i := strings.LastIndexByte(host, ':')
	if i < 0 {
		return host
	}
	if strings.HasPrefix(host, "[") {
		if j := strings.IndexByte(host, ']'); j >= 0 && j < i {
			return host[:j+1]
		}
		return host
	}
	if strings.IndexByte(host[:i], ':') >= 0 {
		return host // bare IPv6 literal
	}
	return host[:i]
}
