// Package outbound is the sidecar's outbound proxy: the handler of the
// listener the app sends its calls to (127.0.0.1:15001).
//
// A request takes one path, in three files read in order:
//
//   - proxy.go, ServeHTTP: the checks of its head (framing verdict, hop
//     marker, Host, scheme), then route, then its body (read whole up to
//     64 KiB, or recorded as it streams), then the Forwarder.
//   - route.go, route: the service the request names (by Host or absolute
//     URL; on a redirected connection, by its original destination), made
//     into a call: the service, the endpoint set discovery has, the policy
//     in force and the service's state (breaker, retry budget, limiter,
//     outlier detection), looked up once. Or an allow-listed host, sent
//     straight to the transport. Or the local error that refuses it.
//   - call.go, chain.do: the call's span and metrics -> concurrency limits
//     -> deadline -> breaker -> retry loop { pick -> attempt span -> send
//     -> outcome to outlier detection } -> the local-reply mapper
//     (forward.LocalReply), which makes every failure the LocalError of
//     the call's service.
//
// Nothing of a call travels in the request's URL or context: the chain
// takes the call explicitly. New behaviour plugs in at one point each:
// hedging in chain.attempts (a second attempt while the first is out),
// a balancing policy in balancer.pick (behind chain.pick), and mTLS
// origination in the sender (chain.send, the transport), which gets each
// attempt's endpoint.
package outbound

import (
	"bytes"
	"errors"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"

	"github.com/sidecar-mesh/sidecar/internal/readahead"
	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/downstream"
	"github.com/sidecar-mesh/sidecar/pkg/forward"
	"github.com/sidecar-mesh/sidecar/pkg/metrics"
	"github.com/sidecar-mesh/sidecar/pkg/policy"
	"github.com/sidecar-mesh/sidecar/pkg/requestlog"
	"github.com/sidecar-mesh/sidecar/pkg/tracing"
	"github.com/sidecar-mesh/sidecar/pkg/upstream"
)

// Config configures the outbound proxy. The zero value of a field means its
// default, except Resolver, which is required.
type Config struct {
	// Resolver knows the services the app may call. A host it does not know
	// is refused with 503 unknown_service, without a dial or a DNS lookup.
	Resolver discovery.Resolver
	// Policies gives each service's resilience policy; nil means the
	// defaults of pkg/policy for every service.
	Policies Policies
	// AllowHosts lists external hosts the app may reach directly through the
	// proxy, as "host" (any port) or "host:port". Only these may be IP
	// literals or CONNECT targets; they are resolved with DNS. Empty: none.
	AllowHosts []string
	// MaxInFlight caps requests in flight to all services together; over it
	// a request is refused with 503 overloaded. Zero: DefaultMaxInFlight.
	MaxInFlight int
	// Observer is told of retries, breaker transitions, ejections and shed
	// requests; nil: NopObserver.
	Observer Observer
	// Tracer makes the request and attempt spans; nil: none, and trace
	// headers pass through untouched.
	Tracer trace.Tracer
	// Propagator reads and writes trace headers; required with a Tracer.
	Propagator propagation.TextMapPropagator
	// Metrics records requests (count, duration); nil: none.
	Metrics *metrics.Requests
	// Recorder is told of every failed call to a service, with its
	// attempts, and of every call while it Wants them (a tap, the access
	// log); nil: none.
	Recorder *requestlog.Recorder
	// Transport configures the upstream connections.
	Transport upstream.TransportConfig
	// Limits bound the listener (header size, read timeouts).
	Limits downstream.Limits
	// Logger receives state transitions and errors; nil discards them.
	Logger *slog.Logger
	// IsOwn reports whether an endpoint address is one of the sidecar's
	// own listeners: such an endpoint is never called (a service whose
	// every endpoint is one gets 508 loop). nil: no endpoint is.
	IsOwn func(netip.AddrPort) bool
	// HopID names this proxy in the hop marker (forward.HopHeader) it
	// adds to every request it forwards; a request that arrives with it
	// is refused as a loop. Empty: a random id.
	HopID string

	// Send, when set, sends each attempt of a call to a service in place
	// of the pooled transport, to the endpoint in the request's URL host,
	// connecting within connectTimeout: policy simulation's modelled
	// instances. Allow-listed hosts still go through the transport.
	Send func(req *http.Request, connectTimeout time.Duration) (*http.Response, error)
	// Mesh, in the service mesh, sends each attempt to an endpoint of the
	// mesh (discovery marks them) over mutual TLS, as an instance of the
	// service called must answer it. nil: no endpoint is the mesh's.
	Mesh MeshSender
	// Rand draws the chain's random choices (backoff jitter, the
	// balancers' draws and first turn), so that a simulation seeded the
	// same makes the same choices; it must be safe for concurrent use.
	// nil: the global source.
	Rand *rand.Rand
}

