package main

import (
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/outbound"
	"github.com/sidecar-mesh/sidecar/pkg/policy"
)

// fakeAdmin serves a sidecar's admin API with fixed answers, in the types
// the real one encodes. Without policies, GET /policies is a 404, as on a
// build without policy management.
func fakeAdmin(t *testing.T, withPolicies bool) string {
	t.Helper()
	docs, err := policy.Parse([]byte(`service: "*"
timeout: 10s
retry: {attempts: 2}
---
service: users
retry: {perTryTimeout: 1s, on: [connect-failure, timeout, 503]}
`), "policies.yaml")
	if err != nil {
		t.Fatal(err)
	}
	by := map[string]policy.Policy{}
	for _, d := range docs {
		by[d.Service] = d
	}
	at := time.Date(2025, 1, 1, 12, 0, 0, 0, time.UTC)
	endpoints := struct {
		Services []endpointsStatus `json:"services"`
	}{Services: []endpointsStatus{
		{EndpointSet: discovery.EndpointSet{Service: "users", Source: "consul", UpdatedAt: at,
			Endpoints: []discovery.Endpoint{{Addr: "10.0.0.1:8080"}, {Addr: "10.0.0.2:8080"}}}, AgeSeconds: 3.2},
		{EndpointSet: discovery.EndpointSet{Service: "billing", Source: "static", UpdatedAt: at, Endpoints: []discovery.Endpoint{}}, AgeSeconds: 61},
	}}
	var users outbound.ServiceStatus
	users.Service, users.InFlight, users.Limit = "users", 2, 12
	users.Adaptive = &outbound.AdaptiveStatus{MinRTTMs: 4.2, SampleRTTMs: 5.05}
	users.Breaker.State, users.Breaker.Requests, users.Breaker.Failures = "closed", 40, 3
	users.RetryBudget.Requests, users.RetryBudget.Retries = 40, 3
	users.Ejected = []outbound.EjectedEndpoint{{Addr: "10.0.0.2:8080", Until: at.Add(30 * time.Second), Ejections: 1}}
	var billing outbound.ServiceStatus
	billing.Service, billing.Breaker.State, billing.Ejected, billing.Limit = "billing", "open", []outbound.EjectedEndpoint{}, 1024
	billing.Breaker.Requests, billing.Breaker.Failures, billing.Breaker.ConsecutiveFailures = 5, 5, 5
	policies := []policy.Status{
		{Service: "*", Source: "file:/etc/sidecar/policies.yaml", Version: "a1b2c3d4e5f6", Effective: policy.Effective("*", by)},
		{Service: "users", Source: "consul:sidecar/policies/users", Version: "42", Effective: policy.Effective("users", by),
			LastRejection: &policy.Rejection{Source: "consul:sidecar/policies/users", Version: "43", At: at.Add(5 * time.Second),
				Error: "consul:sidecar/policies/users:3: retry.attempts: 0 is not allowed (allowed: 1 to 10)"}},
		{Service: "billing", Source: "default", Effective: policy.Effective("billing", by)},
	}
	mux := http.NewServeMux()
	serve := func(path string, v any) {
		mux.HandleFunc("GET "+path, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			_ = json.NewEncoder(w).Encode(v)
		})
	}
	serve("/version", buildInfo{Version: "v1.2.3", Commit: "abc123", Go: "go1.26.8"})
	serve("/endpoints", endpoints)
	serve("/resilience", []outbound.ServiceStatus{billing, users})
	if withPolicies {
		serve("/policies", policies)
	}
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}

