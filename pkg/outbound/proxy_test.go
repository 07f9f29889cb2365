package outbound_test

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func hostEcho(w http.ResponseWriter, r *http.Request) {
	fmt.Fprintf(w, "host=%s path=%s", r.Host, r.URL.RequestURI())
}

func TestAddressing(t *testing.T) {
	up := newUpstream(t, hostEcho)
	sc := startSidecar(t, options{static: map[string][]string{"user-service": {up.addr()}}})

	t.Run("as HTTP proxy (absolute-form)", func(t *testing.T) {
		proxyURL, _ := url.Parse("http://" + sc.addr)
		tr := &http.Transport{Proxy: http.ProxyURL(proxyURL)}
		defer tr.CloseIdleConnections()
		resp, err := (&http.Client{Transport: tr}).Get("http://user-service/users/1?x=y")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != 200 || string(b) != "host=user-service path=/users/1?x=y" {
			t.Fatalf("GET via proxy: got %d %q, want 200 host=user-service path=/users/1?x=y", resp.StatusCode, b)
		}
	})

	c := sc.client(t)
	for _, host := range []string{"user-service", "user-service:80", "user-service.service.consul", "User-Service.service.consul.:8080"} {
		t.Run("Host "+host, func(t *testing.T) {
			resp, body := sc.get(t, c, host, "/users/1")
			if resp.StatusCode != 200 || !strings.HasPrefix(body, "host="+host+" ") {
				t.Fatalf("Host %q: got %d %q, want 200 from user-service with the Host kept", host, resp.StatusCode, body)
			}
		})
	}
}

func TestRoundRobinSpread(t *testing.T) {
	var hits [3]atomic.Int64
	var addrs []string
	for i := range hits {
		up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) { hits[i].Add(1) })
		addrs = append(addrs, up.addr())
	}
	sc := startSidecar(t, options{static: map[string][]string{"svc": addrs}})
	c := sc.client(t)
	const calls = 1000
	for range calls {
		if resp, _ := sc.get(t, c, "svc", "/"); resp.StatusCode != 200 {
			t.Fatalf("status %d", resp.StatusCode)
		}
	}
	for i := range hits {
		got := hits[i].Load()
		if want := int64(calls / 3); got < want*95/100 || got > want*105/100 {
			t.Errorf("endpoint %d got %d of %d calls, want %d ±5%%", i, got, calls, want)
		}
	}
}

func decodeError(t *testing.T, resp *http.Response, body string) map[string]string {
	t.Helper()
	var e map[string]string
	if err := json.Unmarshal([]byte(body), &e); err != nil {
		t.Fatalf("local error body %q is not JSON: %v", body, err)
	}
	if got := resp.Header.Get("X-Sidecar-Error"); got != e["error"] {
		t.Fatalf("x-sidecar-error %q, body error %q: want equal", got, e["error"])
	}
	return e
}

func TestNotAnOpenProxy(t *testing.T) {
	up := newUpstream(t, hostEcho)
	sc := startSidecar(t, options{static: map[string][]string{"user-service": {up.addr()}}})
	c := sc.client(t)

	cases := []struct {
		name, request string
		status        int
		reason        string
	}{
		{"unknown service", "GET /x HTTP/1.1\r\nHost: billing\r\n\r\n", 503, "unknown_service"},
		{"unknown external name", "GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n", 503, "unknown_service"},
		{"IPv4 literal", "GET http://" + up.addr() + "/ HTTP/1.1\r\nHost: " + up.addr() + "\r\n\r\n", 403, "not_allowed"},
		{"IPv6 literal", "GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n", 403, "not_allowed"},
		{"CONNECT", "CONNECT " + up.addr() + " HTTP/1.1\r\nHost: " + up.addr() + "\r\n\r\n", 403, "not_allowed"},
		{"CONNECT to an unknown name", "CONNECT billing:443 HTTP/1.1\r\nHost: billing:443\r\n\r\n", 503, "unknown_service"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			resp, body := sc.raw(t, tc.request)
			if resp.StatusCode != tc.status {
				t.Fatalf("got %d %q, want %d", resp.StatusCode, body, tc.status)
			}
			if e := decodeError(t, resp, body); e["error"] != tc.reason {
				t.Fatalf("reason %q, want %q", e["error"], tc.reason)
			}
		})
	}
	// CONNECT to a known service is served as a connection to the
	// outbound port; TLS inside it is not HTTP and goes nowhere.
	conn, err := net.Dial("tcp", sc.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(conn, "CONNECT user-service:443 HTTP/1.1\r\nHost: user-service:443\r\n\r\n")
	br := bufio.NewReader(conn)
	if resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect}); err != nil || resp.StatusCode != 200 {
		t.Fatalf("CONNECT to a service: %v %v, want 200", resp, err)
	}
	io.WriteString(conn, "\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03") // a TLS ClientHello's start
	_, _ = io.Copy(io.Discard, br)                                       // ends when the sidecar closes the tunnel
	if n := sc.dials.Load(); n != 0 {
		t.Errorf("refused requests made %d dials, want 0", n)
	}
	if n := up.requests.Load(); n != 0 {
		t.Errorf("upstream got %d requests, want 0", n)
	}
	_ = c
}

