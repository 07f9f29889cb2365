package config

import (
	"net"
	"strconv"

	"github.com/sidecar-mesh/sidecar/pkg/policy"
)

// Mesh modes (Mesh.Mode).
const (
	MeshOff           = "off"
	MeshConsulConnect = "consul-connect"
)

// Plaintext inbound settings (Mesh.PlaintextInbound).
const (
	PlaintextAllow = "allow"
	PlaintextDeny  = "deny"
)

// DefaultMeshInboundTLS is mesh.inboundTLS's default (DESIGN.md, "Mesh
// security").
const DefaultMeshInboundTLS = "0.0.0.0:15008"

// Mesh configures the service mesh (Consul Connect): this sidecar's
// identity, mutual TLS between sidecars and authorization by Consul's
// intentions. Off by default.
type Mesh struct {
	// Mode is off or consul-connect. Default off.
	Mode string `yaml:"mode,omitempty" json:"mode,omitempty"`
	// InboundTLS is the mutual-TLS inbound listener the mesh calls the app
	// through, registered in Consul as the app's sidecar proxy. Default
	// 0.0.0.0:15008.
	InboundTLS string `yaml:"inboundTLS,omitempty" json:"inboundTLS,omitempty"`
	// PlaintextInbound is deny (the plaintext inbound listener serves
	// loopback callers only: everyone else comes through the mesh) or
	// allow. Default deny.
	PlaintextInbound string `yaml:"plaintextInbound,omitempty" json:"plaintextInbound,omitempty"`
}

// On reports whether the mesh is on.
func (m Mesh) On() bool { return m.Mode == MeshConsulConnect }

// InboundTLSAddr is mesh.inboundTLS, or its default.
func (m Mesh) InboundTLSAddr() string {
	if m.InboundTLS == "" {
		return DefaultMeshInboundTLS
	}
	return m.InboundTLS
}

// DenyPlaintext reports whether the plaintext inbound listener serves
// loopback callers only: in the mesh, unless plaintextInbound is allow.
func (m Mesh) DenyPlaintext() bool { return m.On() && m.PlaintextInbound != PlaintextAllow }

func (c *Config) validateMesh(add func(format string, args ...any)) {
	m := c.Mesh
	switch m.Mode {
	case "", MeshOff, MeshConsulConnect:
	default:
		add("mesh.mode: %s is not allowed (allowed: off, consul-connect)", policy.Quote(m.Mode))
	}
	switch m.PlaintextInbound {
	case "", PlaintextAllow, PlaintextDeny:
	default:
		add("mesh.plaintextInbound: %s is not allowed (allowed: deny, allow)", policy.Quote(m.PlaintextInbound))
	}
	if m.InboundTLS != "" {
		if _, port, err := net.SplitHostPort(m.InboundTLS); err != nil {
			add("mesh.inboundTLS: %s is not host:port", policy.Quote(m.InboundTLS))
		} else if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
			add("mesh.inboundTLS: %s: the port must be 1 to 65535", policy.Quote(m.InboundTLS))
		}
	}
	if !m.On() {
		return
	}
	if c.Service == "" {
		add("mesh.mode: consul-connect needs service: the mesh identity is the service's")
	}
	if co := c.Discovery.Consul; co == nil || co.Address == "" {
		add("mesh.mode: consul-connect needs discovery.consul.address: identities and intentions come from the Consul agent")
	}
	if c.AppPort == 0 {
		add("mesh.mode: consul-connect needs appPort: the mesh calls the app through the sidecar")
	}
}
