package upstream

import (
	"cmp"
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
	dialer    net.Dialer

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
	m := &MeshTransport{cfg: cfg, clientTLS: clientTLS, transports: map[meshKey]*Transport{}}
	m.dialer = net.Dialer{Timeout: cmp.Or(cfg.DialTimeout, time.Second), KeepAlive: 30 * time.Second}
	return m
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
	cfg.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		return m.dialTLS(ctx, network, addr, k)
	}
	t := NewTransport(cfg)
	m.transports[k] = t
	return t, nil
}

// dialTLS connects to addr and makes the mesh handshake, as an instance of
// k's service must answer it, within the request's connect timeout,
// offering HTTP/2 only to a transport of HTTP/2 requests.
func (m *MeshTransport) dialTLS(ctx context.Context, network, addr string, k meshKey) (net.Conn, error) {
	timeout, _ := ctx.Value(connectTimeoutKey{}).(time.Duration)
	timeout = cmp.Or(timeout, m.dialer.Timeout)
	dctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	dial := m.cfg.DialContext
	if dial == nil {
		dial = m.dialer.DialContext
	}
	c, err := dial(dctx, network, addr)
	if err != nil {
		if ctx.Err() == nil && errors.Is(err, context.DeadlineExceeded) {
			err = ErrConnectTimeout
		}
		return nil, &ConnectError{Addr: addr, Err: err}
	}
	cfg := m.clientTLS(k.service)
	if cfg == nil {
		c.Close()
		return nil, &ConnectError{Addr: addr, Err: &TLSError{Addr: addr, Err: errors.New("no certificate of this sidecar's yet")}}
	}
	cfg.NextProtos = []string{"http/1.1"}
	if k.h2 {
		cfg.NextProtos = []string{"h2", "http/1.1"}
	}
	tc := tls.Client(c, cfg)
	if err := tc.HandshakeContext(dctx); err != nil {
		c.Close()
		if ctx.Err() == nil && errors.Is(err, context.DeadlineExceeded) {
			err = ErrConnectTimeout
		}
		return nil, &ConnectError{Addr: addr, Err: &TLSError{Addr: addr, Err: err}}
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
