package mesh_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/mesh"
)

// fakeAgent answers the four reads of Check as an agent whose ACL
// configuration is self (a /v1/agent/self DebugConfig as Consul 1.16
// serves it), or 403 for an empty self; its intentions, discovery chain
// and mesh config entries are empty, or 403 when forbidden.
func fakeAgent(t *testing.T, self string, forbidden bool) mesh.IntentionsAgent {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Consul-Index", "7")
		switch {
		case r.URL.Path == "/v1/agent/self" && self == "",
			forbidden && r.URL.Path != "/v1/agent/self":
			http.Error(w, "Permission denied: token lacks permission", http.StatusForbidden)
		case r.URL.Path == "/v1/agent/self":
			fmt.Fprintf(w, `{"Config": {"Datacenter": "dc1"}, "DebugConfig": %s}`, self)
		case r.URL.Path == "/v1/config/service-intentions":
			fmt.Fprint(w, `[]`)
		case r.URL.Path == "/v1/discovery-chain/api":
			fmt.Fprint(w, `{"Chain": {"ServiceName": "api", "Protocol": "tcp"}}`)
		case r.URL.Path == "/v1/config/mesh":
			fmt.Fprint(w, `[]`)
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(srv.Close)
	c, err := discovery.NewClient(discovery.ClientConfig{Address: srv.Listener.Addr().String(), NonPooled: true})
	if err != nil {
		t.Fatal(err)
	}
	return discovery.NewMeshAgent(c)
}

// The default decision is the agent's: allow with ACLs off or a default
// policy of allow, deny with deny or when the token may not read the
// agent's configuration (only an ACL system refuses it).
func TestDefaultDecision(t *testing.T) {
	tests := []struct {
		self    string
		allowed bool
		by      string
	}{
		{`{"ACLsEnabled": false, "ACLResolverSettings": {"ACLDefaultPolicy": "deny"}}`, true, "default (ACLs off: allow)"},
		{`{"ACLsEnabled": true, "ACLResolverSettings": {"ACLDefaultPolicy": "allow"}}`, true, "default (ACL default policy allow: allow)"},
		{`{"ACLsEnabled": true, "ACLResolverSettings": {"ACLDefaultPolicy": "deny"}}`, false, "default (ACL default policy deny: deny)"},
		{"", false, "default (ACLs on, and the agent's default policy not readable with this token: deny)"},
	}
	for _, tt := range tests {
		got, err := mesh.Check(context.Background(), fakeAgent(t, tt.self, false), "web", "api", nil)
		if err != nil || got.Allowed != tt.allowed || got.By != tt.by || !got.Default {
			t.Errorf("Check(web -> api) with no intentions and DebugConfig %s: got %+v, %v; want allowed=%v by %q",
				orForbidden(tt.self), got, err, tt.allowed, tt.by)
		}
	}
	_, err := mesh.Check(context.Background(), fakeAgent(t, `{"ACLsEnabled": true, "ACLResolverSettings": {"ACLDefaultPolicy": "extend-cache"}}`, false), "web", "api", nil)
	if err == nil || !strings.Contains(err.Error(), `default policy "extend-cache", want allow or deny`) {
		t.Errorf("Check(web -> api) with ACL default policy extend-cache: got error %v, want one naming the policy", err)
	}
}

func orForbidden(self string) string {
	if self == "" {
		return "(403)"
	}
	return self
}

// A read the agent refuses to the token is marked ErrACLDenied, so that
// the CLI can say which setting to change.
func TestACLDenied(t *testing.T) {
	_, err := mesh.Check(context.Background(), fakeAgent(t, `{"ACLsEnabled": true, "ACLResolverSettings": {"ACLDefaultPolicy": "deny"}}`, true), "web", "api", nil)
	if !errors.Is(err, mesh.ErrACLDenied) || !strings.Contains(err.Error(), "Permission denied") {
		t.Fatalf("Check(web -> api) with the intentions refused (403): got error %v, want ErrACLDenied with the agent's words", err)
	}
}
