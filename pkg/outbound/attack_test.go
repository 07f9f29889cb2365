package outbound_test

import (
	"testing"

	"github.com/sidecar-mesh/sidecar/internal/attacktest"
)

// The attack suite (internal/attacktest) against the outbound listener:
// every case answered as the table says, nothing smuggled, the decoy
// never reached.
func TestAttacks(t *testing.T) {
	up, decoy := attacktest.NewUpstream(t), attacktest.NewUpstream(t)
	sc := startSidecar(t, options{static: map[string][]string{"svc": {up.Addr()}}, limits: attacktest.Limits})
	attacktest.Run(t, attacktest.Target{
		Listener: attacktest.Outbound, Addr: sc.addr, Upstream: up, Decoy: decoy,
		Added: map[string]string{"X-Forwarded-For": "127.0.0.1", "X-Forwarded-Proto": "http"},
	})
}

// The upstream half of the suite against the outbound listener: an
// endpoint that sends bytes nobody asked for never hands one client's
// answer to another, and answers that break framing or limits are refused.
func TestUpstreamAttacks(t *testing.T) {
	attacktest.RunUpstream(t, attacktest.Outbound, func(t *testing.T, upstream string) string {
		// No retries: each refused answer is one request's.
		return startSidecar(t, options{static: map[string][]string{"svc": {upstream}}, policies: "service: svc\nretry: {attempts: 1}\n" + noBreaker + noOutliers}).addr
	}, 8, 150)
}

// The HTTP/2 upstream table against the outbound listener.
func TestH2UpstreamAttacks(t *testing.T) {
	attacktest.RunH2Upstream(t, attacktest.Outbound, func(t *testing.T, upstream string) string {
		return startSidecar(t, options{static: map[string][]string{"svc": {upstream}}, policies: "service: svc\nretry: {attempts: 1}\n" + noBreaker + noOutliers}).addr
	}, 8, 50)
}

// The HTTP/2 table against the outbound listener: methods, :authority and
// header names checked as on HTTP/1.
func TestH2Attacks(t *testing.T) {
	up, decoy := attacktest.NewUpstream(t), attacktest.NewUpstream(t)
	sc := startSidecar(t, options{static: map[string][]string{"svc": {up.Addr()}}})
	attacktest.RunH2(t, attacktest.Target{Listener: attacktest.Outbound, Addr: sc.addr, Upstream: up, Decoy: decoy})
}

// The upstream table against the outbound listener when the service is in
// the mesh: the endpoints answer over mutual TLS, the misbehaving ones as
// the plaintext ones do, and are held to the same rules.
func TestMeshUpstreamAttacks(t *testing.T) {
	server, client := meshTLSPair(t)
	attacktest.RunUpstreamTLS(t, attacktest.Outbound, server, func(t *testing.T, upstream string) string {
		return startSidecar(t, options{static: map[string][]string{"svc": {upstream}}, meshTLS: client,
			policies: "service: svc\nretry: {attempts: 1}\n" + noBreaker + noOutliers}).addr
	}, 8, 150)
}

// The HTTP/2 upstream table against the outbound listener when the
// service is in the mesh: HTTP/2 over mutual TLS (ALPN h2).
func TestMeshH2UpstreamAttacks(t *testing.T) {
	server, client := meshTLSPair(t)
	server.NextProtos = []string{"h2"}
	attacktest.RunH2UpstreamTLS(t, attacktest.Outbound, server, func(t *testing.T, upstream string) string {
		return startSidecar(t, options{static: map[string][]string{"svc": {upstream}}, meshTLS: client,
			policies: "service: svc\nretry: {attempts: 1}\n" + noBreaker + noOutliers}).addr
	}, 8, 50)
}
