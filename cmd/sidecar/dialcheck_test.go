package main

import (
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// quietConsul is a Consul agent that knows nothing: every read is a 404 at
// index 1, and a blocking query waits until the sidecar gives it up. It is
// enough for a sidecar to run with Consul on.
func quietConsul(t *testing.T) string {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if idx := r.URL.Query().Get("index"); idx != "" && idx != "0" {
			<-r.Context().Done()
			return
		}
		w.Header().Set("X-Consul-Index", "1")
		http.NotFound(w, r)
	}))
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}

// A host name the outbound transport dials is checked by what it resolves
// to then: never one of the sidecar's own listeners, and, with Consul on
// and allowLoopbackEndpoints off, never the sidecar's own host. Endpoints
// that are IP literals (static ones at 127.0.0.1) are not checked.
// "localhost" is an allow-listed host name here, resolving to 127.0.0.1
// as a rebound name from Consul would.
func TestOutboundDialChecksHostNames(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "up") }))
	defer up.Close()
	_, upPort, _ := net.SplitHostPort(strings.TrimPrefix(up.URL, "http://"))
	static := "discovery: {static: {svc: [127.0.0.1:" + upPort + "]}"
	consul := quietConsul(t)
	client := &http.Client{Timeout: 5 * time.Second}
	call := func(rs runningSidecar, host string) (int, string) {
		t.Helper()
		req, _ := http.NewRequest(http.MethodGet, "http://"+rs.out+"/version", nil)
		req.Host = host
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("GET via the sidecar, Host %s: %v", host, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	for _, tc := range []struct {
		name      string
		config    string
		localhost string // "": reached; else a part of the refusal's detail
	}{
		{"without Consul", static + "}", ""},
		{"Consul, allowLoopbackEndpoints off", static + ", consul: {address: " + consul + "}}", "own host (loopback)"},
		{"Consul, allowLoopbackEndpoints on", static + ", consul: {address: " + consul + ", allowLoopbackEndpoints: true}}", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rs := runSidecar(t, tc.config+"\nallowHosts: [localhost]\n")
			if code, body := call(rs, "svc"); code != 200 || body != "up" {
				t.Errorf("static endpoint 127.0.0.1:%s: %d %q; want 200 %q", upPort, code, body, "up")
			}
			_, adminPort, _ := net.SplitHostPort(rs.admin)
			code, body := call(rs, "localhost:"+adminPort)
			if code != http.StatusBadGateway || !strings.Contains(body, "upstream_connect_failure") || !strings.Contains(body, "own listeners") {
				t.Errorf("localhost:%s, the admin listener: %d %q; want 502 upstream_connect_failure naming the sidecar's own listeners", adminPort, code, body)
			}
			code, body = call(rs, "localhost:"+upPort)
			switch {
			case tc.localhost == "" && (code != 200 || body != "up"):
				t.Errorf("localhost:%s: %d %q; want 200 %q", upPort, code, body, "up")
			case tc.localhost != "" && (code != http.StatusBadGateway || !strings.Contains(body, tc.localhost)):
				t.Errorf("localhost:%s: %d %q; want 502 naming %q", upPort, code, body, tc.localhost)
			}
		})
	}
}
