package inbound_test

import (
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"

	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"golang.org/x/net/http2"

	"github.com/sidecar-mesh/sidecar/pkg/inbound"
)

// The app gets the trace context the sidecar continues, and only it: a
// peer's tracestate does not travel on beside a traceparent that is not
// its own (W3C Trace Context), whether the peer's traceparent was
// malformed (a new trace begins) or valid (continued, its tracestate
// with it).
func TestAppGetsOneTraceContext(t *testing.T) {
	got := make(chan http.Header, 1)
	app := startApp(t, func(w http.ResponseWriter, r *http.Request) { got <- r.Header.Clone() })
	tp := sdktrace.NewTracerProvider(sdktrace.WithSampler(sdktrace.AlwaysSample()))
	defer tp.Shutdown(t.Context())
	prop := propagation.NewCompositeTextMapPropagator(propagation.TraceContext{}, propagation.Baggage{})
	obs := inbound.NewTelemetry(tp.Tracer("test"), prop, nil, "app")
	_, addr := startInbound(t, inbound.Config{AppAddr: app.addr(), Observer: obs})

	const parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
	for _, tt := range []struct {
		name, traceparent, tracestate string
		continued                     bool
	}{
		{"malformed", "00-zz-bad", "vendor=spoofed", false},
		{"valid", parent, "vendor=kept", true},
	} {
		roundTrip(t, addr, "GET / HTTP/1.1\r\nHost: svc\r\nTraceparent: "+tt.traceparent+"\r\nTracestate: "+tt.tracestate+"\r\nConnection: close\r\n\r\n")
		h := within(t, got, "the request at the app")
		tp, ts := h.Get("Traceparent"), h.Values("Tracestate")
		switch {
		case len(tp) != len(parent) || tp == tt.traceparent:
			t.Errorf("%s: the app got traceparent %q, want the sidecar's span under it", tt.name, tp)
		case tt.continued && (tp[3:35] != parent[3:35] || len(ts) != 1 || ts[0] != tt.tracestate):
			t.Errorf("%s: the app got %q %q, want the caller's trace continued with its tracestate", tt.name, tp, ts)
		case !tt.continued && len(ts) != 0:
			t.Errorf("%s: the app got tracestate %q beside a new trace %q, want none", tt.name, ts, tp)
		}
	}
}

// A peer's request trailers reach the app only when they are not fields
// the sidecar sets (forwarding, its hop marker, the trace context) nor
// names with '_': an app that merges trailers into headers would take them
// as the sidecar's.
func TestPeerTrailersCannotPoseAsTheSidecars(t *testing.T) {
	got := make(chan http.Header, 1)
	app := startApp(t, func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		got <- r.Trailer.Clone()
	})
	_, addr := startInbound(t, inbound.Config{AppAddr: app.addr()})
	roundTrip(t, addr, "POST / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n"+
		"Trailer: X-Forwarded-For, Content_Length, X-Sidecar-Hop, Traceparent, X-Checksum\r\nConnection: close\r\n\r\n"+
		"3\r\nabc\r\n0\r\nX-Forwarded-For: 6.6.6.6\r\nContent_Length: 5\r\nX-Sidecar-Hop: abc\r\n"+
		"Traceparent: 00-11111111111111111111111111111111-2222222222222222-01\r\nX-Checksum: 900150983cd24fb0\r\n\r\n")
	tr := within(t, got, "the request at the app")
	if tr.Get("X-Checksum") != "900150983cd24fb0" {
		t.Errorf("the app's own trailer did not arrive: %v", tr)
	}
	for _, name := range []string{"X-Forwarded-For", "Content_length", "X-Sidecar-Hop", "Traceparent"} {
		if v := tr.Values(name); len(v) > 0 {
			t.Errorf("trailer %s reached the app: %q", name, v)
		}
	}
}

// The same over HTTP/2, to an app that speaks it (h2c): the trailers the
// sidecar's fields could be taken for are neither announced nor sent.
func TestPeerTrailersCannotPoseAsTheSidecarsOverHTTP2(t *testing.T) {
	got := make(chan http.Header, 1)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	h2s := &http2.Server{}
	app := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		got <- r.Trailer.Clone()
	})
	served := make(chan struct{})
	go func() {
		defer close(served)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go h2s.ServeConn(c, &http2.ServeConnOpts{Handler: app})
		}
	}()
	t.Cleanup(func() { ln.Close(); <-served })
	_, addr := startInbound(t, inbound.Config{AppAddr: ln.Addr().String()})
	tr := &http2.Transport{AllowHTTP: true,
		DialTLS: func(network, addr string, _ *tls.Config) (net.Conn, error) { return net.Dial(network, addr) }}
	defer tr.CloseIdleConnections()
	req, _ := http.NewRequest("POST", "http://"+addr+"/", io.NopCloser(strings.NewReader("abc")))
	req.Trailer = http.Header{"X-Forwarded-For": {"6.6.6.6"}, "X-Sidecar-Hop": {"abc"},
		"Traceparent": {"00-11111111111111111111111111111111-2222222222222222-01"}, "X-Checksum": {"900150983cd24fb0"}}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	trl := within(t, got, "the request at the app")
	if trl.Get("X-Checksum") != "900150983cd24fb0" {
		t.Errorf("the app's own trailer did not arrive: %v", trl)
	}
	for _, name := range []string{"X-Forwarded-For", "X-Sidecar-Hop", "Traceparent"} {
		if v := trl.Values(name); len(v) > 0 {
			t.Errorf("trailer %s reached the app: %q", name, v)
		}
	}
}
