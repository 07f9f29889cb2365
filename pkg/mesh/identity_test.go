package mesh_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/sidecar-mesh/sidecar/internal/consultest"
	"github.com/sidecar-mesh/sidecar/internal/logtest"
	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/mesh"
)

// TestIdentityReadyAndStatus: the leaf and roots come from a real agent,
// Ready and Status say what is held (no key material), and expiry follows
// the clock.
func TestIdentityReadyAndStatus(t *testing.T) {
	_, c := meshAgent(t)
	var at atomic.Int64 // the identity's clock, in Unix nanoseconds
	at.Store(time.Now().UnixNano())
	id := startIdentity(t, c, "web", mesh.WithClock(func() time.Time { return time.Unix(0, at.Load()) }))

	roots, _, err := c.Agent().ConnectCARoots(nil)
	if err != nil {
		t.Fatalf("GET /v1/agent/connect/ca/roots: %v", err)
	}
	leaf, _, err := c.Agent().ConnectCALeaf("web", nil)
	if err != nil {
		t.Fatalf("GET /v1/agent/connect/ca/leaf/web: %v", err)
	}
	st := id.Status()
	want := mesh.IdentityStatus{
		Service:      "web",
		Ready:        true,
		SPIFFEID:     leaf.ServiceURI,
		TrustDomain:  roots.TrustDomain,
		Serial:       leaf.SerialNumber,
		NotBefore:    leaf.ValidAfter,
		NotAfter:     leaf.ValidBefore,
		Roots:        len(roots.Roots),
		ActiveRootID: roots.ActiveRootID,
		SignedBy:     roots.ActiveRootID,
	}
	want.SecondsToExpiry = st.SecondsToExpiry // checked below
	if !st.NotBefore.Equal(want.NotBefore) || !st.NotAfter.Equal(want.NotAfter) {
		t.Errorf("Status validity = %v to %v, want the agent's leaf's %v to %v", st.NotBefore, st.NotAfter, want.NotBefore, want.NotAfter)
	}
	st.NotBefore, st.NotAfter, want.NotBefore, want.NotAfter = time.Time{}, time.Time{}, time.Time{}, time.Time{}
	if st != want {
		t.Errorf("Status() = %+v\nwant %+v (as the agent answers GET leaf/web and roots)", st, want)
	}
	if !strings.HasPrefix(leaf.ServiceURI, "spiffe://"+roots.TrustDomain+"/ns/default/dc/") {
		t.Errorf("the agent's leaf URI is %q, want a service ID in trust domain %s", leaf.ServiceURI, roots.TrustDomain)
	}
	body, err := json.Marshal(id.Status())
	if err != nil {
		t.Fatal(err)
	}
	for _, secret := range []string{"PRIVATE KEY", "BEGIN", leaf.PrivateKeyPEM[40:80]} {
		if strings.Contains(string(body), secret) {
			t.Errorf("Status as JSON = %s, which holds %q: want no key material nor PEM", body, secret)
		}
	}

	now := time.Unix(0, at.Load())
	if got, want := id.SecondsToExpiry(), leaf.ValidBefore.Sub(now).Seconds(); got != want {
		t.Errorf("SecondsToExpiry() at %v = %v, want %v (the leaf's NotAfter %v)", now, got, want, leaf.ValidBefore)
	}
	at.Store(leaf.ValidBefore.Add(time.Second).UnixNano())
	if id.Ready() {
		t.Errorf("Ready() a second after the leaf expired = true, want false")
	}
	if got := id.SecondsToExpiry(); got != -1 {
		t.Errorf("SecondsToExpiry() a second after the leaf expired = %v, want -1", got)
	}
}

func TestNewIdentityValidates(t *testing.T) {
	c, err := discovery.NewClient(discovery.ClientConfig{})
	if err != nil {
		t.Fatal(err)
	}
	a := discovery.NewMeshAgent(c)
	for _, tc := range []struct {
		agent   mesh.IdentityAgent
		service string
	}{{nil, "web"}, {a, ""}, {a, "a/b"}, {a, "a?b"}, {a, "a%2f"}} {
		if id, err := mesh.NewIdentity(tc.agent, tc.service, nil); err == nil {
			t.Errorf("NewIdentity(agent %v, %q) = %v, nil; want an error", tc.agent != nil, tc.service, id)
		}
	}
}

