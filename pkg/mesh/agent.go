package mesh

import (
	"context"
	"errors"
	"log/slog"
	"time"
)

// IdentityAgent is what an Identity reads from the local Consul agent: its
// service's leaf certificate and the CA roots. pkg/discovery implements it
// over Consul's API (discovery.NewMeshAgent).
//
// Both methods block: with a Query of Index 0 they answer at once; with
// another Index they wait, up to the Query's Wait, for an answer whose
// index differs, and return the index of the answer they give (which is
// the Index asked when the wait ended with nothing new). They return when
// ctx ends, with an error. A read the agent refuses to the ACL token (403)
// is an error that wraps ErrACLDenied. Implementations are safe for
// concurrent use.
type IdentityAgent interface {
	// Leaf is the leaf certificate the Consul CA issued for service
	// (/v1/agent/connect/ca/leaf/<service>).
	Leaf(ctx context.Context, service string, q Query) (Leaf, uint64, error)
	// Roots are the CA roots of the mesh (/v1/agent/connect/ca/roots).
	Roots(ctx context.Context, q Query) (Roots, uint64, error)
}

// IntentionsAgent is what an Authorizer and Check read from the local
// Consul agent: the intentions, a destination's protocol, the ACL
// settings that give the default decision and the mesh's request
// normalization. pkg/discovery implements it over Consul's API
// (discovery.NewMeshAgent).
//
// Intentions, Protocol and Normalization block as IdentityAgent's methods
// do; ACL answers at once. All return when ctx ends, with an error. A read the
// agent refuses to the ACL token (403) is an error that wraps ErrACLDenied.
// Implementations are safe for concurrent use.
type IntentionsAgent interface {
	// Intentions are every service-intentions config entry (in Consul 1.9
	// and later every intention is one, `consul intention create`
	// included).
	Intentions(ctx context.Context, q Query) ([]IntentionsEntry, uint64, error)
	// Protocol is destination's protocol as Consul resolves it for its
	// proxies (service-defaults, else proxy-defaults, else "tcp"): its
	// compiled discovery chain's.
	Protocol(ctx context.Context, destination string, q Query) (string, uint64, error)
	// ACL is the agent's ACL settings (its runtime configuration, which
	// needs agent:read).
	ACL(ctx context.Context) (ACLConfig, error)
	// Normalization is the mesh config entry's request normalization for
	// inbound traffic (reading it needs mesh:read); the zero value when
	// there is no mesh config entry or it sets none.
	Normalization(ctx context.Context, q Query) (Normalization, uint64, error)
}

// Agent is everything the mesh reads from the local Consul agent.
type Agent interface {
	IdentityAgent
	IntentionsAgent
}

// Query is one read of the agent, as Consul's blocking queries have it. A
// value; the zero Query answers at once.
type Query struct {
	// Index is the index of the last answer held: the agent answers when
	// its own differs, or when Wait has passed. 0 answers at once.
	Index uint64
	// Wait bounds a wait for a change; 0 is the agent's default (5m).
	Wait time.Duration
}

// ErrACLDenied marks a read of the agent that it refused to the client's
// ACL token (403).
var ErrACLDenied = errors.New("the agent refused it to this ACL token")

// Leaf is a leaf certificate of the Consul CA, as the agent gives it. A
// value; its zero value is no certificate. It holds a private key: logged,
// it shows only its serial number.
type Leaf struct {
	// CertPEM is the certificate; PrivateKeyPEM its key.
	CertPEM, PrivateKeyPEM string
	// SerialNumber is as Consul writes it (hex bytes separated by colons).
	SerialNumber string
}

// LogValue keeps the key out of logs.
func (l Leaf) LogValue() slog.Value {
	return slog.GroupValue(slog.String("serial", l.SerialNumber))
}

// Roots are the CA roots of the mesh, as the agent gives them. A value;
// its zero value is no roots.
type Roots struct {
	// TrustDomain is the mesh's, e.g. "<cluster ID>.consul".
	TrustDomain string
	Roots       []Root
}

// Root is one CA root.
type Root struct {
	// ID is the root's ID as Consul writes it.
	ID string
	// CertPEM is the root certificate.
	CertPEM string
	// Active is set on the root that signs new leaves.
	Active bool
}

// IntentionsEntry is one service-intentions config entry: the intentions
// of one destination. A value; the Authorizer only reads it.
type IntentionsEntry struct {
	// Destination is the entry's Name: a service, or "*" for any.
	Destination string
	// Namespace and Partition are the destination's; empty is default.
	Namespace, Partition string
	// JWT is set when the entry requires a JWT (one provider or more).
	JWT bool
	// Sources are the entry's intentions, one by source.
	Sources []SourceIntention
}

// SourceIntention is one source of an entry: an intention "Name ->
// Destination".
type SourceIntention struct {
	// Name is the calling service, or "*" for any.
	Name string
	// Namespace and Partition are the source's; empty is default. Peer
	// and SamenessGroup, when set, name callers of another cluster.
	Namespace, Partition, Peer, SamenessGroup string
	// Allow is the Action of an intention without permissions: allow when
	// set, deny otherwise.
	Allow bool
	// Permissions are the L7 permissions, in order; empty for an L4
	// intention.
	Permissions []IntentionPermission
}

// IntentionPermission is one L7 permission of an intention.
type IntentionPermission struct {
	// Allow is the permission's Action: allow when set, deny otherwise.
	Allow bool
	// HTTP is what a request must match; nil matches any request.
	HTTP *IntentionHTTP
	// JWT is set when the permission requires a JWT (one provider or
	// more).
	JWT bool
}

// IntentionHTTP is a permission's HTTP match; every condition set must
// hold. At most one of the paths is set.
type IntentionHTTP struct {
	PathExact, PathPrefix, PathRegex string
	// Methods are the methods allowed; empty is any.
	Methods []string
	Headers []IntentionHeader
}

// IntentionHeader is one header condition: the value of header Name is
// Exact, matches Regex, has a Prefix or a Suffix, Contains a string, or
// the header is Present (the first one set in that order decides);
// IgnoreCase folds case and Invert turns the result over.
type IntentionHeader struct {
	Name                                   string
	Present                                bool
	Exact, Prefix, Suffix, Contains, Regex string
	IgnoreCase, Invert                     bool
}

// ACLConfig is the part of the agent's ACL settings that gives the
// default decision of intentions.
type ACLConfig struct {
	// Enabled says whether ACLs are on.
	Enabled bool
	// DefaultPolicy is "allow" or "deny".
	DefaultPolicy string
	// DefaultIntentionPolicy is the agent's default_intention_policy
	// (Consul 1.18 and later): "allow" or "deny", which decides when no
	// intention matches whatever the ACLs say; "" when unset or not known
	// to the agent.
	DefaultIntentionPolicy string
}
