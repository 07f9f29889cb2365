package main

import (
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/sidecar-mesh/sidecar/internal/attacktest"
)

// A name from the wire never reaches Consul unchecked: an HTTP/2 request
// whose :authority is a path into the KV store (which killed the sidecar
// through a nil entry in Consul's answer) is refused with 400 before any
// lookup, and the sidecar goes on serving, with no panic recovered.
func TestCraftedAuthorityNeverReachesConsul(t *testing.T) {
	cs := startConsulSidecar(t)
	cs.register(t, "web", "web-1", nil)
	if _, err := cs.consul.KV().Put(&api.KVPair{Key: "sidecar/policies/web", Value: []byte("timeout: 5s\n")}, nil); err != nil {
		t.Fatal(err)
	}
	cs.until(t, "web", "web routes", 10*time.Second, func(got string) bool { return got == "web-1" })
	for _, authority := range []string{"a/../../../kv/sidecar/policies/web", "web/../../kv/sidecar/policies/web",
		"web%2f..%2f..%2fkv", "web?index=1", "web#x"} {
		status, reason := attacktest.H2Exchange(t, cs.out, [][2]string{{":authority", authority}})
		if status != http.StatusBadRequest || reason != "bad_request" {
			t.Errorf(":authority %q: got %d %q, want 400 bad_request", authority, status, reason)
		}
		req, _ := http.NewRequest("GET", "http://"+cs.out+"/", nil)
		req.Host = authority
		if resp, err := cs.client.Do(req); err == nil {
			resp.Body.Close()
			if resp.StatusCode != http.StatusBadRequest {
				t.Errorf("Host %q over HTTP/1.1: got %d, want 400", authority, resp.StatusCode)
			}
		}
	}
	if got, failure := cs.call("web"); got != "web-1" {
		t.Fatalf("after the crafted names, web answers %q %s; want web-1", got, failure)
	}
	if m := fetch(t, "http://"+cs.metrics+"/metrics"); strings.Contains(m, "sidecar_panics_total{") {
		t.Errorf("a panic was recovered:\n%s", grepLines(m, "sidecar_panics_total"))
	}
}

// A catalog instance at one of the sidecar's own ports is never called:
// the app can't reach the admin API through the outbound proxy (POST
// /quitquitquit through it stopped the sidecar), and an instance at the
// outbound port can't make requests call the sidecar again and again.
func TestConsulInstanceAtOwnListenerRefused(t *testing.T) {
	cs := startConsulSidecar(t)
	cs.registerAt(t, "evil", "evil-admin", cs.adm, nil)
	cs.registerAt(t, "loopy", "loopy-outbound", cs.out, nil)
	cs.register(t, "web", "web-1", nil)
	cs.until(t, "web", "web routes", 10*time.Second, func(got string) bool { return got == "web-1" })
	for _, svc := range []string{"evil", "loopy"} {
		var status int
		var reason string
		deadline := time.Now().Add(10 * time.Second)
		for time.Now().Before(deadline) {
			req, _ := http.NewRequest("POST", "http://"+cs.out+"/quitquitquit", nil)
			req.Host = svc
			resp, err := cs.client.Do(req)
			if err != nil {
				t.Fatalf("POST /quitquitquit to %s: %v", svc, err)
			}
			resp.Body.Close()
			status, reason = resp.StatusCode, resp.Header.Get("X-Sidecar-Error")
			if status != http.StatusServiceUnavailable { // 503 until Consul's answer is in
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		if status != http.StatusLoopDetected || reason != "loop" {
			t.Errorf("%s: got %d %q, want 508 loop", svc, status, reason)
		}
	}
	if got, failure := cs.call("web"); got != "web-1" {
		t.Fatalf("the sidecar stopped serving: %q %s", got, failure)
	}
	m := fetch(t, "http://"+cs.metrics+"/metrics")
	if !strings.Contains(m, `sidecar_refused_endpoints_total{reason="own_listener",service="evil"}`) {
		t.Errorf("no refused endpoint counted for evil:\n%s", grepLines(m, "sidecar_refused"))
	}
}
