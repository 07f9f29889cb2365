package sidecar

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/downstream"
	"github.com/sidecar-mesh/sidecar/pkg/forward"
	"github.com/sidecar-mesh/sidecar/pkg/loopback"
	"github.com/sidecar-mesh/sidecar/pkg/mesh"
	"github.com/sidecar-mesh/sidecar/pkg/upstream"
)

// meshSide is the sidecar in the service mesh (mesh.mode consul-connect):
// its identity and the intentions that authorize its callers, both kept
// current from the Consul agent, the mutual-TLS inbound listener in front
// of the app, and the transport that calls the mesh's endpoints over
// mutual TLS.
type meshSide struct {
	identity  *mesh.Identity
	authz     *mesh.Authorizer
	transport *upstream.MeshTransport
	server    *downstream.Server // the inbound TLS listener

	handshakes *prometheus.CounterVec
	denied     *prometheus.CounterVec

	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// newMeshSide builds the mesh's identity, authorizer and outbound
// transport for the app's service, both fed by agent, and registers their
// metrics. Nothing runs until start.
func (s *Sidecar) newMeshSide(agent mesh.Agent) (*meshSide, error) {
	cfg := s.cfg
	id, err := mesh.NewIdentity(agent, cfg.Service, s.log)
	if err != nil {
		return nil, err
	}
	m := &meshSide{identity: id, authz: mesh.NewAuthorizer(agent, cfg.Service, s.log)}
	m.handshakes = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "sidecar_mesh_handshakes_total",
		Help: "Mutual-TLS handshakes of the mesh, by direction (inbound: a caller's; outbound: with an endpoint) and result: ok, or why the peer was refused (no_certificate, untrusted, expired, key_usage, not_service, trust_domain, wrong_service, not_ready)."},
		[]string{"direction", "result"})
	m.denied = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "sidecar_mesh_denied_total",
		Help: "Inbound requests the mesh's intentions did not allow, by the calling service (from its certificate)."},
		[]string{"caller"})
	s.registry.MustRegister(m.handshakes, m.denied,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "sidecar_mesh_certificate_expiry_seconds",
			Help: "Seconds until this sidecar's mesh certificate expires (0 without one); it is renewed well before."},
			id.SecondsToExpiry))
	m.transport = upstream.NewMeshTransport(upstream.TransportConfig{MaxResponseHeaderBytes: cfg.Limits.MaxResponseHeaderBytes},
		func(service string) *tls.Config {
			if !id.Ready() {
				return nil
			}
			c := id.ClientTLS(service)
			m.countHandshakes(c, "outbound")
			return c
		})
	return m, nil
}

// countHandshakes counts c's handshakes by their outcome.
func (m *meshSide) countHandshakes(c *tls.Config, direction string) {
	verify := c.VerifyConnection
	c.VerifyConnection = func(cs tls.ConnectionState) error {
		err := verify(cs)
		result := "ok"
		if pe := (*mesh.PeerError)(nil); errors.As(err, &pe) {
			result = string(pe.Reason)
		} else if err != nil {
			result = "error"
		}
		m.handshakes.WithLabelValues(direction, result).Inc()
		return err
	}
}

// listen binds the mutual-TLS inbound listener in front of app.
func (m *meshSide) listen(s *Sidecar, app http.Handler) error {
	c := m.identity.ServerTLS()
	m.countHandshakes(c, "inbound")
	var err error
	m.server, err = downstream.ListenTLS("mesh-inbound", s.cfg.Mesh.InboundTLSAddr(), m.gate(app), downstream.Limits{}, s.log, c)
	return err
}

// gate authorizes each request of the TLS listener by the mesh's
// intentions: the caller is the service its certificate names; a caller
// the intentions do not allow is answered 403 not_authorized (gRPC:
// PERMISSION_DENIED) and counted, and never reaches the app. The request
// is first normalized as the mesh config entry asks of Consul's proxies
// (mesh.Normalization: headers with underscores, escaped slashes, then
// the path normalized, mesh.CanonicalPath, unless turned off, then
// slashes merged), and the app is sent the path the intentions judged:
// "/public/../admin" or "/%61dmin" cannot pass a deny of "/admin" and then
// reach the app's /admin.
func (m *meshSide) gate(app http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		cs := downstream.PeerTLS(r)
		if cs == nil {
			refuse(w, r, forward.Refuse(forward.ReasonNotAuthorized, "", "no mesh TLS connection"))
			return
		}
		caller, err := mesh.CallerService(*cs)
		if err != nil {
			refuse(w, r, forward.Refuse(forward.ReasonNotAuthorized, "", "the caller's certificate names no service: "+err.Error()))
			return
		}
		if !normalize(w, r, m.authz.Normalization()) {
			return
		}
		d := m.authz.AuthorizeCaller(caller, r)
		if !d.Allowed {
			m.denied.WithLabelValues(caller.Service).Inc()
			refuse(w, r, forward.Refuse(forward.ReasonNotAuthorized, "",
				caller.Service+" may not call this service: "+d.By))
			return
		}
		app.ServeHTTP(w, r)
	})
}

