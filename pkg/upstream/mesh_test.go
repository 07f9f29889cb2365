package upstream

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// selfSigned is a certificate that signs itself, for the mesh
// transport's tests: both sides trust it.
func selfSigned(t *testing.T) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "mesh"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage:    x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, pool
}

// The mesh transport sends an HTTP/1.1 request over HTTP/1.1 and an
// HTTP/2 one over HTTP/2, with a client certificate, to a server that
// requires one; a server the client's TLS refuses fails the attempt as a
// connect failure carrying a TLSError.
func TestMeshTransportProtocols(t *testing.T) {
	cert, pool := selfSigned(t)
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, r.Proto)
	}))
	srv.EnableHTTP2 = true
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{cert}, ClientCAs: pool, ClientAuth: tls.RequireAndVerifyClientCert}
	srv.StartTLS()
	defer srv.Close()
	refuse := false
	m := NewMeshTransport(TransportConfig{}, func(service string) *tls.Config {
		return &tls.Config{Certificates: []tls.Certificate{cert}, InsecureSkipVerify: true,
			VerifyConnection: func(cs tls.ConnectionState) error {
				if refuse {
					return errors.New("not " + service)
				}
				_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{Roots: pool})
				return err
			}}
	})
	defer m.Close()
	addr := strings.TrimPrefix(srv.URL, "https://")
	for _, major := range []int{1, 2} {
		req, _ := http.NewRequest("GET", "http://"+addr+"/", nil)
		req.ProtoMajor = major
		resp, err := m.Send(req, "api", time.Second)
		if err != nil {
			t.Fatalf("HTTP/%d: %v", major, err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if want := map[int]string{1: "HTTP/1.1", 2: "HTTP/2.0"}[major]; string(b) != want {
			t.Fatalf("an HTTP/%d request reached the server as %s, want %s", major, b, want)
		}
	}
	refuse = true
	m.CloseIdleConnections()
	req, _ := http.NewRequest("GET", "http://"+addr+"/", nil)
	_, err := m.Send(req, "api", time.Second)
	var ce *ConnectError
	var te *TLSError
	if !errors.As(err, &ce) || !errors.As(err, &te) {
		t.Fatalf("a refused server: %v, want a ConnectError carrying a TLSError", err)
	}
}

// An endpoint that accepts the connection but never answers the TLS
// handshake fails the attempt within the connect timeout as a connect
// failure: a TLSError whose cause is ErrConnectTimeout, not the request's
// deadline (which would read as the upstream timing out, and not be
// retried as a connect failure is), for both protocols.
func TestMeshHandshakeStallIsAConnectTimeout(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var held []net.Conn
	accepted := make(chan struct{})
	go func() {
		defer close(accepted)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			held = append(held, c) // accepted, never answered
		}
	}()
	defer func() {
		ln.Close()
		<-accepted
		for _, c := range held {
			c.Close()
		}
	}()
	cert, _ := selfSigned(t)
	m := NewMeshTransport(TransportConfig{}, func(string) *tls.Config {
		return &tls.Config{Certificates: []tls.Certificate{cert}, InsecureSkipVerify: true}
	})
	defer m.Close()
	for _, major := range []int{1, 2} {
		req, _ := http.NewRequest("GET", "http://"+ln.Addr().String()+"/", nil)
		req.ProtoMajor = major
		_, err := m.Send(req, "api", 100*time.Millisecond)
		var ce *ConnectError
		var te *TLSError
		if !errors.As(err, &ce) || !errors.As(err, &te) || !errors.Is(err, ErrConnectTimeout) || errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("HTTP/%d to a handshake that never comes: %v, want a ConnectError carrying a TLSError of ErrConnectTimeout", major, err)
		}
	}
}
