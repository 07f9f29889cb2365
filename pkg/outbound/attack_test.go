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
