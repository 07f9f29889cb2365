package discovery

import (
	"context"
	"errors"
	"fmt"
	"net/http"

	"github.com/hashicorp/consul/api"

	"github.com/sidecar-mesh/sidecar/pkg/mesh"
)

// MeshAgent is what the service mesh reads from the local Consul agent
// (mesh.Agent): the leaf certificate of a service, the CA roots, the
// intentions, a destination's protocol and the agent's ACL settings, in
// pkg/mesh's types. Its reads block as Consul's blocking queries do. A
// read the agent refuses to the client's token (403) is an error that
// wraps mesh.ErrACLDenied.
//
// Create one with NewMeshAgent; the zero value is not usable. Safe for
// concurrent use.
type MeshAgent struct {
	client *api.Client
}

var _ mesh.Agent = (*MeshAgent)(nil)

// NewMeshAgent reads the mesh's parts from the agent client talks to
// (NewClient). It does not contact the agent.
func NewMeshAgent(client *api.Client) *MeshAgent {
	return &MeshAgent{client: client}
}

// query is q as Consul's client asks it, ending with ctx.
func query(ctx context.Context, q mesh.Query) *api.QueryOptions {
	return (&api.QueryOptions{WaitIndex: q.Index, WaitTime: q.Wait}).WithContext(ctx)
}

// aclDenied adds mesh.ErrACLDenied to err when the agent answered 403.
func aclDenied(err error) error {
	var status api.StatusError
	if errors.As(err, &status) && status.Code == http.StatusForbidden {
		return fmt.Errorf("%w: %w", mesh.ErrACLDenied, err)
	}
	return err
}

// Leaf is service's leaf certificate (/v1/agent/connect/ca/leaf/<service>).
func (a *MeshAgent) Leaf(ctx context.Context, service string, q mesh.Query) (mesh.Leaf, uint64, error) {
	leaf, meta, err := a.client.Agent().ConnectCALeaf(service, query(ctx, q))
	switch {
	case err != nil:
		return mesh.Leaf{}, 0, aclDenied(err)
	case leaf == nil:
		return mesh.Leaf{}, meta.LastIndex, nil
	}
	return mesh.Leaf{CertPEM: leaf.CertPEM, PrivateKeyPEM: leaf.PrivateKeyPEM, SerialNumber: leaf.SerialNumber}, meta.LastIndex, nil
}

// Roots are the CA roots (/v1/agent/connect/ca/roots).
func (a *MeshAgent) Roots(ctx context.Context, q mesh.Query) (mesh.Roots, uint64, error) {
	list, meta, err := a.client.Agent().ConnectCARoots(query(ctx, q))
	switch {
	case err != nil:
		return mesh.Roots{}, 0, aclDenied(err)
	case list == nil:
		return mesh.Roots{}, meta.LastIndex, nil
	}
	roots := mesh.Roots{TrustDomain: list.TrustDomain, Roots: make([]mesh.Root, 0, len(list.Roots))}
	for _, r := range list.Roots {
		if r != nil {
			roots.Roots = append(roots.Roots, mesh.Root{ID: r.ID, CertPEM: r.RootCertPEM, Active: r.Active})
		}
	}
	return roots, meta.LastIndex, nil
}

// Intentions are every service-intentions config entry
// (/v1/config/service-intentions).
func (a *MeshAgent) Intentions(ctx context.Context, q mesh.Query) ([]mesh.IntentionsEntry, uint64, error) {
	list, meta, err := a.client.ConfigEntries().List(api.ServiceIntentions, query(ctx, q))
	if err != nil {
		return nil, 0, aclDenied(err)
	}
	out := make([]mesh.IntentionsEntry, 0, len(list))
	for _, e := range list {
		if si, ok := e.(*api.ServiceIntentionsConfigEntry); ok && si != nil {
			out = append(out, intentionsEntry(si))
		}
	}
	return out, meta.LastIndex, nil
}

