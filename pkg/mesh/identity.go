package mesh

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/panics"
)

const (
	// identityWait is the blocking queries' wait; each query adds up to
	// 1/16 of jitter. The agent answers at once when a certificate changes.
	identityWait = 5 * time.Minute
	// sessionCacheSize bounds the TLS sessions kept for resumption, one per
	// upstream address dialled.
	sessionCacheSize = 1024
)

// ErrNotReady is the error of a handshake attempted before the identity
// holds a leaf certificate and the CA roots.
var ErrNotReady = errors.New("mesh identity not ready: no leaf certificate or CA roots from the Consul agent yet")

// Identity is this sidecar's identity in the mesh: the leaf certificate the
// Consul CA issued for its service, and the CA roots that every mesh
// certificate must chain to. Run keeps both current from the local agent;
// the TLS configurations of ServerTLS and ClientTLS read them at each
// handshake, so that a renewed leaf or rotated roots apply to the next
// handshake while established connections carry on. When the agent is
// unreachable the certificates held are served until they expire.
//
// Create one with NewIdentity; the zero value is not usable. Safe for
// concurrent use. Handshakes read an immutable snapshot and never wait for
// the agent.
type Identity struct {
	agent   IdentityAgent
	service string
	log     *slog.Logger
	now     func() time.Time

	cur atomic.Pointer[material] // never nil: empty until the agent answers

	mu       sync.Mutex    // serializes writers of cur (the two followers), guards readySet
	ready    chan struct{} // closed once a leaf and roots have both been held
	readySet bool

	leafErr, rootsErr atomic.Pointer[string] // last query error, nil after an answer
}

// material is what the agent gave, as handshakes use it. Immutable once
// stored, but for sessions, which is safe for concurrent use.
type material struct {
	gen      uint64                 // counts the materials stored
	sessions tls.ClientSessionCache // client sessions made with this material

	leaf   *tls.Certificate // nil until the first leaf; its Leaf is parsed
	self   SPIFFEID         // the leaf's identity
	serial string           // the leaf's serial number as Consul writes it

	roots        *x509.CertPool // nil until the first roots
	rootIDs      []string
	rootByKey    map[string]string // root ID by subject key ID
	activeRootID string
	trustDomain  string
}

// IdentityOption configures an Identity.
type IdentityOption func(*Identity)

// WithClock sets the clock used for certificate validity (verification,
// Ready, expiry). Default time.Now.
func WithClock(now func() time.Time) IdentityOption {
	return func(id *Identity) { id.now = now }
}