func TestAllowHosts(t *testing.T) {
	up := newUpstream(t, hostEcho)
	echo := startTCPEcho(t)
	sc := startSidecar(t, options{allowHosts: []string{up.addr(), echo}})

	resp, body := sc.raw(t, "GET http://"+up.addr()+"/ok HTTP/1.1\r\nHost: "+up.addr()+"\r\n\r\n")
	if resp.StatusCode != 200 || body != "host="+up.addr()+" path=/ok" {
		t.Fatalf("allow-listed IP literal: got %d %q", resp.StatusCode, body)
	}

	conn, err := net.Dial("tcp", sc.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintf(conn, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", echo, echo)
	br := bufio.NewReader(conn)
	cresp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil || cresp.StatusCode != 200 {
		t.Fatalf("CONNECT to allow-listed %s: %v %v", echo, cresp, err)
	}
	io.WriteString(conn, "ping\n")
	line, err := br.ReadString('\n')
	if err != nil || line != "ping\n" {
		t.Fatalf("through the tunnel: got %q, %v; want ping", line, err)
	}
}

// startTCPEcho serves an echo on loopback until the test ends.
func startTCPEcho(t *testing.T) string {
	return rawUpstream(t, func(c net.Conn, br *bufio.Reader) { _, _ = io.Copy(c, br) })
}

func TestLocalErrors(t *testing.T) {
	// A port nothing listens on: bind, note, close.
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	dead := ln.Addr().String()
	ln.Close()
	sc := startSidecar(t, options{static: map[string][]string{"down": {dead}, "empty": {}}})
	c := sc.client(t)

	resp, body := sc.get(t, c, "down", "/")
	if e := decodeError(t, resp, body); resp.StatusCode != 502 || e["error"] != "upstream_connect_failure" || e["service"] != "down" {
		t.Errorf("endpoint down: got %d %v, want 502 upstream_connect_failure for service down", resp.StatusCode, e)
	}
	resp, body = sc.get(t, c, "empty", "/")
	if e := decodeError(t, resp, body); resp.StatusCode != 503 || e["error"] != "no_healthy_endpoints" {
		t.Errorf("no endpoints: got %d %v, want 503 no_healthy_endpoints", resp.StatusCode, e)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type %q, want application/json", ct)
	}
}

func TestHeadersForwarded(t *testing.T) {
	seen := make(chan http.Header, 1)
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) { seen <- r.Header.Clone() })
	sc := startSidecar(t, options{static: map[string][]string{"svc": {up.addr()}}})

	// The client names the headers the sidecar sets as hop-by-hop: they must
	// still arrive, while the client's own hop-by-hop header is removed.
	resp, _ := sc.raw(t, "GET / HTTP/1.1\r\nHost: svc\r\nConnection: keep-alive, X-Forwarded-For, X-Forwarded-Proto, X-Private\r\n"+
		"X-Private: secret\r\nX-Forwarded-For: 10.1.2.3\r\nX-Keep: yes\r\n\r\n")
	if resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	h := <-seen
	if got := h.Get("X-Forwarded-For"); got != "127.0.0.1" && got != "10.1.2.3, 127.0.0.1" {
		t.Errorf("X-Forwarded-For %q, want the app's address appended", got)
	}
	if got := h.Get("X-Forwarded-Proto"); got != "http" {
		t.Errorf("X-Forwarded-Proto %q, want http", got)
	}
	if got := h.Get("X-Private"); got != "" {
		t.Errorf("X-Private %q reached upstream, want it removed as hop-by-hop", got)
	}
	if got := h.Get("X-Keep"); got != "yes" {
		t.Errorf("X-Keep %q, want yes", got)
	}
}

