package mesh

import (
	"context"
	"crypto/tls"
	"strings"
	"testing"
)

// A caller of another namespace or partition (an Enterprise CA signs such
// certificates) matches no intention here, "*" included: the default
// decides for it, as Envoy's principals (spiffe://<td>/ns/default/...)
// leave it to the default.
func TestCallersOfOtherTenanciesMatchNoIntention(t *testing.T) {
	entries := []IntentionsEntry{{Destination: "api", Sources: []SourceIntention{
		{Name: "web", Allow: true}, {Name: "*", Allow: true}}}}
	a := &Authorizer{}
	a.snap.Store(mustCompile(t, entries, "tcp", denyByDefault))
	web := SPIFFEID{TrustDomain: "x.consul", Namespace: "default", Partition: "default", Datacenter: "dc1", Service: "web"}
	if d := a.AuthorizeCaller(web, nil); !d.Allowed || d.Default {
		t.Fatalf("web of the default namespace: %+v, want allowed by its intention", d)
	}
	for _, other := range []SPIFFEID{
		{TrustDomain: "x.consul", Namespace: "team-b", Partition: "default", Datacenter: "dc1", Service: "web"},
		{TrustDomain: "x.consul", Namespace: "default", Partition: "other", Datacenter: "dc1", Service: "web"},
		{TrustDomain: "x.consul", Namespace: "team-b", Partition: "default", Datacenter: "dc1", Service: "billing"},
	} {
		d := a.AuthorizeCaller(other, nil)
		if d.Allowed || !d.Default || !strings.Contains(d.By, "namespace "+other.Namespace+", partition "+other.Partition) {
			t.Errorf("%s: %+v, want the default (deny), saying why", other, d)
		}
	}
}

// aclOnly is an agent that answers only its ACL settings.
type aclOnly struct {
	IntentionsAgent
	acl ACLConfig
}

func (a aclOnly) ACL(context.Context) (ACLConfig, error) { return a.acl, nil }

// default_intention_policy (Consul 1.18 and later) decides when no
// intention matches, whatever the ACLs say.
func TestDefaultIntentionPolicyDecides(t *testing.T) {
	for _, tt := range []struct {
		acl   ACLConfig
		allow bool
		why   string
	}{
		{ACLConfig{}, true, "ACLs off"},
		{ACLConfig{DefaultIntentionPolicy: "deny"}, false, "default_intention_policy deny"},
		{ACLConfig{Enabled: true, DefaultPolicy: "allow", DefaultIntentionPolicy: "deny"}, false, "default_intention_policy deny"},
		{ACLConfig{Enabled: true, DefaultPolicy: "deny", DefaultIntentionPolicy: "allow"}, true, "default_intention_policy allow"},
		{ACLConfig{Enabled: true, DefaultPolicy: "deny"}, false, "ACL default policy deny"},
	} {
		d, err := readDefault(context.Background(), aclOnly{acl: tt.acl})
		if err != nil || d.allow != tt.allow || d.why != tt.why {
			t.Errorf("%+v: %+v, %v; want allow=%v (%s)", tt.acl, d, err, tt.allow, tt.why)
		}
	}
	if _, err := readDefault(context.Background(), aclOnly{acl: ACLConfig{DefaultIntentionPolicy: "maybe"}}); err == nil {
		t.Error("default_intention_policy maybe: no error")
	}
}

// The upstream's identity is compared to the letter, as Envoy matches the
// URI SAN: Consul's ACLs tell "API" from "api".
func TestUpstreamIdentityExact(t *testing.T) {
	m := &material{leaf: &tls.Certificate{}, self: SPIFFEID{TrustDomain: "x.consul", Namespace: "default", Partition: "default", Datacenter: "dc1", Service: "web"}}
	id := func(ns, ap, svc string) SPIFFEID {
		return SPIFFEID{TrustDomain: "x.consul", Namespace: ns, Partition: ap, Datacenter: "dc1", Service: svc}
	}
	if err := m.isService(id("default", "default", "api"), "api"); err != nil {
		t.Fatalf("api as api: %v", err)
	}
	for _, got := range []SPIFFEID{id("default", "default", "API"), id("DEFAULT", "default", "api"), id("default", "Default", "api"), id("default", "default", "apis")} {
		if err := m.isService(got, "api"); err == nil {
			t.Errorf("%s accepted as api", got)
		}
	}
}