// MeshSender sends a request to an endpoint of the mesh, an instance of
// service (upstream.MeshTransport).
type MeshSender interface {
	Send(req *http.Request, service string, connectTimeout time.Duration) (*http.Response, error)
}

// DefaultMaxInFlight is Config.MaxInFlight's default: far above what one app
// sends at once, well below what exhausts the pod's memory or file
// descriptors.
const DefaultMaxInFlight = 10000

// maxBufferedBody is the largest request body read fully before the request
// is forwarded. Such a body is checked whole (a malformed one is answered
// with 400 and never forwarded) and can be sent again without the client.
const maxBufferedBody = 64 << 10

// Proxy is the outbound http.Handler: the edge checks of a request
// (ServeHTTP), its routing (route), then the chain of a call to a service
// (call.go) or the transport to an allow-listed host. Safe for concurrent
// use.
type Proxy struct {
	resolver  discovery.Resolver
	limits    downstream.Limits
	log       *slog.Logger
	transport *upstream.Transport
	allow     map[string]bool
	hop       []string          // the hop marker's value, shared read-only
	chain     *chain            // of every call to a service
	metrics   *metrics.Requests // for requests refused before routing
	fw        *forward.Forwarder
	tunnels   sync.WaitGroup
	serveConn func(net.Conn, []byte) // the listener's ServeConn; nil: none
}

var _ http.Handler = (*Proxy)(nil)

