package main

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/sidecar-mesh/sidecar/internal/freeport"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestParseHead(t *testing.T) {
	out, h, err := parseHead(nil, []byte("GET /a HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\nAccept: */*\r\n\r\n"), true)
	if err != nil || string(h.method) != "GET" || h.close || h.contentLength != -1 {
		t.Fatalf("parse: %v %+v", err, h)
	}
	if want := "GET /a HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n"; string(out) != want {
		t.Fatalf("forwarded head %q, want %q (hop-by-hop and what Connection names dropped)", out, want)
	}
	if _, h, _ := parseHead(nil, []byte("GET / HTTP/1.0\r\n\r\n"), true); !h.close {
		t.Fatal("HTTP/1.0 without keep-alive must close")
	}
	_, h, err = parseHead(nil, []byte("HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n"), false)
	if err != nil || h.status != 404 || h.contentLength != 3 {
		t.Fatalf("answer: %v %+v", err, h)
	}
	for _, bad := range []string{
		"GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
		"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
		"GET / HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
		"GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n",
		"GET / HTTP/1.1\r\nBad Name: b\r\n\r\n",
		"GET / HTTP/1.1\r\nA: b\x00c\r\n\r\n",
		"GET / HTTP/1.1\nA: b\r\n\r\n",
		"G(T / HTTP/1.1\r\n\r\n",
		"GET / HTTP/2.0\r\n\r\n",
		"GET /a b HTTP/1.1\r\n\r\n",
	} {
		if _, _, err := parseHead(nil, []byte(bad), true); err == nil {
			t.Errorf("%q parsed", bad)
		}
	}
}

// start runs loopfwd in front of upstream and returns its address.
func start(t *testing.T, upstream string) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "loopfwd")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	ports, err := freeport.Stable(1, false)
	if err != nil {
		t.Fatal(err)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", ports[0])
	cmd := exec.Command(bin, "-listen", addr, "-upstream", upstream, "-loops", "2")
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	for range 100 {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return addr
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatal("loopfwd did not listen")
	return ""
}

// roundTrip writes raw on a new connection and reads answers until the
// connection closes or n answers came, returning them.
func roundTrip(t *testing.T, addr, raw string, n int) []*http.Response {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, raw); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	var rs []*http.Response
	for len(rs) < n {
		r, err := http.ReadResponse(br, nil)
		if err != nil {
			break
		}
		body, _ := io.ReadAll(r.Body)
		r.Body = io.NopCloser(bytes.NewReader(body))
		rs = append(rs, r)
	}
	return rs
}

func TestForwards(t *testing.T) {
	origin := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("X-Secret") != "" || r.Header.Get("Keep-Alive") != "" {
			w.WriteHeader(http.StatusTeapot) // a hop-by-hop header came through
			return
		}
		io.WriteString(w, "hello "+r.URL.Path)
	})}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go origin.Serve(ln)
	defer origin.Close()
	addr := start(t, ln.Addr().String())

	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 4}}
	defer client.CloseIdleConnections()
	for i := range 200 {
		req, _ := http.NewRequest("GET", fmt.Sprintf("http://%s/%d", addr, i), nil)
		req.Header.Set("Connection", "X-Secret")
		req.Header.Set("X-Secret", "1")
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(body) != fmt.Sprintf("hello /%d", i) {
			t.Fatalf("request %d: %d %q", i, resp.StatusCode, body)
		}
	}

	// Pipelined requests are answered in order.
	rs := roundTrip(t, addr, "GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 3)
	if len(rs) != 2 {
		t.Fatalf("%d answers to two pipelined requests", len(rs))
	}
	for i, want := range []string{"hello /a", "hello /b"} {
		if b, _ := io.ReadAll(rs[i].Body); string(b) != want {
			t.Fatalf("answer %d: %q, want %q", i, b, want)
		}
	}

	// What it does not forward it refuses, and closes.
	for raw, status := range map[string]int{
		"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi":                                     501,
		"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n": 400,
		"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n":                                                  400,
		"GET / HTTP/1.1\r\nX: " + strings.Repeat("a", maxHead) + "\r\n\r\n":                             431,
	} {
		rs := roundTrip(t, addr, raw, 2)
		if len(rs) != 1 || rs[0].StatusCode != status || !rs[0].Close {
			t.Errorf("%.40q: %d answers, want one %d that closes", raw, len(rs), status)
		}
	}
}

// An upstream connection that sends a byte past its answer is never used
// again: the next request's answer is its own.
func TestStrayBytesRetireTheUpstreamConnection(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for n := 0; ; n++ {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				br := bufio.NewReader(c)
				for {
					req, err := http.ReadRequest(br)
					if err != nil {
						return
					}
					body := "answer to " + req.URL.Path
					fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
					if n == 0 {
						// The first connection sends a second answer nobody
						// asked for, a moment after the first.
						time.Sleep(5 * time.Millisecond)
						io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray")
					}
				}
			}()
		}
	}()
	defer func() { ln.Close(); <-done }()
	addr := start(t, ln.Addr().String())
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	br := bufio.NewReader(c)
	for _, path := range []string{"/1", "/2", "/3"} {
		fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: x\r\n\r\n", path)
		r, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		b, _ := io.ReadAll(r.Body)
		if string(b) != "answer to "+path {
			t.Fatalf("%s answered %q", path, b)
		}
		time.Sleep(20 * time.Millisecond) // the stray answer arrives before the next request
	}
}
