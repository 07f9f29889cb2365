package mesh

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"time"
)

// cipherSuites are the TLS 1.2 suites offered and accepted: those of
// Consul's built-in proxy (connect/tls.go), ECDHE with AES-GCM or
// ChaCha20-Poly1305, which Envoy's defaults also cover. TLS 1.3 suites are
// not configurable and all acceptable.
var cipherSuites = []uint16{
	tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
	tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
	tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
	tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
	tls.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305,
	tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305,
}

// Reason says why a peer's certificate was refused. The set is small and
// fixed: a metric label.
type Reason string

const (
	// ReasonNotReady: this identity holds no CA roots or leaf yet.
	ReasonNotReady Reason = "not_ready"
	// ReasonNoCertificate: the peer presented none.
	ReasonNoCertificate Reason = "no_certificate"
	// ReasonUntrusted: the chain does not lead to a current CA root (another
	// CA, a self-signed certificate, a root rotated out), or does not parse.
	ReasonUntrusted Reason = "untrusted"
	// ReasonExpired: the leaf (or a certificate of its chain) is outside its
	// validity period.
	ReasonExpired Reason = "expired"
	// ReasonKeyUsage: the leaf may not be used for this side of a
	// connection (client or server authentication).
	ReasonKeyUsage Reason = "key_usage"
	// ReasonNotService: the leaf carries no Consul service SPIFFE ID (or
	// more than one URI).
	ReasonNotService Reason = "not_service"
	// ReasonTrustDomain: the SPIFFE ID is of another trust domain.
	ReasonTrustDomain Reason = "trust_domain"
	// ReasonWrongService: the server is not an instance of the service
	// dialled.
	ReasonWrongService Reason = "wrong_service"
)

// PeerError is why a mesh handshake refused the peer's certificate. The
// side that refuses gets it from the handshake (errors.As); the other side
// sees a TLS alert (bad_certificate). A value once returned, safe to share.
type PeerError struct {
	Reason Reason
	// Peer is the SPIFFE ID (or first URI) of the peer's leaf, when it got
	// that far; empty otherwise.
	Peer string
	// Err is the underlying error, if any (an x509 verification error).
	Err error
}

func (e *PeerError) Error() string {
	var b strings.Builder
	b.WriteString("mesh peer certificate refused (")
	b.WriteString(string(e.Reason))
	b.WriteString(")")
	if e.Peer != "" {
		b.WriteString(": ")
		b.WriteString(e.Peer)
	}
	if e.Err != nil {
		b.WriteString(": ")
		b.WriteString(e.Err.Error())
	}
	return b.String()
}

func (e *PeerError) Unwrap() error { return e.Err }

