// Package mesh is this sidecar's part of Consul's service mesh (Connect):
// its identity (the leaf certificate of its service and the CA roots, kept
// current from the local Consul agent), the TLS configurations that make and
// check mesh connections with it, and the authorization of callers by
// Consul's intentions. It reads the agent through the small interfaces of
// agent.go (IdentityAgent, IntentionsAgent), in its own types; pkg/discovery
// implements them over Consul's API, and registers the sidecar proxy that
// lets Consul's own proxies find the app through this sidecar.
package mesh