// TestHandshakes: two identities shake hands over TCP; the server refuses
// every client certificate that is not a service's of the mesh, the client
// every server that is not the service it dialled, in TLS 1.2 and 1.3.
func TestHandshakes(t *testing.T) {
	_, c := meshAgent(t)
	ca := useTestCA(t, c)
	web := startIdentity(t, c, "web")
	apiID := startIdentity(t, c, "api")
	srv := serveTLS(t, apiID.ServerTLS())
	svc := func(dc, name string) string {
		return "spiffe://" + ca.trustDomain + "/ns/default/dc/" + dc + "/svc/" + name
	}

	clients := []struct {
		name   string
		cert   *tls.Certificate // nil: web's own, through ClientTLS
		want   mesh.Reason      // "": accepted
		caller string           // the caller's SPIFFE ID when accepted
	}{
		{name: "web's leaf", caller: svc("dc1", "web")},
		{name: "no certificate", cert: &tls.Certificate{}, want: mesh.ReasonNoCertificate},
		{name: "self-signed, of another CA", cert: selfSigned(t, svc("dc1", "web")), want: mesh.ReasonUntrusted},
		{name: "expired", cert: ca.issue(t, func(c *x509.Certificate) {
			c.NotBefore, c.NotAfter = time.Now().Add(-2*time.Hour), time.Now().Add(-time.Hour)
		}, svc("dc1", "web")), want: mesh.ReasonExpired},
		{name: "server auth only", cert: ca.issue(t, func(c *x509.Certificate) {
			c.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		}, svc("dc1", "web")), want: mesh.ReasonKeyUsage},
		{name: "an agent's ID", cert: ca.issue(t, nil, "spiffe://"+ca.trustDomain+"/agent/client/dc/dc1/id/node-1"), want: mesh.ReasonNotService},
		{name: "no URI", cert: ca.issue(t, nil), want: mesh.ReasonNotService},
		{name: "two URIs", cert: ca.issue(t, nil, svc("dc1", "web"), svc("dc1", "admin")), want: mesh.ReasonNotService},
		{name: "another trust domain", cert: ca.issue(t, nil, "spiffe://other.consul/ns/default/dc/dc1/svc/web"), want: mesh.ReasonTrustDomain},
		{name: "another datacenter", cert: ca.issue(t, nil, svc("dc2", "web")), caller: svc("dc2", "web")},
	}
	for _, version := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
		for _, tc := range clients {
			t.Run(fmt.Sprintf("%s/client %s", tls.VersionName(version), tc.name), func(t *testing.T) {
				cfg := web.ClientTLS("api")
				cfg.MaxVersion = version
				if tc.cert != nil {
					cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return tc.cert, nil }
					cfg.ClientSessionCache = nil // resuming web's session would present web's certificate
				}
				_, dialErr := dialTLS(t, srv.addr, cfg)
				h := srv.next(t)
				if tc.want == "" {
					if dialErr != nil || h.err != nil || h.caller.String() != tc.caller {
						t.Fatalf("dial api as %s: dial error %v; server: caller %v, error %v; want caller %s", tc.name, dialErr, h.caller, h.err, tc.caller)
					}
					return
				}
				var pe *mesh.PeerError
				if !errors.As(h.err, &pe) || pe.Reason != tc.want {
					t.Errorf("api's handshake with a client presenting %s: error %v, want a *mesh.PeerError of reason %s", tc.name, h.err, tc.want)
				}
				if dialErr == nil {
					t.Errorf("dial api presenting %s: no error, want the handshake or the first read to fail", tc.name)
				}
			})
		}
	}

	servers := []struct {
		name string
		cfg  *tls.Config
		want mesh.Reason
	}{
		{name: "api's ServerTLS"},
		{name: "web's ServerTLS", cfg: web.ServerTLS(), want: mesh.ReasonWrongService},
		{name: "client auth only", cfg: plainServer(ca.issue(t, func(c *x509.Certificate) {
			c.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
		}, svc("dc1", "api"))), want: mesh.ReasonKeyUsage},
		{name: "self-signed, of another CA", cfg: plainServer(selfSigned(t, svc("dc1", "api"))), want: mesh.ReasonUntrusted},
		{name: "api in another namespace", cfg: plainServer(ca.issue(t, nil, "spiffe://"+ca.trustDomain+"/ns/other/dc/dc1/svc/api")), want: mesh.ReasonWrongService},
		{name: "api in another partition", cfg: plainServer(ca.issue(t, nil, "spiffe://"+ca.trustDomain+"/ap/other/ns/default/dc/dc1/svc/api")), want: mesh.ReasonWrongService},
		{name: "api in another datacenter", cfg: plainServer(ca.issue(t, nil, svc("dc2", "api")))},
	}
	for _, version := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
		for _, tc := range servers {
			t.Run(fmt.Sprintf("%s/server %s", tls.VersionName(version), tc.name), func(t *testing.T) {
				addr := srv.addr
				if tc.cfg != nil {
					addr = serveTLS(t, tc.cfg).addr
				}
				cfg := web.ClientTLS("api")
				cfg.MaxVersion = version
				_, err := dialTLS(t, addr, cfg)
				var pe *mesh.PeerError
				switch {
				case tc.want == "" && err != nil:
					t.Errorf("web dials %s as api: %v, want success", tc.name, err)
				case tc.want != "" && (!errors.As(err, &pe) || pe.Reason != tc.want):
					t.Errorf("web dials %s as api: error %v, want a *mesh.PeerError of reason %s", tc.name, err, tc.want)
				}
			})
		}
	}
}

