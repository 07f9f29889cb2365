package inbound_test

import (
	"testing"

	"github.com/sidecar-mesh/sidecar/internal/attacktest"
	"github.com/sidecar-mesh/sidecar/pkg/inbound"
)

// The attack suite (internal/attacktest) against the inbound listener, in
// front of the app, with an Observer that adds trace context as the
// tracing one does: every case answered as the table says, nothing
// smuggled, the decoy never reached, and what the Observer adds always
// reaches the app.
func TestAttacks(t *testing.T) {
	app, decoy := attacktest.NewUpstream(t), attacktest.NewUpstream(t)
	obs := &recordingObserver{}
	_, addr := startInbound(t, inbound.Config{AppAddr: app.Addr(), Observer: obs, Limits: attacktest.Limits})
	attacktest.Run(t, attacktest.Target{
		Listener: attacktest.Inbound, Addr: addr, Upstream: app, Decoy: decoy,
		Added: map[string]string{"X-Forwarded-For": "127.0.0.1", "X-Forwarded-Proto": "http", "Traceparent": observerTraceparent},
	})
}

// The upstream half of the suite against the inbound listener: an app that
// sends bytes nobody asked for never hands one caller's answer to another,
// and answers that break framing or limits are refused.
func TestUpstreamAttacks(t *testing.T) {
	attacktest.RunUpstream(t, attacktest.Inbound, func(t *testing.T, app string) string {
		_, addr := startInbound(t, inbound.Config{AppAddr: app})
		return addr
	}, 8, 150)
}

// The HTTP/2 upstream table against the inbound listener: an h2c app.
func TestH2UpstreamAttacks(t *testing.T) {
	attacktest.RunH2Upstream(t, attacktest.Inbound, func(t *testing.T, app string) string {
		_, addr := startInbound(t, inbound.Config{AppAddr: app})
		return addr
	}, 8, 50)
}

// The HTTP/2 table against the inbound listener.
func TestH2Attacks(t *testing.T) {
	app, decoy := attacktest.NewUpstream(t), attacktest.NewUpstream(t)
	_, addr := startInbound(t, inbound.Config{AppAddr: app.Addr()})
	attacktest.RunH2(t, attacktest.Target{Listener: attacktest.Inbound, Addr: addr, Upstream: app, Decoy: decoy})
}