// New builds the outbound proxy.
func New(cfg Config) (*Proxy, error) {
	if cfg.Resolver == nil {
		return nil, errors.New("outbound: a Resolver is required")
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	p := &Proxy{
		resolver:  cfg.Resolver,
		limits:    cfg.Limits.WithDefaults(),
		log:       log.With("component", "outbound"),
		transport: upstream.NewTransport(cfg.Transport),
		allow:     make(map[string]bool, len(cfg.AllowHosts)),
	}
	for _, h := range cfg.AllowHosts {
		h = strings.ToLower(strings.TrimSpace(h))
		if h == "" {
			return nil, errors.New("outbound: empty entry in allowHosts")
		}
		p.allow[h] = true
	}
	policies := cfg.Policies
	if policies == nil {
		policies = NewStaticPolicies(nil)
	}
	observer := cfg.Observer
	if observer == nil {
		observer = NopObserver{}
	}
	maxInFlight := cfg.MaxInFlight
	if maxInFlight <= 0 {
		maxInFlight = DefaultMaxInFlight
	}
	if cfg.Tracer != nil && cfg.Propagator == nil {
		return nil, errors.New("outbound: a Tracer needs a Propagator")
	}
	p.metrics = cfg.Metrics
	if cfg.HopID == "" {
		cfg.HopID = strconv.FormatUint(rand.Uint64(), 36)
	}
	p.hop = []string{cfg.HopID}
	p.chain = &chain{
		policies:    policies,
		states:      &stateRegistry{observer: observer, log: p.log, policies: policies},
		observer:    observer,
		log:         p.log,
		tracer:      cfg.Tracer,
		prop:        cfg.Propagator,
		propFields:  tracing.Fields(cfg.Propagator),
		metrics:     cfg.Metrics,
		recorder:    cfg.Recorder,
		send:        p.transport.Send,
		rand:        cfg.Rand,
		isOwn:       cfg.IsOwn,
		maxInFlight: int64(maxInFlight),
	}
	if cfg.Send != nil {
		p.chain.send, p.chain.modelled = cfg.Send, true
	}
	if cfg.Mesh != nil {
		p.chain.meshSend = cfg.Mesh.Send
	}
	p.fw = &forward.Forwarder{OnError: p.handleError, WriteTimeout: p.limits.WriteTimeout}
	return p, nil
}

// InFlight is the number of requests in flight to services now.
func (p *Proxy) InFlight() int64 { return p.chain.inFlight.Load() }

// Close releases pooled upstream connections and waits for CONNECT tunnels.
func (p *Proxy) Close() {
	p.transport.Close()
	p.tunnels.Wait()
}

// ServeHTTP routes one request from the app: the checks of its head, then
// route, then its body, then the call to a service or the transport to an
// allow-listed host.
func (p *Proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if v := downstream.TakeVerdict(r); v.Reason != "" {
		p.reject(w, r, forward.Refuse(forward.ReasonBadRequest, "", v.Reason))
		return
	}
	if hops, ok := r.Header[forward.HopHeader]; ok && p.sentBefore(hops) {
		p.reject(w, r, forward.Refuse(forward.ReasonLoop, "",
			"this request was forwarded by this sidecar already: discovery or a proxy sends it back here"))
		return
	}
	host := strings.ToLower(r.Host)
	if host == "" {
		p.reject(w, r, forward.Refuse(forward.ReasonBadRequest, "",
			"no Host header and no absolute URL: name the service you are calling"))
		return
	}
	if r.Method == http.MethodConnect {
		p.connect(w, r, host)
		return
	}
	if r.URL.Scheme != "" && r.URL.Scheme != "http" {
		p.reject(w, r, forward.Refuse(forward.ReasonBadRequest, "",
			"scheme "+r.URL.Scheme+" is not proxied; send plain http (use CONNECT for TLS to allowed hosts)"))
		return
	}
	if r.URL.User != nil { // RFC 9110, 4.2.4: it hides the real authority
		p.reject(w, r, forward.Refuse(forward.ReasonBadRequest, "", "userinfo (user@) in the request URL is not allowed"))
		return
	}

	// Unknown services are refused here, before any body is read.
	c, direct, lerr := p.route(r.Context(), r, host)
	if lerr != nil {
		p.reject(w, r, lerr)
		return
	}
	service := direct
	if c != nil {
		service = c.service
	}

	if r.Body != nil && r.Body != http.NoBody && r.ProtoMajor == 2 {
		// An HTTP/2 body (a gRPC stream above all) starts moving at once:
		// a bidi stream's first message may wait for the first answer.
		// It is recorded as it goes, so that a call whose body ended
		// within maxBufferedBody can be sent again.
		// Read through a BodyReader, as the inbound side reads it: a
		// body the client breaks (shorter than its content-length, its
		// stream reset) is the client's fault, answered 400 and never
		// charged to the upstream (retried, counted by the breaker).
		rb := &replayBody{src: downstream.NewBodyReader(w, r, p.limits.BodyReadTimeout)}
		r2 := *r
		r2.Body, r2.GetBody = rb, rb.replay
		r = &r2
		if c != nil && r.ContentLength != 0 {
			// A body that goes upstream (the Forwarder sends none for a
			// content-length of 0, and would never read it to its end).
			c.body = new(bodyEnd)
			rb.src = &endWatched{ReadCloser: rb.src, end: c.body}
		}
	} else if r.Body != nil && r.Body != http.NoBody {
		body, err := p.prepareBody(w, r)
		if err != nil {
			p.replyError(w, r, forward.LocalReply(service, err), err)
			return
		}
		r2 := *r
		r2.Body, r2.ContentLength, r2.GetBody = body.rc, body.length, body.getBody
		if body.getBody != nil {
			r2.TransferEncoding = nil
		} else if c != nil {
			// Larger than the sidecar holds: it streams on, and the
			// deadlines count from its end.
			c.body = new(bodyEnd)
			r2.Body = &endWatched{ReadCloser: r2.Body, end: c.body}
		}
		r = &r2
	}
	if c == nil {
		p.fw.Forward(w, r, p.transport, direct)
		return
	}
	p.markHop(r.Header)
	p.fw.Forward(w, r, c, "")
}

// markHop adds this proxy's hop marker to the header of a request it
// sends to a service. The marker goes on after the client's Connection
// header has named its options, which could otherwise take it off again.
func (p *Proxy) markHop(h http.Header) {
	forward.RemoveConnectionOptions(h)
	if prior, ok := h[forward.HopHeader]; ok {
		h[forward.HopHeader] = append(prior[:len(prior):len(prior)], p.hop...)
	} else {
		h[forward.HopHeader] = p.hop
	}
}

// sentBefore reports whether a request's hop markers hold this proxy's.
func (p *Proxy) sentBefore(hops []string) bool {
	for _, v := range hops {
		for _, id := range strings.Split(v, ",") {
			if strings.TrimSpace(id) == p.hop[0] {
				return true
			}
		}
	}
	return false
}

func (p *Proxy) allowed(host string) bool {
	if len(p.allow) == 0 {
		return false
	}
	if p.allow[host] {
		return true
	}
	h, _, err := net.SplitHostPort(host)
	return err == nil && p.allow[strings.TrimSuffix(strings.TrimPrefix(h, "["), "]")]
}

type preparedBody struct {
	rc      io.ReadCloser
	length  int64
	getBody func() (io.ReadCloser, error)
}

// prepareBody reads a body of up to maxBufferedBody into memory before
// anything is forwarded; a larger one streams on from what was read.
func (p *Proxy) prepareBody(w http.ResponseWriter, r *http.Request) (preparedBody, error) {
	br := downstream.NewBodyReader(w, r, p.limits.BodyReadTimeout)
	if r.ContentLength > maxBufferedBody || (r.ContentLength < 0 && len(r.Trailer) > 0) {
		return preparedBody{rc: br, length: r.ContentLength}, nil
	}
	size := r.ContentLength
	if size < 0 {
		size = 512
	}
	buf := make([]byte, 0, size+1)
	for len(buf) <= maxBufferedBody {
		if len(buf) == cap(buf) {
			buf = append(buf, 0)[:len(buf)]
		}
		n, err := br.Read(buf[len(buf):min(cap(buf), maxBufferedBody+1)])
		buf = buf[:len(buf)+n]
		if err == io.EOF {
			data := buf
			get := func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(data)), nil }
			rc, _ := get()
			return preparedBody{rc: rc, length: int64(len(data)), getBody: get}, nil
		}
		if err != nil {
			return preparedBody{}, err
		}
	}
	// Too large to hold: stream the rest after what was read.
	return preparedBody{rc: &prefixedBody{prefix: buf, rest: br}, length: r.ContentLength}, nil
}

