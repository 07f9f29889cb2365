package outbound

import (
	"errors"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

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
	log      *slog.Logger
	observer Observer

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
		proxyhttp.CloseBody(req)
		return nil, routeError(service, err)
	}
	if len(set.Endpoints) == 0 {
		proxyhttp.CloseBody(req)
		return nil, &proxyhttp.LocalError{Status: http.StatusServiceUnavailable,
			Reason: proxyhttp.ReasonNoHealthyEndpoints, Service: service,
			Detail: "the service is known but has no healthy endpoint"}
	}
	info, _ := req.Context().Value(attemptKey{}).(*attemptInfo)
	if info == nil {
		return nil, errors.New("outbound: pick layer called outside the resilience layer")
	}
	pol, st := info.policy, info.state
	now := time.Now()
	// A retry prefers another endpoint than the one that failed.
	ep := pickHealthy(p.picker(set), &st.outliers, info.avoid, now)
	info.picked = ep.Addr
	out := *req
	u := *req.URL
	u.Host = ep.Addr
	out.URL = &u
	resp, err := p.next.RoundTrip(&out)
	if failed := attemptFailed(resp, err); failed || err == nil {
		if st.outliers.record(ep.Addr, failed, set, pol.OutlierDetection, time.Now()) {
			p.log.Warn("endpoint ejected", "service", service, "endpoint", ep.Addr,
				"for", pol.OutlierDetection.EjectionTime.String())
			p.observer.EndpointEjected(service)
		}
	}
	return resp, err
}
