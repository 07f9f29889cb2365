package outbound_test

import (
	"bufio"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/downstream"
)

// Every request-smuggling shape is answered 400 bad_request by the sidecar
// itself and never reaches the upstream.
func TestSmugglingRejected(t *testing.T) {
	up := newUpstream(t, hostEcho)
	sc := startSidecar(t, options{static: map[string][]string{"svc": {up.addr()}}})

	cases := []struct{ name, req string }{
		{"Content-Length and Transfer-Encoding", "POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"},
		{"Transfer-Encoding before Content-Length", "POST / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n"},
		{"differing Content-Length", "POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde"},
		{"non-numeric Content-Length", "POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: +4\r\n\r\nabcd"},
		{"Transfer-Encoding xchunked", "POST / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"},
		{"Transfer-Encoding chunked, identity", "POST / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"},
		{"two Transfer-Encoding lines", "POST / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"},
		{"Transfer-Encoding with space before colon", "POST / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n"},
		{"bare LF in chunk size line", "POST / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n"},
		{"bare LF after chunk data", "POST / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\n0\r\n\r\n"},
		{"bad chunk size", "POST / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"},
		{"bare LF in last chunk", "POST / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n0\n\r\n"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := up.requests.Load()
			resp, body := sc.raw(t, tc.req)
			if resp.StatusCode != http.StatusBadRequest {
				t.Fatalf("got %d %q, want 400", resp.StatusCode, body)
			}
			if got := resp.Header.Get("X-Sidecar-Error"); got != "bad_request" {
				t.Fatalf("x-sidecar-error %q, want bad_request (body %q)", got, body)
			}
			if n := up.requests.Load() - before; n != 0 {
				t.Fatalf("upstream got %d requests, want 0", n)
			}
		})
	}
}

// A smuggled request hidden behind a valid one on a keep-alive connection
// is not served: the first is answered, the second rejected.
func TestSmugglingPipelined(t *testing.T) {
	up := newUpstream(t, hostEcho)
	sc := startSidecar(t, options{static: map[string][]string{"svc": {up.addr()}}})
	c, err := net.Dial("tcp", sc.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(c, "POST /a HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"+
		"GET /b HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"+
		"GET /c HTTP/1.1\r\nHost: svc\r\n\r\n")
	br := bufio.NewReader(c)
	first, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(first.Body)
	if first.StatusCode != 200 || string(b) != "host=svc path=/a" {
		t.Fatalf("first request: %d %q", first.StatusCode, b)
	}
	second, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, second.Body)
	if second.StatusCode != 400 || second.Header.Get("X-Sidecar-Error") != "bad_request" {
		t.Fatalf("second request: %d %q, want 400 bad_request", second.StatusCode, second.Header.Get("X-Sidecar-Error"))
	}
	if _, err := http.ReadResponse(br, nil); err == nil {
		t.Fatal("third request was answered on a connection whose framing was broken")
	}
	if n := up.requests.Load(); n != 1 {
		t.Fatalf("upstream got %d requests, want 1", n)
	}
}

// Pipelined valid requests with bodies of every framing keep their
// boundaries through the check.
func TestPipelinedBodies(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		io.WriteString(w, r.URL.Path+":"+string(b))
	})
	sc := startSidecar(t, options{static: map[string][]string{"svc": {up.addr()}}})
	c, err := net.Dial("tcp", sc.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	big := strings.Repeat("x", 70000)
	reqs := "POST /1 HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\n\r\nhello" +
		"POST /2 HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n1;x=y\r\nc\r\n0\r\nX-Trailer: t\r\n\r\n" +
		"GET /3 HTTP/1.1\r\nHost: svc\r\n\r\n" +
		"PUT /4 HTTP/1.1\r\nHost: svc\r\nContent-Length: 70000\r\n\r\n" + big
	go io.WriteString(c, reqs)
	br := bufio.NewReader(c)
	for _, want := range []string{"/1:hello", "/2:abc", "/3:", "/4:" + big} {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("waiting for %.10q: %v", want, err)
		}
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != 200 || string(b) != want {
			t.Fatalf("got %d %.40q, want 200 %.40q", resp.StatusCode, b, want)
		}
	}
}

func TestHeaderTooLarge(t *testing.T) {
	up := newUpstream(t, hostEcho)
	sc := startSidecar(t, options{static: map[string][]string{"svc": {up.addr()}}})
	resp, _ := sc.raw(t, "GET / HTTP/1.1\r\nHost: svc\r\nX-Big: "+strings.Repeat("a", 70<<10)+"\r\n\r\n")
	if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
		t.Fatalf("70 KiB header block: got %d, want 431", resp.StatusCode)
	}
	if n := up.requests.Load(); n != 0 {
		t.Fatalf("upstream got %d requests, want 0", n)
	}
}

// A client that trickles its header block is cut off by ReadHeaderTimeout.
func TestSlowlorisHeader(t *testing.T) {
	up := newUpstream(t, hostEcho)
	sc := startSidecar(t, options{
		static: map[string][]string{"svc": {up.addr()}},
		limits: downstream.Limits{ReadHeaderTimeout: 300 * time.Millisecond},
	})
	c, err := net.Dial("tcp", sc.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, "GET / HTTP/1.1\r\nHost: svc\r\n")
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err = io.ReadAll(c)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatal("connection still open after the header timeout")
	}
	if n := up.requests.Load(); n != 0 {
		t.Fatalf("upstream got %d requests, want 0", n)
	}
}

// A client that stops sending its body gets 408 and nothing is forwarded.
func TestStalledBody(t *testing.T) {
	up := newUpstream(t, hostEcho)
	sc := startSidecar(t, options{
		static: map[string][]string{"svc": {up.addr()}},
		limits: downstream.Limits{BodyReadTimeout: 300 * time.Millisecond},
	})
	c, err := net.Dial("tcp", sc.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, "POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 100\r\n\r\nonly ten b")
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatal("no answer to a stalled body")
		}
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusRequestTimeout || resp.Header.Get("X-Sidecar-Error") != "request_timeout" {
		t.Fatalf("got %d %q, want 408 request_timeout", resp.StatusCode, resp.Header.Get("X-Sidecar-Error"))
	}
	// Regression: net/http went on reading the rest of the body with no
	// deadline, holding the connection for as long as the client kept it.
	_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := io.Copy(io.Discard, br); err != nil {
		t.Fatalf("after the 408: %v; want the connection closed by the sidecar", err)
	}
	if n := up.requests.Load(); n != 0 {
		t.Fatalf("upstream got %d requests, want 0", n)
	}
}

// A malformed chunk deep inside a large streamed body aborts the upstream
// request: the upstream never sees a complete request.
func TestBadFramingInStreamedBody(t *testing.T) {
	complete := make(chan bool, 1)
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		_, err := io.Copy(io.Discard, r.Body)
		complete <- err == nil
	})
	sc := startSidecar(t, options{static: map[string][]string{"svc": {up.addr()}}})
	chunk := strings.Repeat("y", 0x10000)
	resp, _ := sc.raw(t, "POST / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"+
		"10000\r\n"+chunk+"\r\n10000\r\n"+chunk+"\r\n5\nhello\r\n0\r\n\r\n")
	if resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("got %d, want 400", resp.StatusCode)
	}
	select {
	case ok := <-complete:
		if ok {
			t.Fatal("upstream read a complete body from a request with broken framing")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("upstream request was neither completed nor aborted")
	}
}