// TestCARotation: after a CA rotation, new handshakes verify against the
// new roots, are full handshakes (no session of the old roots resumed), and
// a connection made before carries on.
func TestCARotation(t *testing.T) {
	_, c := meshAgent(t)
	web := startIdentity(t, c, "web")
	apiID := startIdentity(t, c, "api")
	srv := serveTLS(t, apiID.ServerTLS())

	before, err := dialTLS(t, srv.addr, web.ClientTLS("api"))
	if err != nil {
		t.Fatalf("web dials api before the rotation: %v", err)
	}
	srv.next(t)
	if again, err := dialTLS(t, srv.addr, web.ClientTLS("api")); err != nil || !again.ConnectionState().DidResume {
		t.Fatalf("web dials api again: error %v, resumed %v; want a resumed session", err, err == nil && again.ConnectionState().DidResume)
	}
	if h := srv.next(t); h.err != nil || h.caller.Service != "web" {
		t.Fatalf("api's resumed handshake: caller %v, error %v; want web", h.caller, h.err)
	}
	// A client that keeps its sessions whatever happens, to see what api
	// resumes.
	keeper := web.ClientTLS("api")
	keeper.ClientSessionCache = tls.NewLRUClientSessionCache(8)
	for i := range 2 {
		if _, err := dialTLS(t, srv.addr, keeper); err != nil {
			t.Fatalf("web dials api with its own session cache: %v", err)
		}
		if h := srv.next(t); i == 1 && !h.state.DidResume {
			t.Fatalf("api's second handshake with a client keeping its sessions: not resumed, want resumed (error %v)", h.err)
		}
	}
	// And a server that resumes whatever it is offered, to see what web
	// offers.
	resumer := serveTLS(t, plainServer(agentLeaf(t, c, "other")))
	for i := range 2 {
		conn, err := dialTLS(t, resumer.addr, web.ClientTLS("other"))
		if err != nil || i == 1 && !conn.ConnectionState().DidResume {
			t.Fatalf("web dials a server resuming every session: error %v; want success, resumed the second time", err)
		}
	}
	old := apiID.Status()
	oldRoots := x509.NewCertPool()
	roots, _, err := c.Agent().ConnectCARoots(nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range roots.Roots {
		oldRoots.AppendCertsFromPEM([]byte(r.RootCertPEM))
	}

	// A new root: the built-in CA with another key type.
	if _, err := c.Connect().CASetConfig(&api.CAConfig{
		Provider: "consul",
		Config:   map[string]any{"PrivateKeyType": "ec", "PrivateKeyBits": 384, "LeafCertTTL": "72h"},
	}, nil); err != nil {
		t.Fatalf("PUT /v1/connect/ca/configuration: %v", err)
	}
	waitFor(t, 5*time.Second, "both identities hold the new roots", func() bool {
		return web.Status().ActiveRootID != old.ActiveRootID && apiID.Status().ActiveRootID != old.ActiveRootID
	})
	if st := apiID.Status(); st.Roots != old.Roots+1 || st.TrustDomain != old.TrustDomain {
		t.Errorf("api's roots after the rotation: %d in trust domain %s; want %d (the old root kept) in %s", st.Roots, st.TrustDomain, old.Roots+1, old.TrustDomain)
	}

	if err := roundTrip(before); err != nil {
		t.Errorf("the connection made before the rotation: %v, want it to carry on", err)
	}

	// A leaf of the new CA without the cross-signed intermediate Consul
	// attaches chains to the new root only.
	fresh := leafOnly(t, c, "fresh")
	if _, err := fresh.Leaf.Verify(x509.VerifyOptions{Roots: oldRoots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err == nil {
		t.Fatalf("a new leaf without its intermediate verifies against the old roots: the test proves nothing")
	}
	cfg := web.ClientTLS("api")
	cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return fresh, nil }
	cfg.ClientSessionCache = nil
	if _, err := dialTLS(t, srv.addr, cfg); err != nil {
		t.Errorf("a client with a leaf of the new CA only dials api: %v", err)
	}
	if h := srv.next(t); h.err != nil || h.caller.Service != "fresh" {
		t.Errorf("api's handshake with a leaf of the new CA only: caller %v, error %v; want fresh", h.caller, h.err)
	}
	if _, err := dialTLS(t, serveTLS(t, plainServer(fresh)).addr, web.ClientTLS("fresh")); err != nil {
		t.Errorf("web dials a server with a leaf of the new CA only: %v", err)
	}

	after, err := dialTLS(t, srv.addr, web.ClientTLS("api"))
	if err != nil || after.ConnectionState().DidResume {
		t.Errorf("web dials api after the rotation: error %v, resumed %v; want a full handshake", err, err == nil && after.ConnectionState().DidResume)
	}
	if h := srv.next(t); h.err != nil || h.caller.Service != "web" || h.state.DidResume {
		t.Errorf("api's handshake after the rotation: caller %v, error %v, resumed %v; want web, a full handshake", h.caller, h.err, h.state.DidResume)
	}
	if conn, err := dialTLS(t, resumer.addr, web.ClientTLS("other")); err != nil || conn.ConnectionState().DidResume {
		t.Errorf("web dials a server resuming every session after the rotation: error %v, resumed %v; want a full handshake", err, err == nil && conn.ConnectionState().DidResume)
	}
	if _, err := dialTLS(t, srv.addr, keeper); err != nil {
		t.Errorf("web dials api after the rotation with a session of before: %v", err)
	}
	if h := srv.next(t); h.err != nil || h.state.DidResume {
		t.Errorf("api's handshake with a session of before the rotation: error %v, resumed %v; want a full handshake", h.err, h.state.DidResume)
	}
}

// TestLeafReissuedAfterRotation: after a CA rotation the agent reissues
// the leaves, each within Consul's 30s of jitter, through the identities'
// blocking queries; new handshakes present the new leaf, and a connection
// made before carries on.
func TestLeafReissuedAfterRotation(t *testing.T) {
	if testing.Short() {
		t.Skip("waits up to 30s for the agent to reissue the leaves")
	}
	_, c := meshAgent(t)
	web := startIdentity(t, c, "web")
	apiID := startIdentity(t, c, "api")
	srv := serveTLS(t, apiID.ServerTLS())
	before, err := dialTLS(t, srv.addr, web.ClientTLS("api"))
	if err != nil {
		t.Fatalf("web dials api: %v", err)
	}
	srv.next(t)
	old, webOld := apiID.Status(), web.Status()

	if _, err := c.Connect().CASetConfig(&api.CAConfig{
		Provider: "consul",
		Config:   map[string]any{"PrivateKeyType": "ec", "PrivateKeyBits": 384, "LeafCertTTL": "72h"},
	}, nil); err != nil {
		t.Fatalf("PUT /v1/connect/ca/configuration: %v", err)
	}
	waitFor(t, 40*time.Second, "both identities hold leaves of the new root", func() bool {
		w, s := web.Status(), apiID.Status()
		return w.ActiveRootID != webOld.ActiveRootID && w.SignedBy == w.ActiveRootID &&
			s.ActiveRootID != old.ActiveRootID && s.SignedBy == s.ActiveRootID
	})
	st := apiID.Status()
	if st.LeafError != "" || st.SPIFFEID != old.SPIFFEID || st.Serial == old.Serial && st.NotBefore.Equal(old.NotBefore) {
		t.Errorf("api after the reissue: %+v\nbefore %+v; want another leaf, the same SPIFFE ID, no error", st, old)
	}
	if err := roundTrip(before); err != nil {
		t.Errorf("the connection made before the rotation: %v, want it to carry on", err)
	}
	after, err := dialTLS(t, srv.addr, web.ClientTLS("api"))
	if err != nil {
		t.Fatalf("web dials api after the reissue: %v", err)
	}
	if got := consulSerial(after.ConnectionState().PeerCertificates[0].SerialNumber); got != st.Serial {
		t.Errorf("api presented serial %s, want its new leaf's %s", got, st.Serial)
	}
	if h := srv.next(t); h.err != nil || h.caller.Service != "web" {
		t.Errorf("api's handshake after the reissue: caller %v, error %v; want web", h.caller, h.err)
	}
}

// TestAgentRestart: while the agent is down the certificates held are
// served; a restarted dev agent comes back with a new CA, and the new
// leaf and roots are taken for new handshakes while a connection made
// before carries on.
func TestAgentRestart(t *testing.T) {
	a, c := meshAgent(t)
	web := startIdentity(t, c, "web")
	apiID := startIdentity(t, c, "api")
	srv := serveTLS(t, apiID.ServerTLS())
	before, err := dialTLS(t, srv.addr, web.ClientTLS("api"))
	if err != nil {
		t.Fatalf("web dials api: %v", err)
	}
	srv.next(t)
	old, webOld := apiID.Status(), web.Status()

	a.Stop()
	waitFor(t, 5*time.Second, "both identities see the agent gone", func() bool {
		w, s := web.Status(), apiID.Status()
		return w.LeafError != "" && w.RootsError != "" && s.LeafError != "" && s.RootsError != ""
	})
	if !web.Ready() || !apiID.Ready() {
		t.Errorf("Ready() with the agent down: web %v, api %v; want true (the certificates held are valid)", web.Ready(), apiID.Ready())
	}
	cfg := web.ClientTLS("api")
	cfg.ClientSessionCache = nil // a full handshake, with the certificates held
	if _, err := dialTLS(t, srv.addr, cfg); err != nil {
		t.Errorf("web dials api with the agent down: %v", err)
	}
	if h := srv.next(t); h.err != nil || h.caller.Service != "web" {
		t.Errorf("api's handshake with the agent down: caller %v, error %v; want web", h.caller, h.err)
	}

	a.Restart(t)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("before the restart: api %+v\nweb %+v", old, webOld)
			t.Logf("after: api %+v\nweb %+v", apiID.Status(), web.Status())
		}
	})
	// The new dev agent has a new cluster ID, so a new trust domain: the
	// SPIFFE IDs change with the leaves (serial numbers start over).
	waitFor(t, 15*time.Second, "both identities hold the new CA's leaf and roots", func() bool {
		w, s := web.Status(), apiID.Status()
		return w.ActiveRootID != old.ActiveRootID && s.ActiveRootID != old.ActiveRootID &&
			w.SPIFFEID != webOld.SPIFFEID && s.SPIFFEID != old.SPIFFEID
	})
	st := apiID.Status()
	t.Logf("api's identity before the restart: %s serial %s; after: %s serial %s", old.SPIFFEID, old.Serial, st.SPIFFEID, st.Serial)

	if err := roundTrip(before); err != nil {
		t.Errorf("the connection made before the restart: %v, want it to carry on", err)
	}
	after, err := dialTLS(t, srv.addr, web.ClientTLS("api"))
	if err != nil {
		t.Fatalf("web dials api after the restart: %v", err)
	}
	if got := consulSerial(after.ConnectionState().PeerCertificates[0].SerialNumber); got != st.Serial || after.ConnectionState().DidResume {
		t.Errorf("api presented serial %s (resumed %v), want the new leaf's %s in a full handshake", got, after.ConnectionState().DidResume, st.Serial)
	}
	if h := srv.next(t); h.err != nil || h.caller.String() != web.Status().SPIFFEID {
		t.Errorf("api's handshake after the restart: caller %v, error %v; want %s", h.caller, h.err, web.Status().SPIFFEID)
	}
}

