package main

import (
	"io"
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
	resp, err := cs.client.Get("http://" + cs.metrics + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b := new(strings.Builder)
	if _, err := io.Copy(b, resp.Body); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(b.String(), "sidecar_panics_total{") {
		t.Errorf("a panic was recovered:\n%s", grepLines(b.String(), "sidecar_panics_total"))
	}
}

