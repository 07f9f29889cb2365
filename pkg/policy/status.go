package policy

import (
	"strings"
	"time"
)

// KVPrefix is where policies live in Consul KV: one Policy document (YAML
// or JSON) per key, KVPrefix + service; the key of the "*" default is
// KVPrefix + "*".
const KVPrefix = "sidecar/policies/"

// KVKey is the Consul KV key of service's policy.
func KVKey(service string) string { return KVPrefix + service }

// ServiceFromKVKey is the service a Consul KV key holds the policy of, and
// whether the key is a policy key at all.
func ServiceFromKVKey(key string) (string, bool) {
	s, ok := strings.CutPrefix(key, KVPrefix)
	if !ok || s == "" || strings.Contains(s, "/") {
		return "", false
	}
	return s, true
}

// Status is a service's policy in force, as the admin API shows it
// (GET /policies) and `sidecar policy --admin` and `sidecar status` read it.
type Status struct {
	Service string `json:"service"`
	// Source of the service's own document: "consul:<key>", "file:<path>",
	// "inline", or "default" when only "*" and Defaults apply.
	Source string `json:"source"`
	// Version of that document: the Consul KV ModifyIndex, or the first 12
	// hex digits of the file's SHA-256; empty for inline and default.
	Version string `json:"version,omitempty"`
	// Effective is the policy in force after defaults and merging.
	Effective Policy `json:"effective"`
	// LastRejection is the newest update of this service's policy that
	// was rejected, if any; the policy in force stayed.
	LastRejection *Rejection `json:"lastRejection,omitempty"`
}

// Rejection is an update that failed to parse or validate.
type Rejection struct {
	Source  string    `json:"source"`
	Version string    `json:"version,omitempty"`
	Error   string    `json:"error"`
	At      time.Time `json:"at"`
}