// meshAgent starts a Consul dev agent (its built-in CA on) and returns a
// client of it.
func meshAgent(t *testing.T) (*consultest.Agent, *api.Client) {
	t.Helper()
	a := consultest.Start(t)
	cfg := api.DefaultConfig()
	cfg.Address = a.Addr()
	c, err := api.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cfg.Transport.CloseIdleConnections)
	return a, c
}

// startIdentity runs the identity of service until t ends, and waits until
// it holds a leaf and roots.
func startIdentity(t *testing.T, c *api.Client, service string, opts ...mesh.IdentityOption) *mesh.Identity {
	t.Helper()
	log, _ := logtest.New()
	id, err := mesh.NewIdentity(discovery.NewMeshAgent(c), service, log, opts...)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		id.Run(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	wctx, wcancel := context.WithTimeout(ctx, 10*time.Second)
	defer wcancel()
	if err := id.WaitReady(wctx); err != nil {
		t.Fatalf("identity of %s: %v (status %+v)", service, err, id.Status())
	}
	return id
}

// waitFor polls cond until it holds, or fails t after within.
func waitFor(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.NewTimer(within)
	defer deadline.Stop()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-deadline.C:
			t.Fatalf("not within %s: %s", within, what)
		case <-tick.C:
		}
	}
}

