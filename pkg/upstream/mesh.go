package upstream

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/http"
	"sync"
	"time"
)

// TLSError reports a mesh TLS handshake with an endpoint that failed, or an
// endpoint that did not prove to be the service called. It comes wrapped in
// a *ConnectError: nothing of the request was sent, so it is retried as a
// connect failure is, for any method.
type TLSError struct {
	Addr string
	Err  error
}

func (e *TLSError) Error() string { return "TLS handshake with " + e.Addr + ": " + e.Err.Error() }
func (e *TLSError) Unwrap() error { return e.Err }

// MeshTransport sends requests to endpoints of the mesh over mutual TLS.
// Each service called has pooled transports of its own, whose connections
// present this sidecar's certificate and accept only a peer that proves to
// be that service (ClientTLS decides both). They are this package's
// Transport, the plaintext path's, over TLS connections: an answer is
// held to the same rules (head limits, at most 5 interim answers, framing,
// a pooled connection checked when returned and before reuse, headers
// that Connection names dropped) and refused the same way. As the
// plaintext transport does, it sends an HTTP/1.x request over HTTP/1.1
// (ALPN http/1.1: many pooled connections, upgrades possible) and an
// HTTP/2 request (gRPC) over HTTP/2 when the peer offers it; TLS sessions
// are resumed, so that a handshake is paid per connection, not per
// request. Safe for concurrent use.
type MeshTransport struct {
	cfg       TransportConfig
	clientTLS func(service string) *tls.Config

	mu         sync.Mutex
	transports map[meshKey]*Transport
	closed     bool
}

// meshKey names one pooled transport: a service, over HTTP/2 or not.
type meshKey struct {
	service string
	h2      bool
}

// NewMeshTransport returns a MeshTransport whose connections to a service's
// endpoints use clientTLS(service), with cfg's timeouts and limits.
func NewMeshTransport(cfg TransportConfig, clientTLS func(service string) *tls.Config) *MeshTransport {
	return &MeshTransport{cfg: cfg, clientTLS: clientTLS, transports: map[meshKey]*Transport{}}
}

// Send sends req to the endpoint in its URL host, an instance of service,
// connecting (the TCP connect and the TLS handshake) within
// connectTimeout. A failed connect or handshake is a *ConnectError, a
// handshake's wrapping a *TLSError; failures once connected are the
// plaintext Transport's (*UpstreamError, *BadResponseError).
func (m *MeshTransport) Send(req *http.Request, service string, connectTimeout time.Duration) (*http.Response, error) {
	t, err := m.transport(meshKey{service: service, h2: req.ProtoMajor == 2})
	if err != nil {
		CloseBody(req)
		return nil, err
	}
	if req.URL.Scheme != "http" {
		out := *req
		u := *req.URL
		u.Scheme = "http" // the transport's; the connection is TLS all the same
		out.URL = &u
		req = &out
	}
	return t.Send(req, connectTimeout)
}

// transport is k's pooled transport, made on its first request.
func (m *MeshTransport) transport(k meshKey) (*Transport, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, errors.New("mesh transport closed")
	}
	if t := m.transports[k]; t != nil {
		return t, nil
	}
	cfg := m.cfg
	cfg.Handshake = func(ctx context.Context, c net.Conn, addr string) (net.Conn, error) {
		return m.handshake(ctx, c, addr, k)
	}
	t := NewTransport(cfg)
	m.transports[k] = t
	return t, nil
}

// handshake makes the mesh handshake on c, connected to addr, as an
// instance of k's service must answer it, offering HTTP/2 only to a
// transport of HTTP/2 requests. The Transport bounds it with the connect
// timeout and classifies its failure: a *TLSError, a connect failure.
func (m *MeshTransport) handshake(ctx context.Context, c net.Conn, addr string, k meshKey) (net.Conn, error) {
	cfg := m.clientTLS(k.service)
	if cfg == nil {
		c.Close()
		return nil, &TLSError{Addr: addr, Err: errors.New("no certificate of this sidecar's yet")}
	}
	cfg.NextProtos = []string{"http/1.1"}
	if k.h2 {
		cfg.NextProtos = []string{"h2", "http/1.1"}
	}
	tc := tls.Client(c, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		c.Close()
		return nil, &TLSError{Addr: addr, Err: err}
	}
	return tc, nil
}

// CloseIdleConnections closes every service's idle connections.
func (m *MeshTransport) CloseIdleConnections() {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, t := range m.transports {
		t.CloseIdleConnections()
	}
}

// Close stops every transport and closes its idle connections; no request
// is sent afterwards.
func (m *MeshTransport) Close() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.closed = true
	for _, t := range m.transports {
		t.Close()
	}
}
