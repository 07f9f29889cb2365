package outbound_test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"
)

// On the event-loop engine, a local error answer that waits for a client
// not reading ends the call: its timeout does not fire afterwards (a
// second answer, a 504 the client never asked for, would have followed
// it and shifted every later answer on the connection by one), nor does
// the client's leaving count it again. The client pipelines failing
// requests and reads nothing past the timeout, then reads: one answer
// each, each a 502.
func TestLoopErrorAnswerEndsTheCall(t *testing.T) {
	loopsOnly(t)
	dead, _ := net.Listen("tcp", "127.0.0.1:0")
	deadAddr := dead.Addr().String()
	dead.Close()
	sc := startSidecar(t, options{loops: true, static: map[string][]string{"dead": {deadAddr}},
		policies: "service: dead\ntimeout: 300ms\nretry: {attempts: 1}\n" + noBreaker + noOutliers})
	d := net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
		// A small window and segments: the sidecar's socket soon holds
		// all it may of the answers, and the rest wait in the engine.
		return c.Control(func(fd uintptr) {
			syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 2048)
			syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_MAXSEG, 536)
		})
	}}
	conn, err := d.Dial("tcp", sc.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	const n = 3000
	go func() {
		bw := bufio.NewWriter(conn)
		for range n {
			io.WriteString(bw, "GET / HTTP/1.1\r\nHost: dead\r\n\r\n")
		}
		bw.Flush()
	}()
	time.Sleep(time.Second) // past the timeout, reading nothing
	br := bufio.NewReader(conn)
	statuses := map[string]int{}
	for i := range n {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("answer %d of %d: %v (so far: %v)", i+1, n, err, statuses)
		}
		io.Copy(io.Discard, resp.Body)
		statuses[fmt.Sprint(resp.StatusCode, " ", resp.Header.Get("X-Sidecar-Error"))]++
	}
	conn.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if b, _ := br.Peek(1); len(b) > 0 {
		more, _ := io.ReadAll(br)
		t.Fatalf("answers %v, then more than one answer a request: %q", statuses, more[:min(len(more), 200)])
	}
	if len(statuses) != 1 || statuses["502 upstream_connect_failure"] != n {
		t.Fatalf("answers %v, want %d × 502 upstream_connect_failure", statuses, n)
	}
}

// On the event-loop engine, a client that leaves while its attempt is out
// ends the attempt as the goroutine path does: the endpoint's count of
// requests in flight (which least-request weighs) comes back to zero, and
// the call is recorded, a 499 (client_closed), as every failed call is.
func TestLoopClientGoneEndsTheAttempt(t *testing.T) {
	loopsOnly(t)
	release := make(chan struct{})
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	})
	defer close(release)
	sc := startSidecar(t, options{loops: true, static: map[string][]string{"svc": {up.addr()}},
		policies: "service: svc\nloadBalancer: {policy: least-request}\nretry: {attempts: 1}\n" + noBreaker + noOutliers})
	const leaving = 5
	for range leaving {
		conn, err := net.Dial("tcp", sc.addr)
		if err != nil {
			t.Fatal(err)
		}
		io.WriteString(conn, "GET /hang HTTP/1.1\r\nHost: svc\r\n\r\n")
		conn.Close()
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		inFlight, failed := int64(-1), len(sc.recorder.Failed("svc"))
		for _, s := range sc.proxy.Status() {
			if s.Service == "svc" && s.Balancer != nil && len(s.Balancer.Endpoints) == 1 && s.InFlight == 0 {
				inFlight = s.Balancer.Endpoints[0].InFlight
			}
		}
		if inFlight == 0 && failed == leaving {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("5s after %d clients left mid-attempt: the endpoint's requests in flight %d (-1: the call's slots still held), %d calls recorded; want 0 and %d",
				leaving, inFlight, failed, leaving)
		}
		time.Sleep(20 * time.Millisecond)
	}
	for _, r := range sc.recorder.Failed("svc") {
		if r.Status != 499 {
			t.Errorf("recorded %+v, want status 499", r)
		}
	}
}

// On the event-loop engine, requests a client pipelined before it shut
// its side down are all answered, as net/http answers them.
func TestLoopPipelinedThenHalfClosed(t *testing.T) {
	loopsOnly(t)
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			time.Sleep(200 * time.Millisecond)
		}
		io.WriteString(w, r.URL.Path)
	})
	sc := startSidecar(t, options{loops: true, static: map[string][]string{"svc": {up.addr()}}})
	conn, err := net.Dial("tcp", sc.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(conn, "GET /slow HTTP/1.1\r\nHost: svc\r\n\r\nGET /second HTTP/1.1\r\nHost: svc\r\n\r\n")
	conn.(*net.TCPConn).CloseWrite()
	br := bufio.NewReader(conn)
	for _, want := range []string{"/slow", "/second"} {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("the answer to %s: %v", want, err)
		}
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != 200 || string(b) != want {
			t.Fatalf("the answer to %s: %d %q", want, resp.StatusCode, b)
		}
	}
}

// The same calls answer alike on either engine: the caller's gRPC
// deadline over HTTP/1.1 (handed off), a per-try timeout, a refused
// connection; status, error reason and the detail the app reads.
func TestLoopFailuresAnswerAsGoroutines(t *testing.T) {
	loopsOnly(t)
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-time.After(time.Second):
		case <-r.Context().Done():
		}
	})
	dead, _ := net.Listen("tcp", "127.0.0.1:0")
	deadAddr := dead.Addr().String()
	dead.Close()
	static := map[string][]string{"svc": {up.addr()}, "pertry": {up.addr()}, "dead": {deadAddr}}
	policies := "service: svc\nretry: {attempts: 1}\n" + noBreaker + noOutliers +
		"---\nservice: pertry\ntimeout: 5s\nretry: {attempts: 1, perTryTimeout: 100ms}\n" + noBreaker + noOutliers +
		"---\nservice: dead\nretry: {attempts: 1}\n" + noBreaker + noOutliers
	answers := func(loops bool) []string {
		sc := startSidecar(t, options{loops: loops, static: static, policies: policies})
		var got []string
		for _, tc := range []struct{ host, header string }{{"svc", "Grpc-Timeout: 100m"}, {"pertry", ""}, {"dead", ""}} {
			req, _ := http.NewRequest("GET", "http://"+sc.addr+"/x", nil)
			req.Host = tc.host
			if k, v, ok := strings.Cut(tc.header, ": "); ok {
				req.Header.Set(k, v)
			}
			resp, err := http.DefaultTransport.RoundTrip(req)
			if err != nil {
				t.Fatalf("%s: %v", tc.host, err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			got = append(got, fmt.Sprintf("%s: %d %s %s", tc.host, resp.StatusCode, resp.Header.Get("X-Sidecar-Error"), b))
		}
		return got
	}
	goroutines, loops := answers(false), answers(true)
	for i := range goroutines {
		if goroutines[i] != loops[i] {
			t.Errorf("goroutines: %s\nloops:      %s", goroutines[i], loops[i])
		}
	}
}

// loopsOnly skips t where the event-loop engine does not run.
func loopsOnly(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("the event-loop engine is Linux's")
	}
}
