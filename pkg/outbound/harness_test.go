package outbound_test

import (
	"bufio"
	"cmp"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	"go.uber.org/goleak"

	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/downstream"
	"github.com/sidecar-mesh/sidecar/pkg/engine"
	"github.com/sidecar-mesh/sidecar/pkg/metrics"
	"github.com/sidecar-mesh/sidecar/pkg/outbound"
	"github.com/sidecar-mesh/sidecar/pkg/policy"
	"github.com/sidecar-mesh/sidecar/pkg/requestlog"
	"github.com/sidecar-mesh/sidecar/pkg/upstream"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// server is a real HTTP server that counts the requests it was handed.
type server struct {
	*httptest.Server
	requests atomic.Int64
}

func newUpstream(t *testing.T, h http.HandlerFunc) *server {
	t.Helper()
	u := &server{}
	u.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u.requests.Add(1)
		h(w, r)
	}))
	t.Cleanup(u.Close)
	return u
}

func (u *server) addr() string { return strings.TrimPrefix(u.URL, "http://") }

// sidecar is the outbound proxy on a real loopback listener.
type sidecar struct {
	addr     string
	dials    atomic.Int64
	proxy    *outbound.Proxy
	recorder *requestlog.Recorder // as the sidecar runs it: on, no access log
}

type options struct {
	static     map[string][]string
	allowHosts []string
	limits     downstream.Limits
	transport  upstream.TransportConfig
	policies   string // Policy documents (YAML)
	// isOwn is the proxy's IsOwn.
	isOwn func(netip.AddrPort) bool
	// listen is the listener's address; "": 127.0.0.1:0.
	listen string
	// arrivals, when set, counts the requests the listener serves.
	arrivals *atomic.Int64
	// telemetry, when set, gives the proxy a tracer, propagator and
	// request metrics (the benchmarks' "sidecar-telemetry").
	telemetry *telemetry
	// observer is the proxy's Observer; nil: none.
	observer outbound.Observer
	// recorder is the proxy's Recorder; nil: a new one with the
	// defaults.
	recorder *requestlog.Recorder
	// loops runs the listener on the event-loop engine, whatever
	// SIDECAR_TEST_ENGINE says.
	loops bool
	// meshTLS, when set, makes the static endpoints mesh endpoints,
	// called over TLS with this client configuration.
	meshTLS *tls.Config
}

type telemetry struct {
	tracer  trace.Tracer
	prop    propagation.TextMapPropagator
	metrics *metrics.Requests
}