// normalize makes r what the intentions judge and the app is sent, as n
// asks: headers with an underscore in their name refused or dropped, and
// the path normalized (n.Path). A request n refuses is answered 400, one
// it redirects 307 to its path normalized (a gRPC call, which cannot
// follow it, 400), as Envoy answers them; false then.
func normalize(w http.ResponseWriter, r *http.Request, n mesh.Normalization) bool {
	switch n.HeadersWithUnderscoresAction {
	case mesh.UnderscoresReject:
		if name := mesh.Underscored(r.Header); name != "" {
			refuse(w, r, forward.Refuse(forward.ReasonBadRequest, "", "the header "+strconv.Quote(name)+
				" has an underscore in its name, which the mesh's configuration refuses (headers_with_underscores_action "+mesh.UnderscoresReject+")"))
			return false
		}
	case mesh.UnderscoresDrop:
		mesh.DropUnderscored(r.Header)
	}
	raw := mesh.RawPath(r)
	if raw == "" {
		raw = "/" // an absolute URL without a path: "/" is what is sent
	}
	if !strings.HasPrefix(raw, "/") || strings.IndexByte(raw, '#') >= 0 {
		// "*", or a fragment, which no client sends: Envoy refuses both.
		refuse(w, r, forward.Refuse(forward.ReasonBadRequest, "", "the request's path "+strconv.Quote(raw)+
			" is not a path the mesh serves (it must start with '/' and carry no fragment)"))
		return false
	}
	path, outcome, err := n.Path(raw)
	switch {
	case outcome == mesh.PathReject:
		refuse(w, r, forward.Refuse(forward.ReasonBadRequest, "", err.Error()))
		return false
	case outcome == mesh.PathRedirect && upstream.IsGRPC(r):
		refuse(w, r, forward.Refuse(forward.ReasonBadRequest, "",
			"the path has an escaped slash or backslash, which the mesh's configuration redirects (path_with_escaped_slashes_action "+
				mesh.EscapedSlashesRedirect+"), and a gRPC call cannot follow a redirect"))
		return false
	}
	// The app must be sent the path judged, byte for byte: the URL's
	// escaped path is what the request to it carries, and Go rebuilds it
	// from the decoded path when the escaped one is not a valid encoding
	// ("/a%2Fb{" would go out as "/a/b%7B": a slash the intentions never
	// saw). A path that cannot go out as judged is refused.
	if r.URL.EscapedPath() != path {
		unescaped, err := url.PathUnescape(path)
		if err != nil {
			refuse(w, r, forward.Refuse(forward.ReasonBadRequest, "", err.Error()))
			return false
		}
		r.URL.Path, r.URL.RawPath = unescaped, path
		if r.URL.EscapedPath() != path {
			refuse(w, r, forward.Refuse(forward.ReasonBadRequest, "", "the request's path "+strconv.Quote(raw)+
				" cannot be sent on as the mesh judged it: escape its reserved characters"))
			return false
		}
		r.RequestURI = r.URL.RequestURI()
	}
	if outcome == mesh.PathRedirect {
		if v := downstream.TakeVerdict(r); v.Reason != "" {
			forward.WriteError(w, r, forward.Refuse(forward.ReasonBadRequest, "", v.Reason))
			return false
		}
		w.Header().Set("Location", r.RequestURI)
		w.WriteHeader(http.StatusTemporaryRedirect)
		return false
	}
	return true
}

// refuse answers a request the mesh stops before the proxy behind it runs.
// The request's framing verdict is taken here, as the proxy would have
// taken it (left queued, every refused request on a connection would keep
// one), and a request the framing check rejected is answered 400 as the
// proxy answers it.
func refuse(w http.ResponseWriter, r *http.Request, e *forward.LocalError) {
	if v := downstream.TakeVerdict(r); v.Reason != "" {
		e = forward.Refuse(forward.ReasonBadRequest, "", v.Reason)
	}
	forward.WriteError(w, r, e)
}

// start follows the identity and the intentions until stop.
func (m *meshSide) start() {
	ctx, cancel := context.WithCancel(context.Background())
	m.cancel = cancel
	m.wg.Go(func() { m.identity.Run(ctx) })
	m.wg.Go(func() { m.authz.Run(ctx) })
}

// stop ends what start started and closes the outbound connections.
func (m *meshSide) stop() {
	if m.cancel != nil {
		m.cancel()
	}
	m.wg.Wait()
	m.transport.Close()
}

// ready is the mesh's part of the sidecar's readiness: its certificate
// and the intentions are held.
func (m *meshSide) ready() error {
	switch {
	case !m.identity.Ready():
		return errors.New("no mesh certificate from the Consul agent yet")
	case !m.authz.Ready():
		return errors.New("no intentions from the Consul agent yet")
	}
	return nil
}

// sidecarProxy is the app's sidecar proxy in Consul: the TLS listener,
// which is bound.
func (m *meshSide) sidecarProxy(appPort int) (*discovery.SidecarProxy, error) {
	_, port, err := net.SplitHostPort(m.server.Addr().String())
	if err != nil {
		return nil, err
	}
	p, err := strconv.Atoi(port)
	if err != nil {
		return nil, err
	}
	return &discovery.SidecarProxy{Port: p, AppPort: appPort}, nil
}

// loopbackOnly serves the plaintext inbound listener to the pod only (in
// the mesh, with plaintextInbound deny): any other caller is answered 403
// not_authorized, told to come through the mesh.
func loopbackOnly(next http.Handler, tlsAddr string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !loopback.Peer(r) {
			refuse(w, r, forward.Refuse(forward.ReasonNotAuthorized, "",
				"in the mesh the plaintext inbound port serves this pod only; call through the mesh (its mutual-TLS port "+tlsAddr+")"))
			return
		}
		next.ServeHTTP(w, r)
	})
}
