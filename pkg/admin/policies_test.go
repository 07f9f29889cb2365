package admin

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/policy"
)

// GET /policies lists the policy in force per service with its source,
// version and last rejection; GET /policies/{service} shows one.
func TestAdminPolicies(t *testing.T) {
	store := policy.NewStore(policy.StoreOptions{})
	if err := store.SetFile("p.yaml", []byte("service: users\ntimeout: 2s\n")); err != nil {
		t.Fatal(err)
	}
	_ = store.SetConsul(map[string]policy.KVDocument{"orders": {Key: policy.KVKey("orders"), Value: []byte("retry: {attempts: 0}"), ModifyIndex: 7}})
	srv := httptest.NewServer(Handler(Sources{Config: func() any { return nil }, Resolver: discovery.Chain{}, Policies: store}))
	defer srv.Close()

	get := func(path string, wantStatus int, v any) {
		t.Helper()
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if resp.StatusCode != wantStatus || resp.Header.Get("Content-Type") != "application/json" {
			t.Fatalf("GET %s: %d %s, want %d application/json", path, resp.StatusCode, resp.Header.Get("Content-Type"), wantStatus)
		}
		if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
	}
	var all []policy.Status
	get("/policies", 200, &all)
	if len(all) != 3 || all[0].Service != "*" || all[1].Service != "orders" || all[2].Service != "users" {
		t.Fatalf("/policies = %+v, want *, orders, users", all)
	}
	if o := all[1]; o.Source != "default" || o.LastRejection == nil || o.LastRejection.Version != "7" ||
		o.LastRejection.Source != "consul:sidecar/policies/orders" || o.Effective.Timeout.D().String() != "15s" {
		t.Fatalf("orders = %+v, want the default in force and the rejected version 7", o)
	}
	if u := all[2]; u.Source != "file:p.yaml" || u.Version != policy.ContentVersion([]byte("service: users\ntimeout: 2s\n")) ||
		u.Effective.Timeout.D().String() != "2s" || *u.Effective.Retry.Attempts != 3 {
		t.Fatalf("users = %+v, want the file's document over Defaults", u)
	}
	var one policy.Status
	get("/policies/payments", 200, &one)
	if one.Service != "payments" || one.Source != "default" || one.Effective.Service != "payments" {
		t.Fatalf("/policies/payments = %+v, want the default policy of payments", one)
	}
	var e map[string]string
	get("/policies/Not_A_Service", 404, &e)
	if e["error"] == "" {
		t.Fatalf("/policies/Not_A_Service: %v, want an error", e)
	}
	get("/policies", 200, &all)
	if len(all) != 3 {
		t.Fatalf("/policies lists %d services after GET /policies/payments, want 3: looking is not calling", len(all))
	}
}