// ServerTLS is the configuration of the inbound mesh listener. A client
// must present a certificate that chains to the CA roots held at the time
// of its handshake, is valid for client authentication, and carries a
// Consul service SPIFFE ID of this trust domain (any datacenter); anything
// else fails the handshake with a *PeerError. The server presents the leaf
// held at the time of the handshake. So a root rotation or a leaf renewal
// applies to the next handshake, and established connections carry on.
//
// ClientAuth is RequestClientCert, not RequireAnyClientCert: a client
// without a certificate is refused all the same, by VerifyConnection, which
// crypto/tls runs on every handshake, resumed ones included, so that the
// refusal comes as a *PeerError (ReasonNoCertificate) like the others.
// Sessions are resumed, but only those made since the leaf or the roots
// last changed: a change makes the next handshake of each client a full
// one. NextProtos offers h2 and http/1.1; a client that offers nothing
// (Consul's built-in proxy never does) negotiates nothing, and speaks the
// app's protocol. Use CallerService on an accepted
// connection's state for the caller's identity. Each call returns a new
// config that the caller may change (but for WrapSession and UnwrapSession,
// which keep tickets to one generation of certificates).
func (id *Identity) ServerTLS() *tls.Config {
	cfg := &tls.Config{
		MinVersion:     tls.VersionTLS12,
		CipherSuites:   cipherSuites,
		ClientAuth:     tls.RequestClientCert,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return id.leaf() },
		VerifyConnection: func(cs tls.ConnectionState) error {
			_, err := id.cur.Load().verifyPeer(cs.PeerCertificates, x509.ExtKeyUsageClientAuth, id.now())
			return err
		},
		NextProtos: []string{"h2", "http/1.1"},
		Time:       id.now,
	}
	// A ticket carries the generation of the material it was issued under;
	// one of another generation is not resumed.
	cfg.WrapSession = func(cs tls.ConnectionState, ss *tls.SessionState) ([]byte, error) {
		ss.Extra = append(ss.Extra, binary.BigEndian.AppendUint64(nil, id.cur.Load().gen))
		return cfg.EncryptTicket(cs, ss)
	}
	cfg.UnwrapSession = func(ticket []byte, cs tls.ConnectionState) (*tls.SessionState, error) {
		ss, err := cfg.DecryptTicket(ticket, cs)
		if err != nil || ss == nil || len(ss.Extra) == 0 {
			return nil, err
		}
		if gen := ss.Extra[len(ss.Extra)-1]; len(gen) != 8 || binary.BigEndian.Uint64(gen) != id.cur.Load().gen {
			return nil, nil
		}
		return ss, nil
	}
	return cfg
}

// ClientTLS is the configuration for dialling an instance of service want.
// The client presents the leaf held at the time of the handshake. The
// server must present a certificate that chains to the CA roots held then,
// is valid for server authentication and carries the SPIFFE ID of want, in
// this trust domain, namespace and partition, and any datacenter (a
// failover target in another datacenter is the same service; the CA, not
// the datacenter, is what is trusted); else the handshake fails with a
// *PeerError. There is no host name check: mesh peers are addressed by IP,
// and the SPIFFE ID is what names them (InsecureSkipVerify only turns off
// crypto/tls's own verification; VerifyConnection does all of it, on
// resumed sessions too).
//
// Sessions are cached by the identity, keyed by the address dialled (or
// ServerName, if the caller sets one), so that reconnections resume; a
// change of the leaf or the roots empties the cache, so that the next
// handshake to each server is a full one, with the new certificates.
// NextProtos is left to the caller, as the connection needs. Consul's
// built-in proxy takes no part in ALPN (it forwards bytes), so nothing is
// negotiated with it whatever the caller offers, and the caller speaks the
// app's protocol. Each call returns a new config that the caller may
// change.
func (id *Identity) ClientTLS(want string) *tls.Config {
	return &tls.Config{
		MinVersion:           tls.VersionTLS12,
		CipherSuites:         cipherSuites,
		InsecureSkipVerify:   true,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return id.leaf() },
		VerifyConnection: func(cs tls.ConnectionState) error {
			m := id.cur.Load()
			got, err := m.verifyPeer(cs.PeerCertificates, x509.ExtKeyUsageServerAuth, id.now())
			if err != nil {
				return err
			}
			return m.isService(got, want)
		},
		ClientSessionCache: sessionCache{id},
		Time:               id.now,
	}
}

// CallerService is the SPIFFE ID of the peer of a connection accepted with
// ServerTLS, from its leaf's URI SAN. The handshake has verified the chain;
// cs must come from such a connection.
func CallerService(cs tls.ConnectionState) (SPIFFEID, error) {
	if len(cs.PeerCertificates) == 0 {
		return SPIFFEID{}, &PeerError{Reason: ReasonNoCertificate}
	}
	return peerID(cs.PeerCertificates[0])
}

// sessionCache keeps the client sessions of the current material.
type sessionCache struct{ id *Identity }

func (c sessionCache) Get(key string) (*tls.ClientSessionState, bool) {
	return c.id.cur.Load().sessions.Get(key)
}

func (c sessionCache) Put(key string, cs *tls.ClientSessionState) {
	c.id.cur.Load().sessions.Put(key, cs)
}