// tlsServer accepts TLS connections on loopback; each handshake's outcome
// goes to handshakes, and a connection that passes echoes what it reads.
type tlsServer struct {
	addr       string
	handshakes chan handshake
}

type handshake struct {
	state  tls.ConnectionState
	caller mesh.SPIFFEID // CallerService of state
	err    error
}

// serveTLS starts a tlsServer with cfg; it stops, and its connections
// close, when t ends.
func serveTLS(t *testing.T, cfg *tls.Config) *tlsServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &tlsServer{addr: ln.Addr().String(), handshakes: make(chan handshake, 64)}
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex // guards conns
		conns = map[net.Conn]bool{}
	)
	wg.Go(func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns[conn] = true
			mu.Unlock()
			wg.Go(func() {
				defer conn.Close()
				_ = conn.SetDeadline(time.Now().Add(time.Minute))
				tc := tls.Server(conn, cfg)
				h := handshake{err: tc.Handshake()}
				if h.err == nil {
					h.state = tc.ConnectionState()
					h.caller, h.err = mesh.CallerService(h.state)
				}
				s.handshakes <- h
				if h.err == nil {
					_, _ = io.Copy(tc, tc)
				}
			})
		}
	})
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for conn := range conns {
			conn.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return s
}

// next is the outcome of the next handshake.
func (s *tlsServer) next(t *testing.T) handshake {
	t.Helper()
	select {
	case h := <-s.handshakes:
		return h
	case <-time.After(5 * time.Second):
		t.Fatalf("no handshake on %s within 5s", s.addr)
		return handshake{}
	}
}