// replayBody passes a request body through while recording up to
// maxBufferedBody of it; once the body has ended within that, replay gives
// it again from the start. Reads come from one attempt at a time: a retry
// starts only after the attempt before it ended, and replays only a body
// whose end was read. Safe for one reader at a time plus replay calls.
type replayBody struct {
	src      io.ReadCloser
	mu       sync.Mutex // guards the fields below
	buf      []byte
	started  bool // a read was begun
	complete bool // src ended within maxBufferedBody
	overflow bool // more than maxBufferedBody went by: no replay
}

func (b *replayBody) Read(p []byte) (int, error) {
	b.mu.Lock()
	b.started = true // a reader has the body, even while this read waits
	b.mu.Unlock()
	n, err := b.src.Read(p)
	b.mu.Lock()
	if !b.overflow {
		if len(b.buf)+n > maxBufferedBody {
			b.overflow, b.buf = true, nil
		} else {
			b.buf = append(b.buf, p[:n]...)
		}
	}
	if err == io.EOF && !b.overflow {
		b.complete = true
	}
	b.mu.Unlock()
	return n, err
}

func (b *replayBody) Close() error { return b.src.Close() }

// replay is the request's GetBody: the whole body again, if it ended
// within the record.
func (b *replayBody) replay() (io.ReadCloser, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	switch {
	case !b.started:
		// Nothing was read yet (the connection failed before the body was
		// written): the body itself goes with the next try.
		return b, nil
	case !b.complete:
		return nil, errNotReplayable
	}
	return io.NopCloser(bytes.NewReader(b.buf)), nil
}

