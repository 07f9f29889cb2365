//go:build linux

package engine

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sidecar-mesh/sidecar/pkg/downstream"
	"github.com/sidecar-mesh/sidecar/pkg/upstream"
)

// rawUpstream listens on loopback and serves each connection with serve;
// control, when set, prepares the listening socket.
func rawUpstream(t *testing.T, control func(fd uintptr), serve func(net.Conn)) netip.AddrPort {
	t.Helper()
	lc := net.ListenConfig{}
	if control != nil {
		lc.Control = func(_, _ string, c syscall.RawConn) error { return c.Control(control) }
	}
	ln, err := lc.Listen(t.Context(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				c.SetDeadline(time.Now().Add(10 * time.Second))
				serve(c)
			}()
		}
	}()
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// An endpoint that answers before it has read the whole request (here
// after its head) leaves the rest of the request unwritten: the
// connection is not reused, or the next request would be read as the
// first one's missing body and what that body holds as a request of its
// own, one the proxy never checked (request smuggling).
func TestEarlyAnswerRetiresTheConnection(t *testing.T) {
	var mu sync.Mutex
	var paths []string
	up := rawUpstream(t, func(fd uintptr) {
		// A small window and segments, so that the engine cannot hand
		// the kernel the whole body at once.
		unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF, 2048)
		unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_MAXSEG, 536)
	}, func(c net.Conn) {
		br := bufio.NewReader(c)
		for {
			req, err := http.ReadRequest(br)
			if err != nil {
				return
			}
			mu.Lock()
			paths = append(paths, req.URL.Path)
			mu.Unlock()
			if req.URL.Path == "/early" {
				io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nearly")
				time.Sleep(300 * time.Millisecond) // the engine sees the answer whole before the body is read
			}
			io.Copy(io.Discard, req.Body)
			if req.URL.Path != "/early" {
				io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
			}
		}
	})
	_, addr := start(t, &forwarder{up: up}, downstream.Limits{})
	c := client(t)
	if resp, b := get(t, c, "POST", "http://"+addr+"/early", strings.NewReader(strings.Repeat("B", MaxBody-100))); resp.StatusCode != 200 || string(b) != "early" {
		t.Fatalf("early: %d %q", resp.StatusCode, b)
	}
	smuggled := "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
	body := strings.Repeat("C", 1000) + smuggled
	if resp, b := get(t, c, "POST", "http://"+addr+"/second", strings.NewReader(body)); resp.StatusCode != 200 || string(b) != "ok" {
		t.Fatalf("second: %d %q, want the endpoint's answer to it", resp.StatusCode, b)
	}
	time.Sleep(100 * time.Millisecond) // the endpoint reads on
	mu.Lock()
	defer mu.Unlock()
	if fmt.Sprint(paths) != "[/early /second]" {
		t.Fatalf("the endpoint read requests %v, want [/early /second]: the second went on the connection the first had not finished", paths)
	}
}

// An upstream connection closed while pooled (by its endpoint, or idle too
// long) leaves the pool at once.
func TestClosedConnectionsLeaveThePool(t *testing.T) {
	var mu sync.Mutex
	var conns []net.Conn
	up := rawUpstream(t, nil, func(c net.Conn) {
		br := bufio.NewReader(c)
		if _, err := http.ReadRequest(br); err != nil {
			return
		}
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
		mu.Lock()
		conns = append(conns, c)
		mu.Unlock()
		br.ReadByte() // until the test closes it
	})
	e, addr := start(t, &forwarder{up: up}, downstream.Limits{})
	var wg sync.WaitGroup
	for range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// A connection each, so that each request needs its own
			// upstream connection while they overlap.
			c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
			get(t, c, "GET", "http://"+addr+"/x", nil)
		}()
	}
	wg.Wait()
	pooled := func() (n int) {
		for _, l := range e.loops {
			done := make(chan int)
			l.post(func() {
				m := 0
				for _, list := range l.pool.idle {
					m += len(list)
				}
				done <- m
			})
			n += <-done
		}
		return n
	}
	if n := pooled(); n == 0 {
		t.Fatal("no connection pooled after the answers")
	}
	mu.Lock()
	for _, c := range conns {
		c.Close()
	}
	mu.Unlock()
	deadline := time.Now().Add(5 * time.Second)
	for pooled() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d connections the endpoint closed still pooled after 5s", pooled())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// capture is a handler that keeps the error of the attempt, answering 502.
type capture struct {
	up   netip.AddrPort
	errs chan error
}

func (h *capture) Serve(x *Exchange) {
	out := outgoing(x, h.up)
	x.Send(h.up, out, x.Body, 0, func(a *Attempt, resp *http.Response, err error) {
		if err != nil {
			h.errs <- err
			x.Reply(http.StatusBadGateway, nil, nil, nil)
			return
		}
		x.Respond(a, resp, nil)
	})
}

