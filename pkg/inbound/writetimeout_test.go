package inbound_test

import (
	"bufio"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"

	"github.com/sidecar-mesh/sidecar/pkg/downstream"
	"github.com/sidecar-mesh/sidecar/pkg/forward"
	"github.com/sidecar-mesh/sidecar/pkg/inbound"
)

// A peer that pipelines requests and never reads their answers loses its
// connection once a write of an answer has waited WriteTimeout: it does
// not hold the app's inbound slot, and every other caller, shut out for
// as long as it likes.
func TestPeerThatStopsReadingLetsGo(t *testing.T) {
	page := strings.Repeat("x", 4<<10)
	app := startApp(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, page) })
	lim := downstream.Limits{WriteTimeout: 300 * time.Millisecond}
	p, addr := startInbound(t, inbound.Config{AppAddr: app.addr(), MaxInFlight: 1, Limits: lim})
	stalledPeer(t, addr, strings.Repeat("GET / HTTP/1.1\r\nHost: svc\r\n\r\n", 3000))
	// The writes back stall, time out, and the connection goes with its
	// slot.
	slotTakenThenFreed(t, p, "the pipelined requests")
	resp, body := roundTrip(t, addr, "GET / HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n")
	if resp.StatusCode != 200 || len(body) != len(page) {
		t.Fatalf("the next caller: %d, %d bytes; want 200 and the page", resp.StatusCode, len(body))
	}
}

// A stream that is only quiet is not cut by the write timeout, on HTTP/1
// (chunked) and HTTP/2 (where a write deadline resets the stream when it
// passes, writing or not).
func TestQuietStreamOutlivesWriteTimeout(t *testing.T) {
	app := startApp(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		for i := range 3 {
			if i > 0 {
				time.Sleep(600 * time.Millisecond) // twice the write timeout, quiet
			}
			io.WriteString(w, "data: tick\n\n")
			w.(http.Flusher).Flush()
		}
	})
	lim := downstream.Limits{WriteTimeout: 300 * time.Millisecond}
	_, addr := startInbound(t, inbound.Config{AppAddr: app.addr(), Limits: lim})
	h2c := &http.Client{Transport: &http2.Transport{AllowHTTP: true,
		DialTLS: func(network, addr string, _ *tls.Config) (net.Conn, error) { return net.Dial(network, addr) }}}
	defer h2c.CloseIdleConnections()
	for name, client := range map[string]*http.Client{"HTTP/1.1": {}, "HTTP/2": h2c} {
		resp, err := client.Get("http://" + addr + "/events")
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		ticks := 0
		sc := bufio.NewScanner(resp.Body)
		for sc.Scan() {
			if sc.Text() == "data: tick" {
				ticks++
			}
		}
		resp.Body.Close()
		if ticks != 3 || sc.Err() != nil {
			t.Errorf("%s: %d ticks, %v; want all 3 of a stream quiet for twice the write timeout between them", name, ticks, sc.Err())
		}
	}
}

// Answers of the sidecar's own (a refusal, 403, pipelined by the
// thousand) and the app's side of an upgraded connection are bounded the
// same way: a peer that stops reading them loses its connection, and
// with it what it held.
func TestPeerThatStopsReadingLocalAnswersAndTunnels(t *testing.T) {
	defer func(d time.Duration) { forward.LocalReplyWriteTimeout = d }(forward.LocalReplyWriteTimeout)
	forward.LocalReplyWriteTimeout = 300 * time.Millisecond
	app := startApp(t, func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Upgrade") != "websocket" {
			io.WriteString(w, "ok")
			return
		}
		w.Header().Set("Connection", "Upgrade")
		w.Header().Set("Upgrade", "websocket")
		w.WriteHeader(http.StatusSwitchingProtocols)
		conn, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer conn.Close()
		frame := strings.Repeat("x", 32<<10)
		for { // the app keeps sending; the peer never reads
			if _, err := brw.WriteString(frame); err != nil || brw.Flush() != nil {
				return
			}
		}
	})
	lim := downstream.Limits{WriteTimeout: 300 * time.Millisecond}
	p, addr := startInbound(t, inbound.Config{AppAddr: app.addr(), MaxInFlight: 1, Limits: lim})

	// Refusals: CONNECT is not served on the inbound port.
	refused := stalledPeer(t, addr, strings.Repeat("CONNECT x:1 HTTP/1.1\r\nHost: x:1\r\n\r\n", 20000))
	if !closedWithin(refused, 10*time.Second) {
		t.Error("a peer that does not read its 403s still has its connection after 10s (local answers' write timeout 300ms)")
	}
	// A tunnel: the app's side keeps sending, the peer never reads.
	stalledPeer(t, addr, "GET /ws HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
	slotTakenThenFreed(t, p, "the upgrade")
	if resp, _ := roundTrip(t, addr, "GET / HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n"); resp.StatusCode != 200 {
		t.Fatalf("the next caller: %d, want 200", resp.StatusCode)
	}
}

// slotTakenThenFreed waits for what a stalled peer sent to take p's slot,
// then for the write timeout (300ms) to free it: within 10s, or t fails.
func slotTakenThenFreed(t *testing.T, p *inbound.Proxy, what string) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); p.InFlight() == 0; {
		if time.Now().After(deadline) {
			t.Fatalf("%s never reached the app", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
	// Free for good: a pipelined request's slot comes free between two
	// requests too, so it must stay free a while (the peer's connection
	// cut, nothing more of it served).
	deadline, freeSince := time.Now().Add(10*time.Second), time.Time{}
	for {
		if time.Now().After(deadline) {
			t.Fatalf("a peer that stopped reading (%s) still holds %d slot(s) after 10s (WriteTimeout 300ms)", what, p.InFlight())
		}
		switch {
		case p.InFlight() != 0:
			freeSince = time.Time{}
		case freeSince.IsZero():
			freeSince = time.Now()
		case time.Since(freeSince) > 200*time.Millisecond:
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// stalledPeer connects to addr with a small receive buffer, sends what,
// and never reads.
func stalledPeer(t *testing.T, addr, what string) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.(*net.TCPConn).SetReadBuffer(4096)
	go io.WriteString(c, what)
	return c
}

// closedWithin reports whether the sidecar closed c within d: once its
// answers stopped, what c has buffered reads out and then EOF (or a reset).
func closedWithin(c net.Conn, d time.Duration) bool {
	time.Sleep(time.Second) // let the sidecar's writes stall first
	_ = c.SetReadDeadline(time.Now().Add(d))
	_, err := io.Copy(io.Discard, c)
	var ne net.Error
	return !(errors.As(err, &ne) && ne.Timeout())
}
