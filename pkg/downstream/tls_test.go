package downstream

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"io"
	"math/big"
	"net/http"
	"net/url"
	"testing"
	"time"
)

// testCA issues certificates for the TLS listener's tests.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pool *x509.CertPool
}

func newTestCA(t *testing.T) *testCA {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &testCA{cert: cert, key: key, pool: pool}
}

// leaf issues a certificate with the URI SAN uri, for clients and servers.
func (ca *testCA) leaf(t *testing.T, uri string) tls.Certificate {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	u, _ := url.Parse(uri)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), URIs: []*url.URL{u},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// A TLS listener serves HTTP/1.1 and HTTP/2 (by ALPN) over mutual TLS on
// the same paths as a plaintext one, and its handlers see the client's
// certificate; a client without one is refused at the handshake.
func TestListenTLS(t *testing.T) {
	ca := newTestCA(t)
	srvCfg := &tls.Config{Certificates: []tls.Certificate{ca.leaf(t, "spiffe://test/svc/api")}, ClientCAs: ca.pool,
		ClientAuth: tls.RequireAndVerifyClientCert, NextProtos: []string{"h2", "http/1.1"}, MinVersion: tls.VersionTLS12}
	s, err := ListenTLS("test", "127.0.0.1:0", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		cs := PeerTLS(r)
		if cs == nil || len(cs.PeerCertificates) == 0 {
			http.Error(w, "no peer certificate", 500)
			return
		}
		_, _ = io.WriteString(w, r.Proto+" "+cs.PeerCertificates[0].URIs[0].String())
	}), Limits{}, nil, srvCfg)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve() }()
	defer func() {
		_ = s.Close()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	addr := s.Addr().String()
	client := func(certs []tls.Certificate, h2 bool) *http.Client {
		tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: ca.pool, Certificates: certs, ServerName: "127.0.0.1",
			InsecureSkipVerify: true}, ForceAttemptHTTP2: h2}
		if !h2 {
			tr.TLSClientConfig.NextProtos = []string{"http/1.1"}
		}
		t.Cleanup(tr.CloseIdleConnections)
		return &http.Client{Transport: tr, Timeout: 5 * time.Second}
	}
	web := []tls.Certificate{ca.leaf(t, "spiffe://test/svc/web")}
	for _, h2 := range []bool{false, true} {
		c := client(web, h2)
		for range 3 { // the fast path serves a connection's requests in turn
			resp, err := c.Get("https://" + addr + "/")
			if err != nil {
				t.Fatalf("h2=%v: %v", h2, err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			want := "HTTP/1.1 spiffe://test/svc/web"
			if h2 {
				want = "HTTP/2.0 spiffe://test/svc/web"
			}
			if string(b) != want {
				t.Fatalf("got %q, want %q", b, want)
			}
		}
	}
	if _, err := client(nil, false).Get("https://" + addr + "/"); err == nil {
		t.Fatal("a client without a certificate was served")
	}
	other := newTestCA(t)
	if _, err := client([]tls.Certificate{other.leaf(t, "spiffe://test/svc/web")}, false).Get("https://" + addr + "/"); err == nil {
		t.Fatal("a client with a certificate of another CA was served")
	}
}