// NewIdentity is the identity of service, fed by agent. It does not
// contact the agent: Run does. A nil log discards the log.
func NewIdentity(agent IdentityAgent, service string, log *slog.Logger, opts ...IdentityOption) (*Identity, error) {
	if agent == nil {
		return nil, errors.New("mesh identity: a Consul agent is required")
	}
	if service == "" || strings.ContainsAny(service, "/?#% ") {
		return nil, fmt.Errorf("mesh identity: service %q: want a Consul service name", service)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	id := &Identity{
		agent:   agent,
		service: service,
		log:     log.With("component", "mesh.identity", "service", service),
		now:     time.Now,
		ready:   make(chan struct{}),
	}
	for _, o := range opts {
		o(id)
	}
	id.cur.Store(&material{sessions: tls.NewLRUClientSessionCache(sessionCacheSize)})
	return id, nil
}

// Run follows the leaf certificate (/v1/agent/connect/ca/leaf/<service>)
// and the CA roots (/v1/agent/connect/ca/roots) with blocking queries until
// ctx ends, and returns once its goroutines have ended. Errors are retried
// with a capped backoff; what was held is kept meanwhile. Call it once.
func (id *Identity) Run(ctx context.Context) {
	var wg sync.WaitGroup
	wg.Go(func() {
		panics.Run(ctx, "mesh.identity.leaf", func(ctx context.Context) {
			followAgent(ctx, id.log, "leaf certificate", &id.leafErr, id.askLeaf)
		})
	})
	wg.Go(func() {
		panics.Run(ctx, "mesh.identity.roots", func(ctx context.Context) {
			followAgent(ctx, id.log, "CA roots", &id.rootsErr, id.askRoots)
		})
	})
	wg.Wait()
}

// Ready reports whether a leaf certificate and the CA roots are held and
// the leaf has not expired: whether mesh handshakes can succeed now.
func (id *Identity) Ready() bool { return id.cur.Load().ready(id.now()) }

func (m *material) ready(now time.Time) bool {
	return m.leaf != nil && m.roots != nil && now.Before(m.leaf.Leaf.NotAfter)
}

// WaitReady waits until a leaf certificate and the CA roots have been held
// (the first answers of the agent), or ctx ends.
func (id *Identity) WaitReady(ctx context.Context) error {
	select {
	case <-id.ready:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("mesh identity of %s: waiting for the first certificate: %w", id.service, context.Cause(ctx))
	}
}

// SecondsToExpiry is the time left before the leaf held expires, in
// seconds, for a metric: negative once expired, 0 while none is held.
func (id *Identity) SecondsToExpiry() float64 { return id.cur.Load().secondsToExpiry(id.now()) }

func (m *material) secondsToExpiry(now time.Time) float64 {
	if m.leaf == nil {
		return 0
	}
	return m.leaf.Leaf.NotAfter.Sub(now).Seconds()
}

// IdentityStatus is what the identity holds, for /config and `sidecar
// status`: never key material. A value; its zero value is nothing held.
type IdentityStatus struct {
	Service string `json:"service"`
	// Ready is Identity.Ready.
	Ready bool `json:"ready"`
	// SPIFFEID is the leaf's URI SAN; empty while no leaf is held.
	SPIFFEID    string `json:"spiffeID,omitempty"`
	TrustDomain string `json:"trustDomain,omitempty"`
	// Serial is the leaf's serial number as Consul writes it (hex bytes
	// separated by colons).
	Serial          string    `json:"serial,omitempty"`
	NotBefore       time.Time `json:"notBefore,omitzero"`
	NotAfter        time.Time `json:"notAfter,omitzero"`
	SecondsToExpiry float64   `json:"secondsToExpiry"`
	// Roots is how many CA roots are trusted; ActiveRootID is the one that
	// signs new leaves. SignedBy is the root whose key signed the leaf held,
	// when it is one of the roots held (empty for a leaf signed by an
	// intermediate): after a rotation, the leaf is of the new root once
	// SignedBy is ActiveRootID.
	Roots        int    `json:"roots"`
	ActiveRootID string `json:"activeRootID,omitempty"`
	SignedBy     string `json:"signedBy,omitempty"`
	// LeafError and RootsError are the last failures to reach the agent,
	// empty once it answers again: while set, what is held is served as it
	// was.
	LeafError  string `json:"leafError,omitempty"`
	RootsError string `json:"rootsError,omitempty"`
}

// Status is a snapshot of what the identity holds.
func (id *Identity) Status() IdentityStatus {
	m, now := id.cur.Load(), id.now()
	st := IdentityStatus{
		Service:      id.service,
		Ready:        m.ready(now),
		TrustDomain:  m.trustDomain,
		Roots:        len(m.rootIDs),
		ActiveRootID: m.activeRootID,
	}
	if m.leaf != nil {
		st.SPIFFEID = m.self.String()
		st.Serial = m.serial
		st.NotBefore = m.leaf.Leaf.NotBefore
		st.NotAfter = m.leaf.Leaf.NotAfter
		st.SecondsToExpiry = m.secondsToExpiry(now)
		if aki := m.leaf.Leaf.AuthorityKeyId; len(aki) > 0 {
			st.SignedBy = m.rootByKey[string(aki)]
		}
	}
	if e := id.leafErr.Load(); e != nil {
		st.LeafError = *e
	}
	if e := id.rootsErr.Load(); e != nil {
		st.RootsError = *e
	}
	return st
}

// askLeaf asks the agent for the leaf certificate with q and keeps it.
func (id *Identity) askLeaf(ctx context.Context, q Query) (uint64, error) {
	leaf, last, err := id.agent.Leaf(ctx, id.service, q)
	if err != nil {
		return 0, err
	}
	if err := id.setLeaf(leaf); err != nil {
		return 0, err
	}
	return last, nil
}

// askRoots asks the agent for the CA roots with q and keeps them.
func (id *Identity) askRoots(ctx context.Context, q Query) (uint64, error) {
	roots, last, err := id.agent.Roots(ctx, q)
	if err != nil {
		return 0, err
	}
	if err := id.setRoots(roots); err != nil {
		return 0, err
	}
	return last, nil
}

// setLeaf keeps a leaf certificate from the agent, unless it is the one
// held. An answer that does not parse, or names another service, is an
// error and changes nothing.
func (id *Identity) setLeaf(l Leaf) error {
	if l.CertPEM == "" {
		return errors.New("leaf certificate: empty answer")
	}
	cert, err := tls.X509KeyPair([]byte(l.CertPEM), []byte(l.PrivateKeyPEM))
	if err != nil {
		return fmt.Errorf("leaf certificate: %w", err)
	}
	if cert.Leaf == nil {
		if cert.Leaf, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
			return fmt.Errorf("leaf certificate: %w", err)
		}
	}
	self, err := certID(cert.Leaf)
	if err != nil {
		return fmt.Errorf("leaf certificate: %w", err)
	}
	if !strings.EqualFold(self.Service, id.service) {
		return fmt.Errorf("leaf certificate: issued to %s, want service %s", self, id.service)
	}

	id.mu.Lock()
	defer id.mu.Unlock()
	old := id.cur.Load()
	// Serial numbers are unique to a CA only: compare the certificates.
	if old.leaf != nil && bytes.Equal(old.leaf.Certificate[0], cert.Certificate[0]) {
		return nil
	}
	m := *old
	m.leaf, m.self, m.serial = &cert, self, l.SerialNumber
	id.store(&m)
	verb := "renewed"
	if old.leaf == nil {
		verb = "received"
	}
	id.log.Info("mesh leaf certificate "+verb, "spiffe_id", self.String(), "serial", l.SerialNumber,
		"not_after", cert.Leaf.NotAfter.UTC().Format(time.RFC3339))
	return nil
}