func TestStreamingResponse(t *testing.T) {
	next := make(chan struct{})
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		rc := http.NewResponseController(w)
		for i := range 3 {
			fmt.Fprintf(w, "event %d\n", i)
			if err := rc.Flush(); err != nil {
				return
			}
			select {
			case <-next: // the client saw this event before the next is written
			case <-r.Context().Done():
				return
			}
		}
	})
	sc := startSidecar(t, options{static: map[string][]string{"svc": {up.addr()}}})
	c := sc.client(t)
	resp, err := c.Get("http://svc/events")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	br := bufio.NewReader(resp.Body)
	for i := range 3 {
		line, err := br.ReadString('\n')
		if err != nil || line != fmt.Sprintf("event %d\n", i) {
			t.Fatalf("event %d: got %q, %v (a proxy that buffers never delivers it)", i, line, err)
		}
		next <- struct{}{}
	}
}

func TestStreamingRequestBody(t *testing.T) {
	const first = 200 << 10 // larger than what the sidecar holds in memory
	received := make(chan int64, 1)
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		n, err := io.CopyN(io.Discard, r.Body, first)
		received <- n
		if err != nil {
			return
		}
		rest, _ := io.Copy(io.Discard, r.Body)
		fmt.Fprintf(w, "%d", n+rest)
	})
	sc := startSidecar(t, options{static: map[string][]string{"svc": {up.addr()}}})
	c := sc.client(t)

	pr, pw := io.Pipe()
	go func() {
		pw.Write(make([]byte, first))
		// The upstream must get the first part while the client still holds
		// the rest: the body is streamed, not collected first.
		select {
		case n := <-received:
			if n != first {
				pw.CloseWithError(fmt.Errorf("upstream got %d bytes", n))
				return
			}
		case <-time.After(10 * time.Second):
			pw.CloseWithError(fmt.Errorf("upstream did not receive the first %d bytes while the upload was open", first))
			return
		}
		pw.Write(make([]byte, 1000))
		pw.Close()
	}()
	resp, err := c.Post("http://svc/upload", "application/octet-stream", pr)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if string(b) != fmt.Sprint(first+1000) {
		t.Fatalf("upstream counted %q bytes, want %d", b, first+1000)
	}
}

func TestRequestBodies(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		fmt.Fprintf(w, "%s %d %d", r.Method, r.ContentLength, len(b))
	})
	sc := startSidecar(t, options{static: map[string][]string{"svc": {up.addr()}}})
	for _, tc := range []struct {
		name, req, want string
	}{
		{"content-length", "POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\n\r\nhello", "POST 5 5"},
		{"chunked small", "POST / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\n\r\n", "POST 8 8"},
		{"empty POST", "POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 0\r\n\r\n", "POST 0 0"},
		{"duplicate equal Content-Length", "PUT / HTTP/1.1\r\nHost: svc\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok", "PUT 2 2"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, body := sc.raw(t, tc.req)
			if resp.StatusCode != 200 || body != tc.want {
				t.Fatalf("got %d %q, want 200 %q", resp.StatusCode, body, tc.want)
			}
		})
	}
}

func TestUpgrade(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Upgrade") != "echo" {
			http.Error(w, "want upgrade", 400)
			return
		}
		conn, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer conn.Close()
		brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
		brw.Flush()
		line, err := brw.ReadString('\n')
		if err != nil {
			return
		}
		brw.WriteString("echo: " + line)
		brw.Flush()
	})
	sc := startSidecar(t, options{static: map[string][]string{"svc": {up.addr()}}})
	conn, err := net.Dial("tcp", sc.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(conn, "GET /ws HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != 101 {
		t.Fatalf("upgrade: %v %v, want 101", resp, err)
	}
	io.WriteString(conn, "hello\n")
	line, err := br.ReadString('\n')
	if err != nil || line != "echo: hello\n" {
		t.Fatalf("after upgrade: got %q, %v", line, err)
	}
}

