package outbound_test

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/downstream"
	"github.com/sidecar-mesh/sidecar/pkg/forward"
	"github.com/sidecar-mesh/sidecar/pkg/upstream"
)

// Fields that may not stand in a trailer (RFC 9110, 6.5.1: framing,
// routing, authentication) are dropped in both directions; others pass.
func TestForbiddenTrailersDropped(t *testing.T) {
	gotTrailer := make(chan http.Header, 1)
	addr := rawUpstream(t, func(c net.Conn, br *bufio.Reader) {
		req, err := http.ReadRequest(br)
		if err != nil {
			return
		}
		io.Copy(io.Discard, req.Body)
		gotTrailer <- req.Trailer
		io.WriteString(c, "HTTP/1.1 200 OK\r\nTrailer: X-Ok\r\nTransfer-Encoding: chunked\r\n\r\n"+
			"2\r\nok\r\n0\r\nX-Ok: 1\r\nContent-Length: 99\r\nHost: evil\r\nAuthorization: Bearer stolen\r\n\r\n")
	})
	sc := startSidecar(t, options{static: map[string][]string{"svc": {addr}}})
	// Announcing them would be refused (400): net/http checks the Trailer
	// header, not the trailer block itself.
	resp, body := sc.raw(t, "POST / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\nTrailer: X-Ok\r\n\r\n"+
		"5\r\nhello\r\n0\r\nX-Ok: 1\r\nContent-Length: 5\r\nHost: evil\r\n\r\n")
	if resp.StatusCode != 200 || body != "ok" {
		t.Fatalf("got %d %q, want 200 \"ok\"", resp.StatusCode, body)
	}
	for _, name := range []string{"Content-Length", "Host", "Authorization"} {
		if _, ok := resp.Trailer[name]; ok {
			t.Errorf("the client got trailer %s: %v", name, resp.Trailer)
		}
	}
	if resp.Trailer.Get("X-Ok") != "1" {
		t.Errorf("the client's trailers %v lack X-Ok: 1", resp.Trailer)
	}
	select {
	case tr := <-gotTrailer:
		for _, name := range []string{"Content-Length", "Host"} {
			if _, ok := tr[name]; ok {
				t.Errorf("the upstream got trailer %s: %v", name, tr)
			}
		}
		if tr.Get("X-Ok") != "1" {
			t.Errorf("the upstream's trailers %v lack X-Ok: 1", tr)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the request never reached the upstream")
	}
}

// Headers an upstream's Connection header names are hop-by-hop: they never
// reach the client, whatever the size of the head, however it is split
// across writes, and when the name is on a continuation line.
func TestConnectionNamedResponseHeadersDropped(t *testing.T) {
	pad := "X-Pad: " + strings.Repeat("p", 8<<10) + "\r\n" // past the reader's 4 KiB buffer
	addr := rawUpstream(t, func(c net.Conn, br *bufio.Reader) {
		for {
			req, err := http.ReadRequest(br)
			if err != nil {
				return
			}
			io.Copy(io.Discard, req.Body)
			conn, extra := "X-Internal, keep-alive", ""
			switch req.URL.Path {
			case "/close", "/close/split":
				conn = "close, x-internal"
			case "/close/big":
				conn, extra = "close, x-internal", pad
			case "/close/fold":
				conn = "close,\r\n x-internal"
			case "/big":
				extra = pad
			}
			head := "HTTP/1.1 200 OK\r\n" + extra + "Connection: " + conn + "\r\n"
			rest := "X-Internal: secret\r\nX-Public: yes\r\nContent-Length: 2\r\n\r\nok"
			if strings.HasSuffix(req.URL.Path, "/split") {
				io.WriteString(c, head)
				time.Sleep(20 * time.Millisecond) // for the sidecar to read the first part alone
				head = ""
			}
			io.WriteString(c, head+rest)
		}
	})
	sc := startSidecar(t, options{static: map[string][]string{"svc": {addr}}})
	c := sc.client(t)
	// The fast path, and again on a kept-alive connection; then heads that
	// do not come whole in the first read.
	for _, path := range []string{"/", "/", "/close", "/big", "/close/big", "/close/split", "/close/fold"} {
		resp, body := sc.get(t, c, "svc", path)
		if resp.StatusCode != 200 || body != "ok" {
			t.Fatalf("GET %s: got %d %q, want 200 \"ok\"", path, resp.StatusCode, body)
		}
		if v := resp.Header.Get("X-Internal"); v != "" {
			t.Fatalf("GET %s: the client got X-Internal: %q, named in the upstream's Connection header", path, v)
		}
		if resp.Header.Get("X-Public") != "yes" {
			t.Fatalf("GET %s: the client lost X-Public: %v", path, resp.Header)
		}
	}
	resp, _ := sc.raw(t, "GET / HTTP/1.0\r\nHost: svc\r\n\r\n") // net/http's path
	if v := resp.Header.Get("X-Internal"); v != "" || strings.Contains(resp.Header.Get("Connection"), "X-Internal") {
		t.Fatalf("HTTP/1.0: the client got X-Internal %q, Connection %q", v, resp.Header.Get("Connection"))
	}
}

// A header block shorter than the 14 bytes net/http reads to tell an
// HTTP/2 preface apart is answered 400 at once, not when the header
// timeout (here a minute) ends the wait for bytes that never come.
func TestRequestShorterThanPrefaceAnsweredAtOnce(t *testing.T) {
	sc := startSidecar(t, options{static: map[string][]string{"svc": {"127.0.0.1:1"}},
		limits: downstream.Limits{ReadHeaderTimeout: time.Minute}})
	for _, req := range []string{"GET /\r\n\r\n", "G\r\n\r\n", "\r\n\r\n\r\n", "GET /\n\n"} {
		c, err := net.Dial("tcp", sc.addr)
		if err != nil {
			t.Fatal(err)
		}
		_ = c.SetDeadline(time.Now().Add(20 * time.Second))
		io.WriteString(c, req)
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		c.Close()
		if err != nil {
			t.Fatalf("%q: no answer before the client gave up: %v", req, err)
		}
		if resp.StatusCode != http.StatusBadRequest {
			t.Fatalf("%q: got %d, want 400", req, resp.StatusCode)
		}
	}
}

// An endpoint that does not accept within connectTimeout is a connect
// failure (502 upstream_connect_failure), not the request's own deadline
// (504): the request had most of its time left.
func TestConnectTimeoutIsAConnectFailure(t *testing.T) {
	sc := startSidecar(t, options{static: map[string][]string{"svc": {"127.0.0.1:9"}}, // never dialed: see DialContext
		policies: "service: svc\nconnectTimeout: 50ms\ntimeout: 10s\nretry: {attempts: 1}\n",
		transport: upstream.TransportConfig{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			<-ctx.Done() // a SYN nobody answers, without sending one
			return nil, ctx.Err()
		}}})
	resp, body := sc.get(t, sc.client(t), "svc", "/")
	if resp.StatusCode != http.StatusBadGateway || resp.Header.Get(forward.ErrorHeader) != forward.ReasonConnectFailure {
		t.Fatalf("got %d %q %s, want 502 upstream_connect_failure", resp.StatusCode, resp.Header.Get(forward.ErrorHeader), body)
	}
}
