package discovery

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/sidecar-mesh/sidecar/pkg/panics"
)

// ReverseResolver finds the service an endpoint address belongs to: the
// way a connection redirected to the sidecar (transparent interception),
// which carries only the address the app dialed, is routed to a service and
// its policy.
type ReverseResolver interface {
	// ServiceAt returns the name of a service that has an endpoint at addr,
	// ErrUnknownService (possibly wrapped) when no source has one, or
	// another error when a source could not be asked. It may block while a
	// source asks (Consul), never longer than ctx allows. When several
	// services have an endpoint at addr, the first in name order is
	// returned.
	ServiceAt(ctx context.Context, addr netip.AddrPort) (string, error)
}

var (
	_ ReverseResolver = Chain(nil)
	_ ReverseResolver = (*Static)(nil)
	_ ReverseResolver = (*Consul)(nil)
)

// ServiceAt implements ReverseResolver: the first resolver of the chain that
// knows addr answers (the static source first). Resolvers that are not
// ReverseResolvers are skipped. An error of one resolver is returned only
// when no other knows addr.
func (c Chain) ServiceAt(ctx context.Context, addr netip.AddrPort) (string, error) {
	var errs []error
	for _, r := range c {
		rr, ok := r.(ReverseResolver)
		if !ok {
			continue
		}
		svc, err := rr.ServiceAt(ctx, addr)
		if err == nil {
			return svc, nil
		}
		if !errors.Is(err, ErrUnknownService) {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return "", errors.Join(errs...)
	}
	return "", ErrUnknownService
}

// ServiceAt implements ReverseResolver; it never blocks.
func (s *Static) ServiceAt(_ context.Context, addr netip.AddrPort) (string, error) {
	addr = unmapAddrPort(addr)
	found := ""
	for name, set := range s.sets {
		if (found == "" || name < found) && set.has(addr) {
			found = name
		}
	}
	if found == "" {
		return "", ErrUnknownService
	}
	return found, nil
}

// has reports whether the set has an endpoint at addr.
func (s *EndpointSet) has(addr netip.AddrPort) bool {
	for _, e := range s.Endpoints {
		if ap, err := netip.ParseAddrPort(e.Addr); err == nil && unmapAddrPort(ap) == addr {
			return true
		}
	}
	return false
}

func unmapAddrPort(a netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(a.Addr().Unmap(), a.Port())
}

// How long the Consul source remembers what it was told about an address
// that is not among the healthy endpoints of a watched service.
const (
	reverseHitTTL   = 30 * time.Second
	reverseMissTTL  = 5 * time.Second // a new instance is found within this
	reverseErrorTTL = time.Second
	reverseMaxAddrs = 4096 // addresses remembered; an app dialing random ones can't grow it further
	// reverseMaxCandidates bounds the services, registered without an
	// address of their own, whose node addresses are checked for one
	// lookup.
	reverseMaxCandidates = 16
)

// reverseCache remembers the catalog's answers per address and lets one
// lookup per address run at a time. The zero value is ready to use.
type reverseCache struct {
	mu sync.Mutex // guards m
	m  map[netip.AddrPort]*reverseEntry
}

type reverseEntry struct {
	ready   chan struct{} // closed when the fields below are set
	service string        // "" when no service has an endpoint there
	err     error
	expires time.Time
}

// ServiceAt implements ReverseResolver. The healthy endpoints of the
// services watched already answer first, without I/O. Other addresses are
// looked up in Consul's catalog, healthy or not (an instance failing its
// checks still names its service, whose healthy instances then take the
// call): instances registered with that address and port, then services
// registered without an address whose node has it. The catalog's answers
// are remembered for 30 s (5 s for "none"), and the first lookup of an
// address waits at most FirstWait.
func (c *Consul) ServiceAt(ctx context.Context, addr netip.AddrPort) (string, error) {
	addr = unmapAddrPort(addr)
	if svc := c.watchedAt(addr); svc != "" {
		return svc, nil
	}
	now := time.Now()
	c.rev.mu.Lock()
	if c.rev.m == nil {
		c.rev.m = map[netip.AddrPort]*reverseEntry{}
	}
	e := c.rev.m[addr]
	pending := e != nil && !isClosed(e.ready)
	if e == nil || (!pending && now.After(e.expires)) {
		if len(c.rev.m) >= reverseMaxAddrs {
			for k, old := range c.rev.m {
				if isClosed(old.ready) && now.After(old.expires) {
					delete(c.rev.m, k)
				}
			}
			if len(c.rev.m) >= reverseMaxAddrs {
				clear(c.rev.m)
			}
		}
		e = &reverseEntry{ready: make(chan struct{})}
		c.rev.m[addr] = e
		c.rev.mu.Unlock()
		c.lookupAddr(addr, e)
	} else {
		c.rev.mu.Unlock()
	}
	select {
	case <-e.ready:
	case <-ctx.Done():
		return "", ctx.Err()
	}
	if e.err != nil {
		return "", e.err
	}
	if e.service == "" {
		return "", ErrUnknownService
	}
	return e.service, nil
}

func isClosed(ch chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// watchedAt returns the watched service with a healthy endpoint at addr,
// the first in name order, or "".
func (c *Consul) watchedAt(addr netip.AddrPort) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	found := ""
	for name, w := range c.watches {
		if set := w.set.Load(); set != nil && (found == "" || name < found) && set.has(addr) {
			found = name
		}
	}
	return found
}

// lookupAddr asks the catalog which service has an instance at addr and
// fills e. Its own deadline (FirstWait) bounds it, not the caller's: other
// callers may be waiting on the same answer.
// A panic in it is reported and answered as an error, so that the callers
// waiting on e are answered too.
func (c *Consul) lookupAddr(addr netip.AddrPort, e *reverseEntry) {
	ctx, cancel := context.WithTimeout(c.ctx, c.cfg.FirstWait)
	defer cancel()
	defer close(e.ready)
	var svc string
	var err error
	func() {
		defer func() {
			if v := recover(); v != nil {
				panics.Report("discovery.reverse", v)
				err = fmt.Errorf("recovered from a panic: %v", v)
			}
		}()
		svc, err = c.catalogAt(ctx, addr)
	}()
	now := time.Now()
	switch {
	case err != nil:
		e.err = fmt.Errorf("%w: which service has an instance at %s: %v", ErrNoAnswer, addr, err)
		e.expires = now.Add(reverseErrorTTL)
	case svc == "":
		e.expires = now.Add(reverseMissTTL)
	default:
		e.service = svc
		e.expires = now.Add(reverseHitTTL)
		c.log.Debug("address mapped to a service", "address", addr.String(), "service", svc)
	}
}

func (c *Consul) catalogAt(ctx context.Context, addr netip.AddrPort) (string, error) {
	ip, port := strconv.Quote(addr.Addr().String()), strconv.Itoa(int(addr.Port()))
	q := func(filter string) *api.QueryOptions {
		return (&api.QueryOptions{Filter: filter}).WithContext(ctx)
	}
	exact, _, err := c.cfg.Client.Catalog().Services(q("ServicePort == " + port + " and ServiceAddress == " + ip))
	if err != nil {
		return "", err
	}
	for _, name := range sortedKeys(exact) {
		if _, ok := pathName(name); ok {
			return strings.ToLower(name), nil
		}
	}
	// Instances registered without an address of their own are at their
	// node's address.
	bare, _, err := c.cfg.Client.Catalog().Services(q("ServicePort == " + port + ` and ServiceAddress == ""`))
	if err != nil {
		return "", err
	}
	names := sortedKeys(bare)
	if len(names) > reverseMaxCandidates {
		c.log.Warn("too many services without an address on one port to check them all", "port", addr.Port(),
			"services", len(names), "checked", reverseMaxCandidates)
		names = names[:reverseMaxCandidates]
	}
	for _, name := range names {
		path, ok := pathName(name)
		if !ok {
			continue // no valid service name: never one a request could be routed to
		}
		svcs, _, err := c.cfg.Client.Catalog().Service(path, "",
			q("ServicePort == "+port+` and ServiceAddress == "" and Address == `+ip))
		if err != nil {
			return "", err
		}
		if len(svcs) > 0 {
			return strings.ToLower(name), nil
		}
	}
	return "", nil
}

func sortedKeys(m map[string][]string) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}
