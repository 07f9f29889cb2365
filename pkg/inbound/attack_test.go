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
