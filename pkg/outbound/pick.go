package outbound

import (
	"math/rand/v2"
	"net/http"
	"sync"
	"sync/atomic"

	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/proxyhttp"
)

// roundRobin picks over one immutable endpoint set. It never blocks and
// never does I/O. Safe for concurrent use.
type roundRobin struct {
	set  *discovery.EndpointSet
	next atomic.Uint64
}

func newRoundRobin(set *discovery.EndpointSet) *roundRobin {
	rr := &roundRobin{set: set}
	// A random start keeps a fleet of sidecars from marching in step onto
	// the same first endpoint.
	rr.next.Store(rand.Uint64())
	return rr
}

func (rr *roundRobin) pick() discovery.Endpoint {
	eps := rr.set.Endpoints
	return eps[rr.next.Add(1)%uint64(len(eps))]
}

// pickLayer resolves the service named by the request's URL host to one
// endpoint and sends the request there. It is the last layer before the
// transport; the request it gets must carry the service name as URL host.
type pickLayer struct {
	resolver discovery.Resolver
	next     http.RoundTripper

	// pickers holds a *roundRobin per service, rebuilt whenever discovery
	// publishes a new set (compared by pointer: sets are immutable).
	pickers sync.Map
}

var _ http.RoundTripper = (*pickLayer)(nil)

func (p *pickLayer) picker(set *discovery.EndpointSet) *roundRobin {
	if v, ok := p.pickers.Load(set.Service); ok {
		if rr := v.(*roundRobin); rr.set == set {
			return rr
		}
	}
	rr := newRoundRobin(set)
	p.pickers.Store(set.Service, rr)
	return rr
}

func (p *pickLayer) RoundTrip(req *http.Request) (*http.Response, error) {
	service := req.URL.Host
	set, err := p.resolver.Resolve(req.Context(), service)
	if err != nil {
		closeBody(req)
		return nil, routeError(service, err)
	}
	if len(set.Endpoints) == 0 {
		closeBody(req)
		return nil, &proxyhttp.LocalError{Status: http.StatusServiceUnavailable,
			Reason: proxyhttp.ReasonNoHealthyEndpoints, Service: service,
			Detail: "the service is known but has no healthy endpoint"}
	}
	rr := p.picker(set)
	ep := rr.pick()
	if info, ok := req.Context().Value(attemptKey{}).(*attemptInfo); ok {
		// A retry prefers an endpoint other than the one that just failed.
		if ep.Addr == info.avoid && len(set.Endpoints) > 1 {
			ep = rr.pick()
		}
		info.picked = ep.Addr
	}
	out := *req
	u := *req.URL
	u.Host = ep.Addr
	out.URL = &u
	return p.next.RoundTrip(&out)
}
