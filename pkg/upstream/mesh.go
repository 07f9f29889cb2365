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
// Each service called has a pooled transport of its own, whose connections
// present this sidecar's certificate and accept only a peer that proves to
// be that service (ClientTLS decides both); it speaks HTTP/2 when the peer
// offers it by ALPN, else HTTP/1.1, and resumes TLS sessions, so that a
// handshake is paid per connection, not per request. Safe for concurrent
// use.
type MeshTransport struct {
	cfg       TransportConfig
	clientTLS func(service string) *tls.Config
	dialer    net.Dialer

	mu         sync.Mutex
	transports map[string]*http.Transport
	closed     bool
}

// NewMeshTransport returns a MeshTransport whose connections to a service's
// endpoints use clientTLS(service), with cfg's timeouts and limits.
func NewMeshTransport(cfg TransportConfig, clientTLS func(service string) *tls.Config) *MeshTransport {
	m := &MeshTransport{cfg: cfg, clientTLS: clientTLS, transports: map[string]*http.Transport{}}
	m.dialer = net.Dialer{Timeout: cmp.Or(cfg.DialTimeout, time.Second), KeepAlive: 30 * time.Second}
	return m
}

// Send sends req to the endpoint in its URL host, an instance of service,
// connecting (the TCP connect and the TLS handshake) within
// connectTimeout. A failed connect or handshake is a *ConnectError, a
// handshake's wrapping a *TLSError; a failure once connected an
// *UpstreamError.
func (m *MeshTransport) Send(req *http.Request, service string, connectTimeout time.Duration) (*http.Response, error) {
	t, err := m.transport(service)
	if err != nil {
		CloseBody(req)
		return nil, err
	}
	out := *req
	u := *req.URL
	u.Scheme = "https"
	out.URL = &u
	if connectTimeout > 0 {
		out = *out.WithContext(context.WithValue(req.Context(), connectTimeoutKey{}, connectTimeout))
	}
	resp, err := t.RoundTrip(&out)
	if err == nil {
		return resp, nil
	}
	var ce *ConnectError
	switch {
	case errors.As(err, &ce):
		return nil, ce
	case req.Context().Err() != nil:
		return nil, req.Context().Err()
	}
	return nil, &UpstreamError{Addr: req.URL.Host, Op: "round trip", Written: true, Err: err}
}

// transport is service's pooled transport, made on its first request.
func (m *MeshTransport) transport(service string) (*http.Transport, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, errors.New("mesh transport closed")
	}
	if t := m.transports[service]; t != nil {
		return t, nil
	}
	t := &http.Transport{
		DialTLSContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return m.dialTLS(ctx, network, addr, service)
		},
		ForceAttemptHTTP2:      true,
		MaxIdleConnsPerHost:    cmp.Or(m.cfg.MaxIdleConnsPerHost, 256),
		IdleConnTimeout:        cmp.Or(m.cfg.IdleConnTimeout, 30*time.Second),
		ResponseHeaderTimeout:  cmp.Or(m.cfg.ResponseHeaderTimeout, 15*time.Second),
		MaxResponseHeaderBytes: int64(cmp.Or(m.cfg.MaxResponseHeaderBytes, DefaultMaxResponseHeaderBytes)),
		DisableCompression:     true,
	}
	m.transports[service] = t
	return t, nil
}

// dialTLS connects to addr and makes the mesh handshake, as an instance of
// service must answer it, within the request's connect timeout.
func (m *MeshTransport) dialTLS(ctx context.Context, network, addr, service string) (net.Conn, error) {
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
	cfg := m.clientTLS(service)
	if cfg == nil {
		c.Close()
		return nil, &ConnectError{Addr: addr, Err: &TLSError{Addr: addr, Err: errors.New("no certificate of this sidecar's yet")}}
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

// Close closes every idle connection; no request is sent afterwards.
func (m *MeshTransport) Close() {
	m.mu.Lock()
	m.closed = true
	m.mu.Unlock()
	m.CloseIdleConnections()
}
