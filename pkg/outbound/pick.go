package outbound

import (
	"net/netip"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/discovery"
)

// balancer returns the balancer of the call's endpoint set under its
// policy's loadBalancer, built once per set and policy.
func (ch *chain) balancer(c *call) *balancer {
	lb := c.policy.LoadBalancer
	if v, ok := ch.pickers.Load(c.service); ok {
		b := v.(*balancer)
		if b.set == c.set && b.lb == lb {
			return b
		}
		if b.set != c.set && c.set.UpdatedAt.Before(b.set.UpdatedAt) {
			// A call routed before discovery's last change, retrying:
			// served on a balancer of its own, so that the service's
			// current one, and when its endpoints joined, stay as they are.
			return newBalancer(c.set, ch.callable(c.set), lb, &c.state.endpoints, time.Now(), false, ch.rand)
		}
	}
	b := newBalancer(c.set, ch.callable(c.set), lb, &c.state.endpoints, time.Now(), true, ch.rand)
	ch.pickers.Store(c.service, b)
	return b
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
