package outbound

import (
	"math/rand/v2"
	"net/netip"
	"sync/atomic"

	"github.com/sidecar-mesh/sidecar/pkg/discovery"
)

// roundRobin picks over one immutable endpoint set, less the endpoints that
// are the sidecar's own listeners. It never blocks and never does I/O.
// Safe for concurrent use.
type roundRobin struct {
	set  *discovery.EndpointSet
	eps  []discovery.Endpoint // set.Endpoints less the own ones
	next atomic.Uint64
}

func newRoundRobin(set *discovery.EndpointSet, eps []discovery.Endpoint) *roundRobin {
	rr := &roundRobin{set: set, eps: eps}
	// A random start keeps a fleet of sidecars from marching in step onto
	// the same first endpoint.
	rr.next.Store(rand.Uint64())
	return rr
}

func (rr *roundRobin) pick() discovery.Endpoint {
	eps := rr.eps
	return eps[rr.next.Add(1)%uint64(len(eps))]
}

// picker returns the round robin over set, built once per set.
func (ch *chain) picker(set *discovery.EndpointSet) *roundRobin {
	if v, ok := ch.pickers.Load(set.Service); ok {
		if rr := v.(*roundRobin); rr.set == set {
			return rr
		}
	}
	rr := newRoundRobin(set, ch.callable(set))
	ch.pickers.Store(set.Service, rr)
	return rr
}

// callable returns the endpoints of set the sidecar may call: not its own
// listeners (a catalog entry or a static endpoint at the outbound port
// would make every request call the sidecar again, one at the admin port
// would hand the app the admin API). Each refused endpoint is told to the
// observer, and logged the first time it is seen.
func (ch *chain) callable(set *discovery.EndpointSet) []discovery.Endpoint {
	if ch.isOwn == nil {
		return set.Endpoints
	}
	var out []discovery.Endpoint
	for i, ep := range set.Endpoints {
		ap, err := netip.ParseAddrPort(ep.Addr)
		if err != nil || !ch.isOwn(ap) {
			if out != nil {
				out = append(out, ep)
			}
			continue
		}
		if out == nil {
			out = append(make([]discovery.Endpoint, 0, len(set.Endpoints)), set.Endpoints[:i]...)
		}
		ch.observer.EndpointRefused(set.Service, refusedOwnListener)
		if _, seen := ch.refusedLogged.LoadOrStore(set.Service+" "+ep.Addr, true); !seen {
			ch.log.Warn("not calling an endpoint that is one of the sidecar's own listeners (check discovery)",
				"service", set.Service, "endpoint", ep.Addr, "source", set.Source)
		}
	}
	if out == nil {
		return set.Endpoints
	}
	return out
}

// refusedOwnListener is EndpointRefused's reason for an endpoint that is
// one of the sidecar's own listeners.
const refusedOwnListener = "own_listener"