// Normalization is the mesh config entry's request normalization for
// inbound traffic (/v1/config/mesh, http.incoming.request_normalization,
// Consul 1.20 and later): the zero value when there is no entry or it
// sets none. The entry is listed rather than read, so that its absence
// too is an answer a blocking query can wait on.
func (a *MeshAgent) Normalization(ctx context.Context, q mesh.Query) (mesh.Normalization, uint64, error) {
	list, meta, err := a.client.ConfigEntries().List(api.MeshConfig, query(ctx, q))
	if err != nil {
		return mesh.Normalization{}, 0, aclDenied(err)
	}
	for _, e := range list {
		m, ok := e.(*api.MeshConfigEntry)
		if !ok || m == nil || m.HTTP == nil || m.HTTP.Incoming == nil || m.HTTP.Incoming.RequestNormalization == nil {
			continue
		}
		rn := m.HTTP.Incoming.RequestNormalization
		return mesh.Normalization{
			InsecureDisablePathNormalization: rn.InsecureDisablePathNormalization,
			MergeSlashes:                     rn.MergeSlashes,
			PathWithEscapedSlashesAction:     rn.PathWithEscapedSlashesAction,
			HeadersWithUnderscoresAction:     rn.HeadersWithUnderscoresAction,
		}, meta.LastIndex, nil
	}
	return mesh.Normalization{}, meta.LastIndex, nil
}

// Protocol is destination's protocol from its compiled discovery chain
// (/v1/discovery-chain/<destination>): "tcp" when the chain names none.
func (a *MeshAgent) Protocol(ctx context.Context, destination string, q mesh.Query) (string, uint64, error) {
	resp, meta, err := a.client.DiscoveryChain().Get(destination, nil, query(ctx, q))
	if err != nil {
		return "", 0, aclDenied(err)
	}
	protocol := "tcp"
	if resp != nil && resp.Chain != nil && resp.Chain.Protocol != "" {
		protocol = resp.Chain.Protocol
	}
	return protocol, meta.LastIndex, nil
}

// agentSelf is the part of GET /v1/agent/self that holds the agent's ACL
// settings: its runtime configuration.
type agentSelf struct {
	DebugConfig struct {
		ACLsEnabled         bool
		ACLResolverSettings struct {
			ACLDefaultPolicy string
		}
		DefaultIntentionPolicy string
	}
}

// ACL is the agent's ACL settings, from its runtime configuration
// (/v1/agent/self, which needs agent:read).
func (a *MeshAgent) ACL(ctx context.Context) (mesh.ACLConfig, error) {
	var self agentSelf
	if _, err := a.client.Raw().Query("/v1/agent/self", &self, (&api.QueryOptions{}).WithContext(ctx)); err != nil {
		return mesh.ACLConfig{}, aclDenied(err)
	}
	return mesh.ACLConfig{Enabled: self.DebugConfig.ACLsEnabled, DefaultPolicy: self.DebugConfig.ACLResolverSettings.ACLDefaultPolicy,
		DefaultIntentionPolicy: self.DebugConfig.DefaultIntentionPolicy}, nil
}

// intentionsEntry is e in the mesh's terms: every field its evaluation
// reads.
func intentionsEntry(e *api.ServiceIntentionsConfigEntry) mesh.IntentionsEntry {
	out := mesh.IntentionsEntry{
		Destination: e.Name,
		Namespace:   e.Namespace,
		Partition:   e.Partition,
		JWT:         e.JWT != nil && len(e.JWT.Providers) > 0,
		Sources:     make([]mesh.SourceIntention, 0, len(e.Sources)),
	}
	for _, src := range e.Sources {
		if src == nil {
			continue
		}
		s := mesh.SourceIntention{
			Name:          src.Name,
			Namespace:     src.Namespace,
			Partition:     src.Partition,
			Peer:          src.Peer,
			SamenessGroup: src.SamenessGroup,
			Allow:         src.Action == api.IntentionActionAllow,
		}
		for _, p := range src.Permissions {
			if p != nil {
				s.Permissions = append(s.Permissions, intentionPermission(p))
			}
		}
		out.Sources = append(out.Sources, s)
	}
	return out
}

func intentionPermission(p *api.IntentionPermission) mesh.IntentionPermission {
	out := mesh.IntentionPermission{
		Allow: p.Action == api.IntentionActionAllow,
		JWT:   p.JWT != nil && len(p.JWT.Providers) > 0,
	}
	h := p.HTTP
	if h == nil {
		return out
	}
	out.HTTP = &mesh.IntentionHTTP{PathExact: h.PathExact, PathPrefix: h.PathPrefix, PathRegex: h.PathRegex, Methods: h.Methods}
	for _, hp := range h.Header {
		out.HTTP.Headers = append(out.HTTP.Headers, mesh.IntentionHeader{
			Name: hp.Name, Present: hp.Present,
			Exact: hp.Exact, Prefix: hp.Prefix, Suffix: hp.Suffix, Contains: hp.Contains, Regex: hp.Regex,
			IgnoreCase: hp.IgnoreCase, Invert: hp.Invert,
		})
	}
	return out
}