func startSidecar(t testing.TB, o options) *sidecar {
	t.Helper()
	static, err := discovery.NewStatic(o.static)
	if err != nil {
		t.Fatalf("NewStatic: %v", err)
	}
	sc := &sidecar{recorder: o.recorder}
	if sc.recorder == nil {
		sc.recorder = requestlog.New(requestlog.Config{})
	}
	// SIDECAR_TEST_ENGINE=loops runs the listener on the event-loop
	// engine (its loops serve the plain HTTP/1.1 requests, the rest is
	// handed off), but for tests that count arrivals at the handler or
	// dial through a dialer of their own, which the engine's loops bypass.
	loops := (o.loops || os.Getenv("SIDECAR_TEST_ENGINE") == "loops") && o.arrivals == nil && o.transport.DialContext == nil
	dial := o.transport.DialContext
	if dial == nil {
		var d net.Dialer
		dial = d.DialContext
	}
	o.transport.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		sc.dials.Add(1)
		return dial(ctx, network, addr)
	}
	ps, err := policy.Parse([]byte(o.policies), "test policies")
	if err != nil {
		t.Fatalf("policies: %v", err)
	}
	var resolver discovery.Resolver = discovery.Chain{static}
	if o.meshTLS != nil {
		resolver = meshResolver{resolver, &sync.Map{}}
	}
	cfg := outbound.Config{
		Resolver:   resolver,
		Policies:   outbound.NewStaticPolicies(ps),
		AllowHosts: o.allowHosts,
		Transport:  o.transport,
		Limits:     o.limits,
		IsOwn:      o.isOwn,
		Observer:   o.observer,
		Recorder:   sc.recorder,
	}
	if o.telemetry != nil {
		cfg.Tracer, cfg.Propagator, cfg.Metrics = o.telemetry.tracer, o.telemetry.prop, o.telemetry.metrics
	}
	if o.meshTLS != nil {
		mt := upstream.NewMeshTransport(o.transport, func(string) *tls.Config { return o.meshTLS.Clone() })
		t.Cleanup(mt.Close)
		cfg.Mesh = mt
	}
	sc.proxy, err = outbound.New(cfg)
	if err != nil {
		t.Fatalf("outbound.New: %v", err)
	}
	var h http.Handler = sc.proxy
	if o.arrivals != nil {
		h = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			o.arrivals.Add(1)
			sc.proxy.ServeHTTP(w, r)
		})
	}
	srv, err := downstream.Listen("outbound", cmp.Or(o.listen, "127.0.0.1:0"), h, o.limits, nil)
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	sc.addr = srv.Addr().String()
	sc.proxy.SetConnServer(srv.ServeConn)
	done := make(chan error, 2)
	var e *engine.Engine
	if loops {
		e, err = engine.New(srv.RawListener(), engine.Config{Loops: 1, Handler: sc.proxy.LoopHandler(), Limits: o.limits, Transport: o.transport,
			Handoff: func(c net.Conn, b []byte) { srv.ServeConn(c, b) }})
		if err != nil {
			t.Fatalf("engine.New: %v", err)
		}
		go func() { done <- e.Serve() }()
		go func() { done <- srv.ServeConns() }()
	} else {
		go func() { done <- srv.Serve() }()
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if e != nil {
			if err := e.Shutdown(ctx); err != nil {
				t.Errorf("engine Shutdown: %v", err)
			}
			if err := <-done; err != nil {
				t.Errorf("engine Serve: %v", err)
			}
		}
		if err := srv.Shutdown(ctx); err != nil {
			_ = srv.Close()
		}
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
		sc.proxy.Close()
		sc.recorder.Close()
	})
	return sc
}

// client returns an HTTP client that sends every request to the sidecar.
func (sc *sidecar) client(t *testing.T) *http.Client {
	t.Helper()
	tr := &http.Transport{
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, sc.addr)
		},
		MaxIdleConnsPerHost: 64,
	}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 10 * time.Second}
}

// get sends GET http://host/path through the sidecar (Host-header form).
func (sc *sidecar) get(t *testing.T, c *http.Client, host, path string) (*http.Response, string) {
	t.Helper()
	resp, err := c.Get("http://" + host + path)
	if err != nil {
		t.Fatalf("GET %s%s: %v", host, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s%s: reading body: %v", host, path, err)
	}
	return resp, string(b)
}

// raw sends bytes on a new connection to the sidecar and returns the first
// response read back.
func (sc *sidecar) raw(t *testing.T, payload string) (*http.Response, string) {
	t.Helper()
	c, err := net.Dial("tcp", sc.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, payload); err != nil {
		t.Fatalf("write: %v", err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("reading response to %.80q: %v", payload, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, string(b)
}

// meshResolver is a resolver whose endpoints are all in the mesh: each set
// of the resolver's is copied once, marked.
type meshResolver struct {
	discovery.Resolver
	sets *sync.Map // *discovery.EndpointSet: its marked copy
}

func (r meshResolver) Resolve(ctx context.Context, service string) (*discovery.EndpointSet, error) {
	set, err := r.Resolver.Resolve(ctx, service)
	if err != nil {
		return nil, err
	}
	if m, ok := r.sets.Load(set); ok {
		return m.(*discovery.EndpointSet), nil
	}
	out := *set
	out.Endpoints = slices.Clone(set.Endpoints)
	for i := range out.Endpoints {
		out.Endpoints[i].Mesh = true
	}
	m, _ := r.sets.LoadOrStore(set, &out)
	return m.(*discovery.EndpointSet), nil
}

// meshTLSPair is a TLS configuration for a mesh endpoint (HTTP/1.1, a
// client certificate required) and one for the sidecar calling it, both
// on one self-signed certificate: the transport's rules are under test,
// not the mesh's identities (pkg/mesh has those).
func meshTLSPair(t testing.TB) (server, client *tls.Config) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "svc"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert := tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
	server = &tls.Config{Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequireAnyClientCert, NextProtos: []string{"http/1.1"}}
	client = &tls.Config{Certificates: []tls.Certificate{cert}, InsecureSkipVerify: true}
	return server, client
}