// leaf is the certificate to present now.
func (id *Identity) leaf() (*tls.Certificate, error) {
	if l := id.cur.Load().leaf; l != nil {
		return l, nil
	}
	return nil, ErrNotReady
}

// verifyPeer checks a peer's chain (leaf first, then intermediates, as
// presented) against the roots of m at now, for usage, and returns the
// leaf's SPIFFE ID, which must be of m's trust domain.
func (m *material) verifyPeer(certs []*x509.Certificate, usage x509.ExtKeyUsage, now time.Time) (SPIFFEID, error) {
	if m.roots == nil {
		return SPIFFEID{}, &PeerError{Reason: ReasonNotReady, Err: ErrNotReady}
	}
	if len(certs) == 0 {
		return SPIFFEID{}, &PeerError{Reason: ReasonNoCertificate}
	}
	peer := ""
	if len(certs[0].URIs) > 0 {
		peer = certs[0].URIs[0].String()
	}
	opts := x509.VerifyOptions{
		Roots:         m.roots,
		Intermediates: x509.NewCertPool(),
		CurrentTime:   now,
		KeyUsages:     []x509.ExtKeyUsage{usage},
	}
	for _, c := range certs[1:] {
		opts.Intermediates.AddCert(c)
	}
	if _, err := certs[0].Verify(opts); err != nil {
		return SPIFFEID{}, &PeerError{Reason: verifyReason(err), Peer: peer, Err: err}
	}
	got, err := peerID(certs[0])
	if err != nil {
		return SPIFFEID{}, err
	}
	if !sameTrustDomain(got.TrustDomain, m.trustDomain) {
		return SPIFFEID{}, &PeerError{Reason: ReasonTrustDomain, Peer: peer,
			Err: fmt.Errorf("trust domain %s, want %s", got.TrustDomain, m.trustDomain)}
	}
	return got, nil
}

// isService checks that got, a verified server's ID, is service want in
// the namespace and partition of m's own leaf, to the letter.
func (m *material) isService(got SPIFFEID, want string) error {
	if m.leaf == nil {
		return &PeerError{Reason: ReasonNotReady, Peer: got.String(), Err: ErrNotReady}
	}
	// Exact, as Envoy matches the URI SAN: Consul's ACLs tell "API" from
	// "api", so a certificate for the one is not the other.
	if got.Service != want || got.Namespace != m.self.Namespace || got.Partition != m.self.Partition {
		return &PeerError{Reason: ReasonWrongService, Peer: got.String(),
			Err: fmt.Errorf("want service %s in namespace %s, partition %s", want, m.self.Namespace, m.self.Partition)}
	}
	return nil
}

// verifyReason classifies an x509 verification error.
func verifyReason(err error) Reason {
	var inv x509.CertificateInvalidError
	if errors.As(err, &inv) {
		switch inv.Reason {
		case x509.Expired:
			return ReasonExpired
		case x509.IncompatibleUsage:
			return ReasonKeyUsage
		}
	}
	return ReasonUntrusted
}

// certID is the Consul service SPIFFE ID of a leaf: its one URI SAN, as the
// X.509-SVID format requires. Errors wrap ErrNotServiceID.
func certID(c *x509.Certificate) (SPIFFEID, error) {
	if len(c.URIs) != 1 {
		return SPIFFEID{}, fmt.Errorf("%w: the certificate has %d URIs, want 1", ErrNotServiceID, len(c.URIs))
	}
	return ParseSPIFFE(c.URIs[0])
}

// peerID is certID for a peer's leaf, whose errors are *PeerError.
func peerID(c *x509.Certificate) (SPIFFEID, error) {
	id, err := certID(c)
	if err != nil {
		peer := ""
		if len(c.URIs) > 0 {
			peer = c.URIs[0].String()
		}
		return SPIFFEID{}, &PeerError{Reason: ReasonNotService, Peer: peer, Err: err}
	}
	return id, nil
}