var errNotReplayable = errors.New("request body still streaming or larger than 64 KiB: not replayable")

type prefixedBody struct {
	prefix []byte
	rest   io.ReadCloser
}

func (b *prefixedBody) Read(p []byte) (int, error) { return readahead.Read(&b.prefix, b.rest, p) }

func (b *prefixedBody) Close() error { return b.rest.Close() }

// reject answers a request refused before it was sent anywhere.
func (p *Proxy) reject(w http.ResponseWriter, r *http.Request, e *forward.LocalError) {
	p.metrics.Rejected(metrics.Outbound, e.Reason)
	if rec := p.chain.recorder; rec != nil {
		// A name mistyped, a host not allowed: the mistakes sidecar why,
		// the tap and the access log are first asked about.
		rec.RecordUnrouted(&requestlog.Request{Time: time.Now(), Service: discovery.ServiceName(r.Host), Method: r.Method,
			Path: r.URL.EscapedPath(), Status: e.Status, Reason: e.Reason, Detail: e.Detail, Attempts: []requestlog.Attempt{}})
	}
	forward.WriteError(w, r, e)
}

// handleError is the Forwarder's: it answers a request that could not be
// sent or answered. A call's errors come as the LocalError of its service
// (the chain maps them); others, to an allow-listed host, are mapped for
// the host.
func (p *Proxy) handleError(w http.ResponseWriter, r *http.Request, err error) {
	p.replyError(w, r, forward.LocalReply(discovery.ServiceName(r.Host), err), err)
}

// replyError answers with e, the local reply to err.
func (p *Proxy) replyError(w http.ResponseWriter, r *http.Request, e *forward.LocalError, err error) {
	if e.Status == StatusClientClosed {
		// Nobody to answer; abort rather than let net/http send an
		// implicit 200.
		panic(http.ErrAbortHandler)
	}
	p.log.Debug("request failed", "service", e.Service, "reason", e.Reason, "err", err)
	forward.WriteError(w, r, e)
}

// StatusClientClosed is the status recorded for a request whose client went
// away before it was answered (nginx's 499). It is never written.
const StatusClientClosed = forward.StatusClientClosed

// routeError maps a discovery error to the local error of DESIGN.md.
func routeError(service string, err error) *forward.LocalError {
	switch {
	case errors.Is(err, discovery.ErrUnknownService):
		return forward.Refuse(forward.ReasonUnknownService, service, "no discovery source knows this service")
	case errors.Is(err, discovery.ErrNoAnswer):
		return forward.Refuse(forward.ReasonNoHealthyEndpoints, service, err.Error())
	}
	return forward.LocalReply(service, err)
}

