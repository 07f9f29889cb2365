package inbound_test

import (
	"net"
	"strings"
	"testing"

	"github.com/sidecar-mesh/sidecar/internal/hostip"
	"github.com/sidecar-mesh/sidecar/pkg/inbound"
)

// The health port answers every caller with the status, but says why only
// to callers on this host: the reasons hold the app's probe URL, the dial
// error and addresses, and the kubelet needs the code alone. Secrets in the
// probe's URL are redacted even for those.
func TestHealthDetailsForLoopbackCallersOnly(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := ln.Addr().String() // nothing listens there once closed
	ln.Close()
	readiness := startProber(t, closed, inbound.Probe{HTTP: &inbound.HTTPProbe{Path: "/ready?token=s3cret&v=1"}, FailureThreshold: 1}, false)
	if err := readiness.first(t); err == nil {
		t.Fatal("the probe of a closed port passed")
	}
	h := inbound.NewHealthHandler(inbound.HealthConfig{Readiness: readiness.p})

	code, body := hostip.Call(t, hostip.Serve(t, "127.0.0.1", h), "GET", "/healthz/ready", "", nil)
	if code != 503 || !strings.Contains(body, "HTTP GET http://"+closed+"/ready?token=[redacted]\\u0026v=1") ||
		!strings.Contains(body, "connection refused") || strings.Contains(body, "s3cret") {
		t.Errorf("GET /healthz/ready from loopback = %d %s; want 503 with the probe's URL, token redacted, and the dial error", code, body)
	}

	// A peer on another host: a listener on an address of this machine that
	// is not loopback, dialed from this machine, sees that address as the peer.
	ip := hostip.NonLoopback(t)
	remote := hostip.Serve(t, ip, h)
	for _, tc := range []struct {
		method, path string
		code         int
		body         string
	}{
		{"GET", "/healthz/ready", 503, `{"status":"failing"}`},
		{"GET", "/app-health/readyz", 503, `{"status":"failing"}`},
		{"GET", "/app-health/livez", 404, `{"status":"not_configured"}`},
		{"GET", "/healthz/live", 200, `{"status":"ok"}`},
		{"GET", "/nope", 404, `{"status":"not_configured"}`},
		{"POST", "/healthz/ready", 405, `{"status":"not_allowed"}`},
	} {
		code, body := hostip.Call(t, remote, tc.method, tc.path, "", nil)
		if code != tc.code || strings.TrimSpace(body) != tc.body {
			t.Errorf("%s %s from %s = %d %s, want %d %s", tc.method, tc.path, ip, code, body, tc.code, tc.body)
		}
	}
}