func TestClientCancelReachesUpstream(t *testing.T) {
	started := make(chan struct{})
	canceled := make(chan struct{})
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		close(started)
		select {
		case <-r.Context().Done():
			close(canceled)
		case <-time.After(10 * time.Second):
		}
	})
	sc := startSidecar(t, options{static: map[string][]string{"svc": {up.addr()}}})
	conn, err := net.Dial("tcp", sc.addr)
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(conn, "GET /slow HTTP/1.1\r\nHost: svc\r\n\r\n")
	<-started
	conn.Close()
	select {
	case <-canceled:
	case <-time.After(5 * time.Second):
		t.Fatal("client went away but the upstream call was not canceled")
	}
}

// dropSecond is an upstream that answers the first request on each
// connection and drops the connection on the second, having read it: the
// race of a keep-alive timeout with a request on a pooled connection.
func dropSecond(t *testing.T) (addr string, served, dropped *atomic.Int64) {
	t.Helper()
	served, dropped = new(atomic.Int64), new(atomic.Int64)
	addr = rawUpstream(t, func(c net.Conn, br *bufio.Reader) {
		for i := 0; ; i++ {
			req, err := http.ReadRequest(br)
			if err != nil {
				return
			}
			io.Copy(io.Discard, req.Body)
			if i == 1 {
				dropped.Add(1)
				return
			}
			served.Add(1)
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
		}
	})
	return addr, served, dropped
}

func TestStalePooledConnection(t *testing.T) {
	t.Run("idempotent request is sent again once", func(t *testing.T) {
		addr, served, dropped := dropSecond(t)
		sc := startSidecar(t, options{static: map[string][]string{"svc": {addr}}})
		c := sc.client(t)
		for i := range 2 {
			if resp, body := sc.get(t, c, "svc", "/"); resp.StatusCode != 200 || body != "ok" {
				t.Fatalf("call %d: %d %q, want 200 ok", i, resp.StatusCode, body)
			}
		}
		if s, d := served.Load(), dropped.Load(); s != 2 || d != 1 {
			t.Fatalf("upstream served %d and dropped %d, want 2 and 1", s, d)
		}
	})
	t.Run("POST is not sent twice", func(t *testing.T) {
		addr, served, dropped := dropSecond(t)
		sc := startSidecar(t, options{static: map[string][]string{"svc": {addr}}})
		c := sc.client(t)
		post := func() (int, string) {
			resp, err := c.Post("http://svc/", "text/plain", strings.NewReader("x"))
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			return resp.StatusCode, resp.Header.Get("X-Sidecar-Error")
		}
		if code, _ := post(); code != 200 {
			t.Fatalf("first POST: %d", code)
		}
		if code, reason := post(); code != 502 || reason != "upstream_reset" {
			t.Fatalf("second POST: %d %q, want 502 upstream_reset", code, reason)
		}
		if s, d := served.Load(), dropped.Load(); s != 1 || d != 1 {
			t.Fatalf("upstream served %d and dropped %d, want 1 and 1 (a POST is never replayed)", s, d)
		}
	})
}

func TestTrailers(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Trailer", "X-Checksum")
		w.Header().Set("X-Te-Seen", r.Header.Get("Te"))
		io.WriteString(w, "body")
		w.Header().Set("X-Checksum", "abc")
		w.Header().Set(http.TrailerPrefix+"X-Late", "late")
	})
	sc := startSidecar(t, options{static: map[string][]string{"svc": {up.addr()}}})
	req, _ := http.NewRequest("GET", "http://svc/", nil)
	req.Header.Set("Te", "trailers")
	resp, err := sc.client(t).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if string(b) != "body" || resp.Trailer.Get("X-Checksum") != "abc" || resp.Trailer.Get("X-Late") != "late" {
		t.Fatalf("body %q trailers %v, want body and X-Checksum: abc, X-Late: late", b, resp.Trailer)
	}
	if got := resp.Header.Get("X-Te-Seen"); got != "trailers" {
		t.Fatalf("upstream saw TE %q, want trailers", got)
	}
}