// SetConnServer gives the proxy the server of its own listener, so that a
// CONNECT tunnel to a service is served as a connection to that listener.
// Without it CONNECT reaches allow-listed hosts only. Call it before the
// listener serves.
func (p *Proxy) SetConnServer(serve func(c net.Conn, buffered []byte)) { p.serveConn = serve }

// connect answers CONNECT host:port. To an allow-listed host the tunnel is
// spliced to it. To a service discovery knows (what grpc-js, gRPC's C
// core, undici's ProxyAgent and websocket dialers send through an HTTP
// proxy, even for plain http:// targets) the tunnel is served as a
// connection to the outbound port itself: HTTP/1.1 or h2c inside, each
// request through the whole chain, routed by its own Host as any request
// is. Anything else is refused, with what would make it work.
func (p *Proxy) connect(w http.ResponseWriter, r *http.Request, host string) {
	if p.allowed(host) {
		p.tunnel(downstream.HijackAware(w, r), r)
		return
	}
	if discovery.IsIPLiteral(host) {
		p.reject(w, r, forward.Refuse(forward.ReasonNotAllowed, "",
			"CONNECT to an IP address is not allowed; call the service by name, or add "+host+" to allowHosts"))
		return
	}
	service := discovery.ServiceName(host)
	if !discovery.ValidServiceName(service) {
		p.reject(w, r, forward.Refuse(forward.ReasonBadRequest, "", "CONNECT to "+policy.Quote(host)+": not a service name"))
		return
	}
	if _, err := p.resolver.Resolve(r.Context(), service); err != nil {
		e := routeError(service, err)
		if e.Reason == forward.ReasonUnknownService {
			e.Detail = "no discovery source knows this service; CONNECT reaches services discovery knows, and external hosts in allowHosts"
		}
		p.reject(w, r, e)
		return
	}
	if p.serveConn == nil || r.ProtoMajor != 1 {
		p.reject(w, r, forward.Refuse(forward.ReasonBadRequest, service,
			"CONNECT to a service needs HTTP/1.1; or send the request itself to this port"))
		return
	}
	conn, brw, err := http.NewResponseController(downstream.HijackAware(w, r)).Hijack()
	if err != nil {
		p.reject(w, r, forward.Refuse(forward.ReasonBadRequest, service, "CONNECT needs HTTP/1.1"))
		return
	}
	_ = conn.SetDeadline(time.Time{})
	if _, err := conn.Write([]byte("HTTP/1.1 200 Connection Established\r\n\r\n")); err != nil {
		_ = conn.Close()
		return
	}
	var buffered []byte
	if n := brw.Reader.Buffered(); n > 0 {
		buffered, _ = brw.Reader.Peek(n)
		buffered = append([]byte(nil), buffered...)
	}
	p.serveConn(conn, buffered)
}

// tunnel serves CONNECT to an allow-listed host:port by splicing the two
// connections until either side closes.
func (p *Proxy) tunnel(w http.ResponseWriter, r *http.Request) {
	if r.ProtoMajor != 1 {
		// Refused before the dial: no connection to the host for nothing.
		p.reject(w, r, forward.Refuse(forward.ReasonBadRequest, "", "CONNECT needs HTTP/1.1"))
		return
	}
	p.tunnels.Add(1)
	defer p.tunnels.Done()
	dst, err := p.transport.Dial(r.Context(), r.Host, 0)
	if err != nil {
		p.handleError(w, r, err)
		return
	}
	src, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		_ = dst.Close()
		p.reject(w, r, forward.Refuse(forward.ReasonBadRequest, "", "CONNECT needs HTTP/1.1"))
		return
	}
	_ = src.SetDeadline(time.Time{})
	if _, err := src.Write([]byte("HTTP/1.1 200 Connection Established\r\n\r\n")); err != nil {
		_ = src.Close()
		_ = dst.Close()
		return
	}
	forward.Splice(src, brw.Reader, dst, p.limits.WriteTimeout)
}