// setRoots keeps the CA roots from the agent, unless they are those held.
// An empty list, or a root that does not parse, is an error and changes
// nothing: a good pool is never replaced by a bad one.
func (id *Identity) setRoots(list Roots) error {
	if len(list.Roots) == 0 {
		return errors.New("CA roots: empty answer")
	}
	if list.TrustDomain == "" {
		return errors.New("CA roots: no trust domain")
	}
	pool := x509.NewCertPool()
	ids := make([]string, 0, len(list.Roots))
	byKey := make(map[string]string, len(list.Roots))
	active := ""
	for _, r := range list.Roots {
		block, _ := pem.Decode([]byte(r.CertPEM))
		if block == nil || block.Type != "CERTIFICATE" {
			return fmt.Errorf("CA roots: root %s has no PEM certificate", r.ID)
		}
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return fmt.Errorf("CA roots: root %s: %w", r.ID, err)
		}
		pool.AddCert(cert)
		if len(cert.SubjectKeyId) > 0 {
			byKey[string(cert.SubjectKeyId)] = r.ID
		}
		ids = append(ids, r.ID)
		if r.Active {
			active = r.ID
		}
	}

	id.mu.Lock()
	defer id.mu.Unlock()
	old := id.cur.Load()
	if old.roots != nil && slices.Equal(old.rootIDs, ids) && old.activeRootID == active && old.trustDomain == list.TrustDomain {
		return nil
	}
	m := *old
	m.roots, m.rootIDs, m.rootByKey, m.activeRootID, m.trustDomain = pool, ids, byKey, active, list.TrustDomain
	id.store(&m)
	verb := "changed"
	if old.roots == nil {
		verb = "received"
	}
	id.log.Info("mesh CA roots "+verb, "trust_domain", list.TrustDomain, "roots", len(ids), "active_root_id", active)
	return nil
}

// store publishes m, a changed copy of the material held, with a new
// generation and no client sessions; the caller holds id.mu.
func (id *Identity) store(m *material) {
	m.gen++
	m.sessions = tls.NewLRUClientSessionCache(sessionCacheSize)
	id.cur.Store(m)
	if !id.readySet && m.leaf != nil && m.roots != nil {
		id.readySet = true
		close(id.ready)
	}
}

// followAgent runs one blocking query of the agent in a loop until ctx
// ends, by Consul's rules: the answer's index is the next query's
// Index (0 when it went backwards, as after an agent restart, and after
// an error); each wait has up to 1/16 of jitter; errors back off, capped.
// Only the first failure of a run and the recovery are logged; lastErr
// holds the last error until an answer comes.
func followAgent(ctx context.Context, log *slog.Logger, what string, lastErr *atomic.Pointer[string], ask func(ctx context.Context, q Query) (uint64, error)) {
	var index uint64
	failures := 0
	for ctx.Err() == nil {
		last, err := ask(ctx, Query{Index: index, Wait: identityWait + rand.N(identityWait/16)})
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			msg := err.Error()
			lastErr.Store(&msg)
			failures++
			index = 0
			if failures == 1 {
				log.Warn("mesh "+what+": Consul agent query failed; serving what is held", "err", msg)
			}
			if !pauseCtx(ctx, agentBackoff(failures)) {
				return
			}
			continue
		}
		lastErr.Store(nil)
		if failures > 0 {
			log.Info("mesh "+what+": Consul agent answers again", "after_failures", failures)
			failures = 0
		}
		switch {
		case last < index:
			index = 0 // the index went backwards: start over
		case last == 0:
			index = 1 // never wait on 0, which returns at once
		default:
			index = last
		}
	}
}

// agentBackoff is exponential from 250ms, capped at 5s (the agent is local
// and a certificate missed is a handshake refused), with jitter over the
// upper half.
func agentBackoff(failures int) time.Duration {
	d := 250 * time.Millisecond << min(failures-1, 5)
	d = min(d, 5*time.Second)
	return d/2 + rand.N(d/2+1)
}

// pauseCtx waits d, or until ctx ends; it reports whether ctx is still live.
func pauseCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