// `sidecar status` in each -o format, and with a sidecar that does not
// report its policies.
func TestStatusGoldens(t *testing.T) {
	admin := fakeAdmin(t, true)
	for _, format := range outputFormats {
		out, _, err := cliIn(t, nil, "", "status", "--admin", admin, "-o", format)
		if err != nil {
			t.Fatal(err)
		}
		golden(t, "status."+format, strings.ReplaceAll(out, admin, "ADDR"))
	}
	old := fakeAdmin(t, false)
	out, _, err := cliIn(t, map[string]string{"SIDECAR_ADMIN_ADDR": old}, "", "status")
	if err != nil {
		t.Fatalf("status of a sidecar without GET /policies: %v", err)
	}
	golden(t, "status-no-policies.table", strings.ReplaceAll(out, old, "ADDR"))
	out, _, err = cliIn(t, nil, "", "status", "--admin", old, "-o", "json")
	var st sidecarStatus
	if err != nil || json.Unmarshal([]byte(out), &st) != nil || len(st.NotReported) != 1 || st.NotReported[0] != "policies" {
		t.Fatalf("status -o json without GET /policies: %v, notReported %v", err, st.NotReported)
	}
	if _, _, err := cliIn(t, nil, "", "status", "--admin", freePort(t)); err == nil || !strings.Contains(err.Error(), "cannot reach the sidecar's admin API") {
		t.Fatalf("status with nothing listening: %v", err)
	}
	if _, _, err := cliIn(t, nil, "", "status", "--admin", admin, "-o", "wide"); err == nil || !strings.Contains(err.Error(), `--output "wide": allowed table, json, yaml`) {
		t.Fatalf("status -o wide: %v", err)
	}
}

// list, get and explain read a sidecar's policies in force with --admin.
func TestPolicyAdminGoldens(t *testing.T) {
	admin := fakeAdmin(t, true)
	sc := func(s string) string { return strings.ReplaceAll(s, admin, "ADDR") }
	out, errOut, err := cliIn(t, nil, "", "policy", "list", "--admin", admin)
	if err != nil {
		t.Fatal(err)
	}
	golden(t, "list-admin.table", sc(out))
	if !strings.Contains(errOut, "users: the update from consul:sidecar/policies/users version 43 was rejected at 2025-01-01T12:00:05Z") {
		t.Fatalf("list --admin does not explain the rejected update on stderr:\n%s", errOut)
	}
	out, _, err = cliIn(t, nil, "", "policy", "list", "--admin", admin, "-o", "json")
	var entries []policy.Status // the admin API's shape reads list's JSON
	if err != nil || json.Unmarshal([]byte(out), &entries) != nil || len(entries) != 3 || entries[1].LastRejection == nil {
		t.Fatalf("list --admin -o json: %v\n%s", err, out)
	}
	out, _, err = cliIn(t, nil, "", "policy", "get", "users", "--admin", admin)
	if err != nil {
		t.Fatal(err)
	}
	golden(t, "get-admin.yaml", sc(out))
	out, _, err = cliIn(t, nil, "", "policy", "explain", "users", "--admin", admin)
	if err != nil {
		t.Fatal(err)
	}
	golden(t, "explain-admin", sc(out))
	if _, _, err := cliIn(t, nil, "", "policy", "get", "nope", "--admin", admin); err == nil || !strings.Contains(err.Error(), `reports no policy for "nope"`) {
		t.Fatalf("get of an unknown service with --admin: %v", err)
	}
	if _, _, err := cliIn(t, nil, "", "policy", "list", "--admin", fakeAdmin(t, false)); err == nil || !strings.Contains(err.Error(), "does not report its policies") {
		t.Fatalf("list --admin of a sidecar without GET /policies: %v", err)
	}
	if _, _, err := cliIn(t, nil, "", "policy", "list", "--admin", admin, "--consul-addr", "127.0.0.1:8500"); err == nil || !strings.Contains(err.Error(), "exclude each other") {
		t.Fatalf("--admin with --consul-addr: %v", err)
	}
}