// A head the endpoint cut off is judged as the transport judges it: what
// came of it broke HTTP already (a bad response), or it was merely cut (an
// unexpected EOF).
func TestCutHeadJudgedAsTheTransport(t *testing.T) {
	for _, tc := range []struct {
		sent string
		bad  bool
	}{
		{"HTTP/1.1 200 OK\r\nContent-Le", true},
		{"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n", false},
		{"HTTP/1.1 200 O", false},
	} {
		up := rawUpstream(t, nil, func(c net.Conn) {
			if _, err := http.ReadRequest(bufio.NewReader(c)); err == nil {
				io.WriteString(c, tc.sent)
			}
		})
		h := &capture{up: up, errs: make(chan error, 1)}
		_, addr := start(t, h, downstream.Limits{})
		get(t, client(t), "GET", "http://"+addr+"/x", nil)
		err := <-h.errs
		var bad *upstream.BadResponseError
		if got := errors.As(err, &bad); got != tc.bad || !got && !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Errorf("%q then a close: %v (a bad response: %v), want a bad response: %v", tc.sent, err, got, tc.bad)
		}
	}
}

// An answer whose body breaks its framing after its head reaches the
// client as a head and a cut, as the goroutine path passes it on: never
// as a connection closed without a word, which a client may take for a
// stale one and send the request again on.
func TestBadChunkCutsAfterTheHead(t *testing.T) {
	up := rawUpstream(t, nil, func(c net.Conn) {
		if _, err := http.ReadRequest(bufio.NewReader(c)); err == nil {
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
		}
	})
	_, addr := start(t, &forwarder{up: up}, downstream.Limits{})
	conn := dialEngine(t, addr)
	io.WriteString(conn, "GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
	all, _ := io.ReadAll(conn)
	if !strings.HasPrefix(string(all), "HTTP/1.1 200 OK\r\n") {
		t.Fatalf("got %q, want the head, then the connection cut", all)
	}
}

// A body that stops coming is handed off once it waited the body timeout,
// with the server's next read timing out at once: it answers 408 then, not
// after waiting the timeout a second time.
func TestStalledBodyHandedOffExpired(t *testing.T) {
	type handed struct {
		buffered string
		err      error
	}
	got := make(chan handed, 1)
	limits := downstream.Limits{BodyReadTimeout: 200 * time.Millisecond}
	_, addr := startHandingTo(t, &forwarder{up: netip.MustParseAddrPort("127.0.0.1:1")}, limits, func(c net.Conn, b []byte) {
		var one [1]byte
		_, err := c.Read(one[:])
		c.Close()
		got <- handed{string(b), err}
	})
	conn := dialEngine(t, addr)
	io.WriteString(conn, "POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
	select {
	case h := <-got:
		if !strings.HasSuffix(h.buffered, "\r\n\r\nabc") || !errors.Is(h.err, os.ErrDeadlineExceeded) {
			t.Fatalf("handed off with %q, its next read: %v; want the head and the 3 bytes, then a timeout", h.buffered, h.err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("10s after the body stopped, not handed off, or the connection handed off waits on a read")
	}
}

// Out of descriptors (EMFILE), the loops stop accepting for a while, as
// net/http's server sleeps, rather than waking for the listener again and
// again (it stays readable) and logging each failure: a few lines while it
// lasts, not thousands; once descriptors are free, connections are served
// again.
func TestAcceptBacksOffOutOfDescriptors(t *testing.T) {
	up := origin(t)
	var logged atomic.Int64
	log := slog.New(slog.NewTextHandler(writerFunc(func(p []byte) (int, error) {
		if bytes.Contains(p, []byte("accept failed")) {
			logged.Add(1)
		}
		return len(p), nil
	}), nil))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e, err := New(ln, Config{Loops: 1, Handler: &forwarder{up: up}, Logger: log, Handoff: func(c net.Conn, _ []byte) { c.Close() }})
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- e.Serve() }()
	defer func() {
		e.Close()
		<-served
	}()
	addr := ln.Addr().String()
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	// Room for a few descriptors more than are open now.
	open, _ := os.ReadDir("/proc/self/fd")
	tight := lim
	tight.Cur = uint64(len(open) + 8)
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &tight); err != nil {
		t.Fatal(err)
	}
	restored := false
	restore := func() {
		if !restored {
			restored = true
			unix.Setrlimit(unix.RLIMIT_NOFILE, &lim)
		}
	}
	defer restore()
	// Connections the kernel completes (the backlog) that the engine
	// cannot take: descriptors run out on both sides, this test's own
	// connections included.
	var conns []net.Conn
	for range 20 {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			break
		}
		conns = append(conns, c)
	}
	time.Sleep(300 * time.Millisecond)
	for _, c := range conns {
		c.Close()
	}
	restore()
	if n := logged.Load(); n == 0 || n > 30 {
		t.Fatalf("%d accept failures logged in 300ms out of descriptors, want a few (at least one, a backoff's worth)", n)
	}
	// Served again.
	if resp, b := get(t, client(t), "GET", "http://"+addr+"/small", nil); resp.StatusCode != 200 || len(b) != 1024 {
		t.Fatalf("after the descriptors came back: %d, %d bytes", resp.StatusCode, len(b))
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }
