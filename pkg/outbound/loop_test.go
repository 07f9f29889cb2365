package outbound_test

import (
	"net"
	"net/http"
	"net/netip"
	"sync/atomic"
	"testing"

	"github.com/sidecar-mesh/sidecar/pkg/forward"
)

// An endpoint that is one of the sidecar's own listeners is never called:
// a service with one among others is served by the others, a service with
// nothing else gets 508 loop without a dial.
func TestOwnListenerEndpointsRefused(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("up")) })
	var own atomic.Pointer[netip.AddrPort]
	isOwn := func(a netip.AddrPort) bool { o := own.Load(); return o != nil && *o == a }
	// The sidecar's own address is known once it listens: discovery names
	// it through a port reserved now and checked by isOwn later.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ownAddr := ln.Addr().String()
	ln.Close()
	ap := netip.MustParseAddrPort(ownAddr)
	own.Store(&ap)
	sc := startSidecar(t, options{isOwn: isOwn, static: map[string][]string{
		"mixed": {up.addr(), ownAddr}, "self": {ownAddr}}})
	c := sc.client(t)
	for range 10 {
		if resp, body := sc.get(t, c, "mixed", "/"); resp.StatusCode != 200 || body != "up" {
			t.Fatalf("mixed: got %d %q, want 200 from the upstream", resp.StatusCode, body)
		}
	}
	dials := sc.dials.Load()
	resp, _ := sc.get(t, c, "self", "/")
	if resp.StatusCode != http.StatusLoopDetected || resp.Header.Get(forward.ErrorHeader) != forward.ReasonLoop {
		t.Fatalf("self: got %d %q, want 508 loop", resp.StatusCode, resp.Header.Get(forward.ErrorHeader))
	}
	if d := sc.dials.Load() - dials; d != 0 {
		t.Fatalf("self: %d dials, want none", d)
	}
	if n := up.requests.Load(); n != 10 {
		t.Fatalf("the upstream saw %d requests, want 10", n)
	}
}

// A request that comes back to the sidecar that forwarded it (here a
// static endpoint that is the sidecar's own outbound port, which nothing
// else refuses) is refused as a loop on its second arrival: one extra
// request, not one per file descriptor.
func TestHopMarkerStopsALoop(t *testing.T) {
	var arrivals atomic.Int64
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	self := ln.Addr().String()
	ln.Close()
	sc := startSidecar(t, options{static: map[string][]string{"loop": {self}}, listen: self, arrivals: &arrivals})
	c := sc.client(t)
	resp, _ := sc.get(t, c, "loop", "/")
	if resp.StatusCode != http.StatusLoopDetected || resp.Header.Get(forward.ErrorHeader) != forward.ReasonLoop {
		t.Fatalf("got %d %q, want 508 loop", resp.StatusCode, resp.Header.Get(forward.ErrorHeader))
	}
	if n := arrivals.Load(); n != 2 {
		t.Fatalf("the sidecar saw %d arrivals of the request, want 2 (the app's, and its own once)", n)
	}
	// A client's Connection header cannot take the marker off.
	req, _ := http.NewRequest("GET", "http://loop/", nil)
	req.Header.Set("Connection", "X-Sidecar-Hop")
	arrivals.Store(0)
	resp, err = c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusLoopDetected {
		t.Fatalf("with Connection: X-Sidecar-Hop: got %d, want 508", resp.StatusCode)
	}
	if n := arrivals.Load(); n != 2 {
		t.Fatalf("with Connection: X-Sidecar-Hop, %d arrivals, want 2", n)
	}
}