// dialTLS dials addr with cfg and makes a round trip: in TLS 1.3 a client
// learns that the server refused its certificate at its first read. The
// connection is closed when t ends.
func dialTLS(t *testing.T, addr string, cfg *tls.Config) (*tls.Conn, error) {
	t.Helper()
	raw, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	_ = raw.SetDeadline(time.Now().Add(time.Minute))
	conn := tls.Client(raw, cfg)
	t.Cleanup(func() { conn.Close() })
	if err := conn.Handshake(); err != nil {
		return conn, err
	}
	return conn, roundTrip(conn)
}

// roundTrip writes a line to conn and reads it back from the echo server.
func roundTrip(conn *tls.Conn) error {
	const msg = "ping\n"
	if _, err := io.WriteString(conn, msg); err != nil {
		return err
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(conn, buf); err != nil {
		return err
	}
	if string(buf) != msg {
		return fmt.Errorf("echo: read %q, want %q", buf, msg)
	}
	return nil
}

// plainServer is a server config presenting cert and asking any client
// certificate.
func plainServer(cert *tls.Certificate) *tls.Config {
	return &tls.Config{Certificates: []tls.Certificate{*cert}, ClientAuth: tls.RequireAnyClientCert}
}

// testCA is a CA key of the test's, set as the agent's built-in CA key
// (Consul makes the root from it), so that the test can issue certificates
// the agent's roots trust.
type testCA struct {
	key         *ecdsa.PrivateKey
	root        *x509.Certificate
	trustDomain string
}

// useTestCA makes a new key the agent's CA key; identities started after
// it get leaves of its root.
func useTestCA(t *testing.T, c *api.Client) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der})
	if _, err := c.Connect().CASetConfig(&api.CAConfig{
		Provider: "consul",
		Config:   map[string]any{"PrivateKey": string(keyPEM), "PrivateKeyType": "ec", "PrivateKeyBits": 256},
	}, nil); err != nil {
		t.Fatalf("PUT /v1/connect/ca/configuration with the test's key: %v", err)
	}
	roots, _, err := c.Connect().CARoots(nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range roots.Roots {
		if !r.Active {
			continue
		}
		block, _ := pem.Decode([]byte(r.RootCertPEM))
		if block == nil {
			t.Fatalf("active root %s: no PEM", r.ID)
		}
		root, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		if !key.PublicKey.Equal(root.PublicKey) {
			t.Fatalf("active root %s is not of the test's key", r.ID)
		}
		return &testCA{key: key, root: root, trustDomain: roots.TrustDomain}
	}
	t.Fatalf("no active root in %+v", roots)
	return nil
}

