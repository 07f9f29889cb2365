package outbound

import (
	"context"
	"errors"
	"net/http"

	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/downstream"
	"github.com/sidecar-mesh/sidecar/pkg/forward"
	"github.com/sidecar-mesh/sidecar/pkg/policy"
	"github.com/sidecar-mesh/sidecar/pkg/upstream"
)

// route chooses where a request goes: a call to a service (with the
// endpoints, policy and state it will use), or an allow-listed host:port
// to send it to directly, or the local error that refuses it. ctx is the
// request's: it bounds discovery's wait, and names a redirected
// connection's original destination.
//
//  1. An allow-listed Host goes there directly.
//  2. A Host that names a service known to discovery goes to that service.
//  3. On a connection redirected to the sidecar (transparent interception),
//     a Host that names nothing known (an IP literal, a cluster DNS name)
//     falls back to the connection's original destination: the service
//     that has an endpoint at that address (static or Consul), with that
//     service's policy and load balancing over all its endpoints; else the
//     address itself when it is allow-listed. An original destination that
//     maps to nothing is refused like an IP literal: 403 not_allowed.
//  4. Otherwise IP literals get 403 not_allowed and unknown names 503
//     unknown_service, as on a connection made to the listener itself.
func (p *Proxy) route(ctx context.Context, r *http.Request, host string) (*call, string, *forward.LocalError) {
	if p.allowed(host) {
		return nil, host, nil
	}
	service := discovery.ServiceName(host)
	_, redirected := downstream.OriginalDst(ctx)
	if !discovery.IsIPLiteral(host) {
		if !discovery.ValidServiceName(service) {
			return nil, "", forward.Refuse(forward.ReasonBadRequest, "",
				"the host "+policy.Quote(host)+" is not a service name (letters, digits, '-', '_' and '.')")
		}
		set, err := p.resolver.Resolve(ctx, service)
		if err == nil {
			return p.chain.open(service, set), "", nil
		}
		if !redirected || !errors.Is(err, discovery.ErrUnknownService) {
			return nil, "", routeError(service, err)
		}
	} else if !redirected {
		detail := "IP addresses are not routed; call the service by name or add the address to allowHosts"
		if upstream.IsGRPC(r) {
			detail = "a gRPC channel to the sidecar's address sends that address as its authority: set the authority to the service's name " +
				"(grpc-go grpc.WithAuthority, grpcurl -authority, grpc-js and Python option grpc.default_authority)"
		}
		return nil, "", forward.Refuse(forward.ReasonNotAllowed, service, detail)
	}
	return p.routeByOriginalDst(ctx, host)
}

// routeByOriginalDst routes a request on a redirected connection by the
// address the app dialed.
func (p *Proxy) routeByOriginalDst(ctx context.Context, host string) (*call, string, *forward.LocalError) {
	dst, _ := downstream.OriginalDst(ctx)
	if rr, ok := p.resolver.(discovery.ReverseResolver); ok {
		service, err := rr.ServiceAt(ctx, dst)
		switch {
		case err == nil:
			set, err := p.resolver.Resolve(ctx, service)
			if err != nil {
				return nil, "", routeError(service, err)
			}
			return p.chain.open(service, set), "", nil
		case !errors.Is(err, discovery.ErrUnknownService):
			return nil, "", forward.Refuse(forward.ReasonUnknownService, "",
				"discovery could not say which service has an endpoint at "+dst.String()+": "+err.Error())
		}
	}
	if p.allowed(dst.String()) {
		return nil, dst.String(), nil
	}
	return nil, "", forward.Refuse(forward.ReasonNotAllowed, "",
		"the original destination "+dst.String()+" (Host "+host+") is not an endpoint of a service known to discovery; "+
			"call the service by name or add the address to allowHosts")
}