// status and --admin against a real sidecar: its endpoints, the breaker of
// a service it called, and its policies when it reports them.
func TestStatusRealSidecar(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") }))
	defer up.Close()
	upAddr := strings.TrimPrefix(up.URL, "http://")
	rs := runSidecar(t, `
discovery: {static: {user-service: [`+upAddr+`]}}
policies:
  - {service: "*", timeout: 10s}
  - service: user-service
    retry: {attempts: 2}
`)
	out, admin := rs.out, rs.admin
	client := &http.Client{Timeout: 5 * time.Second}
	for range 3 {
		req, _ := http.NewRequest("GET", "http://"+out+"/", nil)
		req.Host = "user-service"
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("call through the sidecar: %d", resp.StatusCode)
		}
	}
	text, _, err := cliIn(t, map[string]string{"SIDECAR_ADMIN_ADDR": admin}, "", "status")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []*regexp.Regexp{
		regexp.MustCompile(`Sidecar at ` + regexp.QuoteMeta(admin) + `: sidecar \S+ \(commit `),
		regexp.MustCompile(`(?m)^user-service +static +1 +\d+s +` + regexp.QuoteMeta(upAddr) + `$`),
		regexp.MustCompile(`(?m)^user-service +closed +3 +0 +0 +1024 +0 of 3 +-$`),
	} {
		if !want.MatchString(text) {
			t.Errorf("status lacks %s:\n%s", want, text)
		}
	}
	var st sidecarStatus
	js, _, err := cliIn(t, nil, "", "status", "--admin", admin, "-o", "json")
	if err != nil || json.Unmarshal([]byte(js), &st) != nil || len(st.Endpoints) != 1 || len(st.Resilience) != 1 ||
		st.Resilience[0].Breaker.State != "closed" || st.Resilience[0].RetryBudget.Requests != 3 {
		t.Fatalf("status -o json: %v\n%s", err, js)
	}

	// Policies: reported by a sidecar with GET /policies, "not reported"
	// by one without; the CLI works with both.
	resp, err := http.Get("http://" + admin + "/policies")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	list, _, listErr := cliIn(t, nil, "", "policy", "list", "--admin", admin)
	if resp.StatusCode == http.StatusNotFound {
		t.Log("this sidecar has no GET /policies: checking the not-reported path")
		if !strings.Contains(text, "policies: not reported by this sidecar") {
			t.Errorf("status of a sidecar without GET /policies lacks the not-reported line:\n%s", text)
		}
		if listErr == nil || !strings.Contains(listErr.Error(), "does not report its policies") {
			t.Errorf("policy list --admin without GET /policies: %v", listErr)
		}
		return
	}
	if listErr != nil || !regexp.MustCompile(`(?m)^user-service +10s +2 `).MatchString(list) {
		t.Fatalf("policy list --admin: %v\n%s", listErr, list)
	}
	if !regexp.MustCompile(`(?m)^user-service +10s +2 `).MatchString(text) {
		t.Errorf("status lacks user-service's policy in force:\n%s", text)
	}
	// A service without a document of its own: the "*" policy in force.
	if row, _, err := cliIn(t, nil, "", "policy", "get", "orders", "--admin", admin, "-o", "table"); err != nil ||
		!regexp.MustCompile(`(?m)^orders +10s +3 +none .* default +-$`).MatchString(row) {
		t.Fatalf("policy get orders --admin: %v\n%s", err, row)
	}
	explain, _, err := cliIn(t, nil, "", "policy", "explain", "user-service", "--admin", admin)
	if err != nil || !regexp.MustCompile(`(?m)^  timeout +10s +\*$`).MatchString(explain) ||
		!regexp.MustCompile(`(?m)^  retry.attempts +2 +user-service$`).MatchString(explain) {
		t.Fatalf("explain --admin: %v\n%s", err, explain)
	}

	// diff --admin: is this sidecar running what the file says? The same
	// documents: exit 0, nothing printed; another timeout: exit 1 and the
	// line that differs.
	same := "service: \"*\"\ntimeout: 10s\n---\nservice: user-service\nretry: {attempts: 2}\n"
	if out, _, err := cliIn(t, nil, same, "policy", "diff", "-f", "-", "--admin", admin); err != nil || out != "" {
		t.Fatalf("policy diff --admin of the documents in force: %v\n%s", err, out)
	}
	other := "service: \"*\"\ntimeout: 3s\n---\nservice: user-service\nretry: {attempts: 2}\n"
	out, _, err = cliIn(t, nil, other, "policy", "diff", "-f", "-", "--admin", admin)
	var ee *exitError
	if !errors.As(err, &ee) || ee.code != diffDifferent || !strings.Contains(out, "-timeout: 10s") || !strings.Contains(out, "+timeout: 3s") {
		t.Fatalf("policy diff --admin of another timeout: %v\n%s", err, out)
	}
}
