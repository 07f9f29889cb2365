package outbound

import (
	"context"
	"errors"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"

	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/policy"
	"github.com/sidecar-mesh/sidecar/pkg/proxyhttp"
	"github.com/sidecar-mesh/sidecar/pkg/tracing"
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

// pickLayer resolves the service named by the request's URL host to one
// endpoint and sends the request there. It is the last layer before the
// transport; the request it gets must carry the service name as URL host.
type pickLayer struct {
	resolver discovery.Resolver
	next     http.RoundTripper
	log      *slog.Logger
	observer Observer
	tracer   trace.Tracer // nil: no attempt spans
	prop     propagation.TextMapPropagator
	// isOwn reports whether an endpoint is one of the sidecar's own
	// listeners: such an endpoint is never called. nil: none is.
	isOwn func(netip.AddrPort) bool
	// refusedLogged holds the endpoints already logged as refused.
	refusedLogged sync.Map

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
	rr := newRoundRobin(set, p.callable(set))
	p.pickers.Store(set.Service, rr)
	return rr
}

// callable returns the endpoints of set the sidecar may call: not its own
// listeners (a catalog entry or a static endpoint at the outbound port
// would make every request call the sidecar again, one at the admin port
// would hand the app the admin API). Each refused endpoint is told to the
// observer, and logged the first time it is seen.
func (p *pickLayer) callable(set *discovery.EndpointSet) []discovery.Endpoint {
	if p.isOwn == nil {
		return set.Endpoints
	}
	var out []discovery.Endpoint
	for i, ep := range set.Endpoints {
		ap, err := netip.ParseAddrPort(ep.Addr)
		if err != nil || !p.isOwn(ap) {
			if out != nil {
				out = append(out, ep)
			}
			continue
		}
		if out == nil {
			out = append(make([]discovery.Endpoint, 0, len(set.Endpoints)), set.Endpoints[:i]...)
		}
		p.observer.EndpointRefused(set.Service, refusedOwnListener)
		if _, seen := p.refusedLogged.LoadOrStore(set.Service+" "+ep.Addr, true); !seen {
			p.log.Warn("not calling an endpoint that is one of the sidecar's own listeners (check discovery)",
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
	rr := p.picker(set)
	if len(rr.eps) == 0 {
		proxyhttp.CloseBody(req)
		return nil, &proxyhttp.LocalError{Status: http.StatusLoopDetected, Reason: proxyhttp.ReasonLoop, Service: service,
			Detail: "every endpoint discovery has for the service is one of the sidecar's own listeners"}
	}
	info, _ := req.Context().Value(attemptKey{}).(*attemptInfo)
	if info == nil {
		return nil, errors.New("outbound: pick layer called outside the resilience layer")
	}
	pol, st := info.policy, info.state
	now := time.Now()
	// A retry prefers another endpoint than the one that failed.
	ep := pickHealthy(rr, &st.outliers, info.avoid, now)
	info.picked = ep.Addr
	p.observer.Attempted(service)
	var span trace.Span
	if p.tracer != nil {
		var ctx context.Context
		ctx, span = p.startAttempt(req, info, ep.Addr)
		req = req.WithContext(ctx)
		// The upstream's spans hang under this attempt's.
		p.prop.Inject(ctx, tracing.HeaderCarrier(req.Header))
	}
	out := proxyhttp.CopyRequest(req)
	out.URL.Host = ep.Addr
	resp, err := p.next.RoundTrip(out)
	end := attemptEnd{p: p, span: span, st: st, endpoint: ep.Addr, set: set, od: pol.OutlierDetection, service: service}
	if err == nil && grpcOutcomePending(resp) {
		// A gRPC answer's outcome comes in its trailers: the attempt is
		// judged when its body ends.
		later := end
		resp.Body = &grpcEnd{ReadCloser: resp.Body, resp: resp, end: func() { later.record(resp, nil) }}
		return resp, nil
	}
	end.record(resp, err)
	return resp, err
}

// attemptEnd is what judging an attempt needs: its span and the outlier
// detector's view of its endpoint.
type attemptEnd struct {
	p        *pickLayer
	span     trace.Span
	st       *serviceState
	endpoint string
	set      *discovery.EndpointSet
	od       *policy.OutlierDetection
	service  string
}

// record ends the attempt's span and feeds its outcome to outlier
// detection.
func (a attemptEnd) record(resp *http.Response, err error) {
	if a.span != nil {
		endAttempt(a.span, resp, err)
	}
	if failed := attemptFailed(resp, err); failed || err == nil {
		if a.st.outliers.record(a.endpoint, failed, a.set, a.od, time.Now()) {
			a.p.log.Warn("endpoint ejected", "service", a.service, "endpoint", a.endpoint,
				"for", a.od.EjectionTime.String())
			a.p.observer.EndpointEjected(a.service)
		}
	}
}

// startAttempt starts the span of one attempt, under the request's span,
// named so that a retry and its reason read at a glance in a trace view:
// "attempt 2 (retry: 503)".
func (p *pickLayer) startAttempt(req *http.Request, info *attemptInfo, endpoint string) (context.Context, trace.Span) {
	ctx, span := p.tracer.Start(req.Context(), "attempt", clientSpan)
	if span.IsRecording() {
		// Named only when sampled: the others drop their name.
		name := "attempt " + strconv.Itoa(info.attempt)
		if info.retryOf != "" {
			name += " (retry: " + info.retryOf + ")"
		}
		span.SetName(name)
		host, port, _ := net.SplitHostPort(endpoint)
		portN, _ := strconv.Atoi(port)
		span.SetAttributes(
			attribute.Int("sidecar.attempt", info.attempt),
			attribute.String("sidecar.service", req.URL.Host),
			attribute.String("server.address", host),
			attribute.Int("server.port", portN),
			attribute.String("sidecar.breaker.state", info.state.breaker.Load().State().String()),
			attribute.String("http.request.method", req.Method),
		)
		if info.retryOf != "" {
			span.SetAttributes(attribute.String("sidecar.retry.reason", info.retryOf),
				attribute.Float64("sidecar.retry.backoff_ms", float64(info.backoff)/float64(time.Millisecond)),
				attribute.Int("http.request.resend_count", info.attempt-1))
		}
	}
	return ctx, span
}

// endAttempt ends an attempt's span with its outcome: the status, or the
// failure.
func endAttempt(span trace.Span, resp *http.Response, err error) {
	if span.IsRecording() {
		if err != nil {
			span.RecordError(err)
			span.SetStatus(codes.Error, err.Error())
		} else {
			span.SetAttributes(attribute.Int("http.response.status_code", resp.StatusCode))
			if g := grpcStatus(resp); g != "" {
				span.SetAttributes(attribute.String("rpc.grpc.status_code", g))
				if g != "0" {
					span.SetStatus(codes.Error, "grpc-status "+g)
				}
			}
			if resp.StatusCode >= 500 {
				span.SetStatus(codes.Error, resp.Status)
			}
		}
	}
	span.End()
}
