package inbound_test

import (
	"bufio"
	"bytes"
	"io"
	"net"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/sidecar-mesh/sidecar/internal/attacktest"
	"github.com/sidecar-mesh/sidecar/pkg/forward"
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

// An app that sends a 64 MiB header line is refused with 502
// upstream_bad_response once the header limit is reached, and the
// sidecar's memory stays flat.
func TestHugeAppHeaderKeepsMemoryFlat(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var served sync.WaitGroup
	served.Add(1)
	go func() {
		defer served.Done()
		chunk := bytes.Repeat([]byte("a"), 64<<10)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			if _, err := http.ReadRequest(bufio.NewReader(c)); err == nil {
				io.WriteString(c, "HTTP/1.1 200 OK\r\nX-Big: ")
				for range 1024 { // 64 MiB, never held whole here either
					if _, err := c.Write(chunk); err != nil {
						break
					}
				}
			}
			c.Close()
		}
	}()
	t.Cleanup(func() { ln.Close(); served.Wait() })
	_, addr := startInbound(t, inbound.Config{AppAddr: ln.Addr().String()})
	tr := &http.Transport{}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 30 * time.Second}
	call := func() {
		resp, err := client.Get("http://" + addr + "/")
		if err != nil {
			t.Fatalf("GET: %v", err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadGateway || resp.Header.Get(forward.ErrorHeader) != forward.ReasonUpstreamBadResponse {
			t.Fatalf("got %d %q %.100q, want 502 upstream_bad_response", resp.StatusCode, resp.Header.Get(forward.ErrorHeader), body)
		}
	}
	call() // the first call's own costs are not the line's
	grew := attacktest.PeakRSSGrowth(t, func() {
		for range 3 {
			call()
		}
	})
	// As on the outbound listener (TestHugeResponseHeaderKeepsMemoryFlat):
	// a few MB, where a line read whole would cost 64 MB each time.
	t.Logf("peak resident memory grew by %d KiB over three 64 MiB header lines", grew>>10)
	if grew > 6<<20 {
		t.Errorf("peak resident memory grew by %d KiB over three 64 MiB header lines, want under 6 MiB", grew>>10)
	}
}