// issue is a leaf of ca with uris, valid for an hour for client and server
// authentication unless edit changes that.
func (ca *testCA) issue(t *testing.T, edit func(*x509.Certificate), uris ...string) *tls.Certificate {
	t.Helper()
	return newCert(t, ca.root, ca.key, edit, uris...)
}

// selfSigned is a self-signed certificate with uri.
func selfSigned(t *testing.T, uri string) *tls.Certificate {
	t.Helper()
	return newCert(t, nil, nil, nil, uri)
}

func newCert(t *testing.T, parent *x509.Certificate, parentKey *ecdsa.PrivateKey, edit func(*x509.Certificate), uris ...string) *tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 64))
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: "test"},
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyAgreement,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
	}
	for _, u := range uris {
		parsed, err := url.Parse(u)
		if err != nil {
			t.Fatal(err)
		}
		tmpl.URIs = append(tmpl.URIs, parsed)
	}
	if edit != nil {
		edit(tmpl)
	}
	if parent == nil {
		parent, parentKey = tmpl, key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, parentKey)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}
}

// agentLeaf is the agent's leaf for service, with the intermediates Consul
// attaches to it.
func agentLeaf(t *testing.T, c *api.Client, service string) *tls.Certificate {
	t.Helper()
	l, _, err := c.Agent().ConnectCALeaf(service, nil)
	if err != nil {
		t.Fatalf("GET /v1/agent/connect/ca/leaf/%s: %v", service, err)
	}
	cert, err := tls.X509KeyPair([]byte(l.CertPEM), []byte(l.PrivateKeyPEM))
	if err != nil {
		t.Fatal(err)
	}
	return &cert
}

// leafOnly is the agent's leaf for service without the intermediates
// Consul attaches to it.
func leafOnly(t *testing.T, c *api.Client, service string) *tls.Certificate {
	t.Helper()
	cert := agentLeaf(t, c, service)
	if len(cert.Certificate) < 2 {
		t.Fatalf("the agent's leaf of %s has no intermediate (%d certificates): want Consul's cross-signed one after a rotation", service, len(cert.Certificate))
	}
	cert.Certificate = cert.Certificate[:1]
	return cert
}

// consulSerial is a serial number as Consul writes it: hex bytes joined by
// colons.
func consulSerial(n *big.Int) string {
	b := n.Bytes()
	parts := make([]string, len(b))
	for i, x := range b {
		parts[i] = fmt.Sprintf("%02x", x)
	}
	return strings.Join(parts, ":")
}
