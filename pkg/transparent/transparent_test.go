package transparent

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestClassify(t *testing.T) {
	for _, tc := range []struct {
		in        string
		want      verdict
		sawMethod bool
	}{
		{"", undecided, false},
		{"G", undecided, false},
		{"GET", undecided, false},
		{"GET ", undecided, true},
		{"GET /users/1", undecided, true},
		{"GET /users/1 HTT", undecided, true},
		{"GET /users/1 HTTP/1.1", undecided, true},
		{"GET /users/1 HTTP/1.1\r", undecided, true},
		{"GET /users/1 HTTP/1.1\r\n", isHTTP, true},
		{"GET /users/1 HTTP/1.0\n", isHTTP, true},
		{"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", isHTTP, true},
		{"GET http://user-service/x HTTP/1.1\r\n", isHTTP, true},
		{"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", isHTTP, true},
		{"PRI * HTTP/2.0\r\n", undecided, true}, // the preface, still arriving
		{"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n", notHTTP, true},
		{"\x16\x03\x01\x02\x00\x01", notHTTP, false},         // TLS ClientHello
		{"\x00\x00\x00\x08\x04\xd2\x16\x2f", notHTTP, false}, // PostgreSQL SSLRequest
		{"*1\r\n$4\r\nPING\r\n", notHTTP, false},             // Redis RESP
		{"PING\r\n", notHTTP, false},                         // Redis inline
		{"SET k v\r\n", notHTTP, true},                       // a space in the "version"
		{"SSH-2.0-OpenSSH_9.2\r\n", notHTTP, false},
		{"GET  / HTTP/1.1\r\n", notHTTP, true}, // empty target
		{"GET / HTTP/2.0\r\n", notHTTP, true},
		{"GET / HTTP/1.x\r\n", notHTTP, true},
		{"GET / HTTP/1.1\rX", notHTTP, true},
		{"GET /\x01 HTTP/1.1\r\n", notHTTP, true},
		{" GET / HTTP/1.1\r\n", notHTTP, false},
		{strings.Repeat("A", 40), notHTTP, false}, // too long for a method
	} {
		v, saw := classify([]byte(tc.in))
		if v != tc.want || saw != tc.sawMethod {
			t.Errorf("classify(%q) = %v, %v; want %v, %v", tc.in, v, saw, tc.want, tc.sawMethod)
		}
	}
}

// TestSniff runs each case in a synctest bubble, over a net.Pipe: the
// pauses between the pieces sent, the sniff's timeout and the time it took
// are virtual.
func TestSniff(t *testing.T) {
	for _, tc := range []struct {
		name     string
		send     []string
		http     bool
		maxDelay time.Duration // how long the decision may take
	}{
		{"http", []string{"GET / HTTP/1.1\r\nHost: a\r\n\r\n"}, true, time.Second},
		{"http-in-pieces", []string{"GE", "T /x HTT", "P/1.1\r\n"}, true, time.Second},
		{"tls", []string{"\x16\x03\x01"}, false, 150 * time.Millisecond},
		{"server-first", nil, false, time.Second},
		{"request-line-stalls", []string{"POST /upload"}, true, time.Second},
		{"token-stalls", []string{"HELLO"}, false, time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				client, server := net.Pipe()
				defer server.Close()
				defer client.Close()
				// A pipe's Write returns once the other end has read it all.
				write := func(pieces ...string) (wrote chan struct{}) {
					wrote = make(chan struct{})
					go func() {
						defer close(wrote)
						for _, s := range pieces {
							_, _ = client.Write([]byte(s))
							time.Sleep(10 * time.Millisecond)
						}
					}()
					return wrote
				}
				wrote := write(tc.send...)
				start := time.Now()
				http, head, err := sniff(server, 300*time.Millisecond, maxSniff)
				took := time.Since(start)
				if err != nil {
					t.Fatal(err)
				}
				if http != tc.http {
					t.Errorf("sniff of %q: http = %v, want %v", tc.send, http, tc.http)
				}
				if want := strings.Join(tc.send, ""); !strings.HasPrefix(want, string(head)) || (tc.http && string(head) != want && tc.name != "http") {
					t.Errorf("sniff returned head %q, want (a prefix of) %q", head, want)
				}
				if took > tc.maxDelay {
					t.Errorf("sniff took %v, want at most %v", took, tc.maxDelay)
				}
				// The deadline is cleared for whoever reads next.
				<-wrote
				wrote = write("z")
				var b [1]byte
				if _, err := io.ReadFull(server, b[:]); err != nil {
					t.Errorf("read after sniff: %v", err)
				}
				<-wrote
			})
		})
	}
}

// observer counts what a Listener reports, and signals reported after each
// report, so that a test waits for reports (waitFor) instead of polling.
type observer struct {
	mu       sync.Mutex
	accepted map[string]int
	refused  map[string]int
	bytes    map[string]int
	open     atomic.Int64
	opened   atomic.Int64
	reported chan struct{} // holds a value once something was reported since the last receive
}

func newObserver() *observer {
	return &observer{accepted: map[string]int{}, refused: map[string]int{}, bytes: map[string]int{},
		reported: make(chan struct{}, 1)}
}

func (o *observer) Accepted(p string) { o.mu.Lock(); o.accepted[p]++; o.mu.Unlock(); o.report() }
func (o *observer) Refused(r string)  { o.mu.Lock(); o.refused[r]++; o.mu.Unlock(); o.report() }
func (o *observer) PassthroughOpened() {
	o.open.Add(1)
	o.opened.Add(1)
	o.report()
}
func (o *observer) PassthroughClosed()                 { o.open.Add(-1); o.report() }
func (o *observer) Bytes(d string, n int)              { o.mu.Lock(); o.bytes[d] += n; o.mu.Unlock(); o.report() }
func (o *observer) get(m map[string]int, k string) int { o.mu.Lock(); defer o.mu.Unlock(); return m[k] }

func (o *observer) report() {
	select {
	case o.reported <- struct{}{}:
	default: // one is pending already
	}
}

// echoServer echoes every connection until the client half-closes, then
// half-closes too. With banner set it speaks first.
func echoServer(t *testing.T, banner string) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
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
				if banner != "" {
					_, _ = c.Write([]byte(banner))
				}
				_, _ = io.Copy(c, c)
				_ = c.(*net.TCPConn).CloseWrite()
			}()
		}
	}()
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// listen starts a Listener on loopback whose connections all count as
// redirected to dst (as if iptables had sent them), unless cfg says
// otherwise.
func listen(t *testing.T, cfg Config, dst netip.AddrPort) (*Listener, *observer) {
	t.Helper()
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	o := newObserver()
	cfg.Observer = o
	if cfg.OriginalDst == nil {
		cfg.OriginalDst = func(net.Conn) (netip.AddrPort, bool) { return dst, true }
	}
	l := NewListener(cfg, inner)
	l.started.Do(l.start) // as the server's first Accept would
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := l.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
	})
	return l, o
}

func TestPassthroughByteExact(t *testing.T) {
	dst := echoServer(t, "")
	l, o := listen(t, Config{SniffTimeout: 2 * time.Second}, dst)
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// Random bytes: the first is 0x16-like garbage for HTTP, so the
	// decision comes at once, and every byte value goes through.
	payload := make([]byte, 1<<20)
	_, _ = rand.Read(payload)
	payload[0] = 0x16
	wrote := make(chan struct{})
	defer func() { c.Close(); <-wrote }()
	go func() {
		defer close(wrote)
		_, _ = c.Write(payload)
		_ = c.(*net.TCPConn).CloseWrite()
	}()
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, payload) {
		t.Fatalf("echo through the passthrough: got %d bytes, want the %d sent, byte-exact (equal: %v)", len(got), len(payload), bytes.Equal(got, payload))
	}
	waitFor(t, o, func() bool { return o.open.Load() == 0 }, "the passthrough to close")
	if s, r := o.get(o.bytes, DirectionSent), o.get(o.bytes, DirectionReceived); s != len(payload) || r != len(payload) {
		t.Errorf("bytes counted sent=%d received=%d, want %d each", s, r, len(payload))
	}
	if n := o.get(o.accepted, ProtocolTCP); n != 1 {
		t.Errorf("accepted tcp = %d, want 1", n)
	}
}

func TestPassthroughServerFirst(t *testing.T) {
	dst := echoServer(t, "220 smtp.example ESMTP\r\n")
	for _, tc := range []struct {
		name   string
		cfg    Config
		within time.Duration
		after  time.Duration
	}{
		{"sniff-times-out", Config{SniffTimeout: 150 * time.Millisecond}, 2 * time.Second, 150 * time.Millisecond},
		{"opaque-port", Config{SniffTimeout: 5 * time.Second, OpaquePorts: []uint16{dst.Port()}}, time.Second, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l, _ := listen(t, tc.cfg, dst)
			start := time.Now()
			c, err := net.Dial("tcp", l.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			_ = c.SetReadDeadline(time.Now().Add(tc.within))
			line := make([]byte, len("220 smtp.example ESMTP\r\n"))
			if _, err := io.ReadFull(c, line); err != nil {
				t.Fatalf("reading the server's banner through the passthrough: %v", err)
			}
			if took := time.Since(start); took < tc.after {
				t.Errorf("banner after %v, before the sniff timeout %v", took, tc.after)
			}
			if _, err := c.Write([]byte("EHLO me\r\n")); err != nil {
				t.Fatal(err)
			}
			echo := make([]byte, len("EHLO me\r\n"))
			if _, err := io.ReadFull(c, echo); err != nil || string(echo) != "EHLO me\r\n" {
				t.Fatalf("echo = %q, %v", echo, err)
			}
		})
	}
}

func TestRedirectedHTTPComesOutOfAccept(t *testing.T) {
	dst := netip.MustParseAddrPort("198.18.0.7:8080") // never dialed
	var n atomic.Int32
	// The first connection counts as redirected, the second as made to
	// the listener itself.
	l, o := listen(t, Config{OriginalDst: func(net.Conn) (netip.AddrPort, bool) { return dst, n.Add(1) == 1 }}, dst)
	accepted := make(chan net.Conn, 2)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				close(accepted)
				return
			}
			accepted <- c
		}
	}()
	defer func() {
		_ = l.Close()
		for c := range accepted { // until the Accept loop above ends
			c.Close()
		}
	}()

	req := "GET /users/1 HTTP/1.1\r\nHost: 198.18.0.7:8080\r\n\r\n"
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte(req)); err != nil {
		t.Fatal(err)
	}
	got := <-accepted
	defer got.Close()
	rc, ok := got.(*Conn)
	if !ok || rc.OriginalDst() != dst {
		t.Fatalf("Accept returned %T, want *Conn with OriginalDst %v", got, dst)
	}
	buf := make([]byte, len(req))
	if _, err := io.ReadFull(got, buf); err != nil || string(buf) != req {
		t.Fatalf("read %q, %v; want the request as sent, sniffed bytes first", buf, err)
	}
	if n := o.get(o.accepted, ProtocolHTTP); n != 1 {
		t.Errorf("accepted http = %d, want 1", n)
	}

	// A connection the client makes to the listener itself comes out as
	// it is, at once, without sniffing.
	c2, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	select {
	case got2 := <-accepted:
		defer got2.Close()
		if _, ok := got2.(*net.TCPConn); !ok {
			t.Errorf("a direct connection came out of Accept as %T, want the *net.TCPConn itself", got2)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("a direct connection that sends nothing did not come out of Accept at once")
	}
}

func TestRefusals(t *testing.T) {
	t.Run("loop", func(t *testing.T) {
		dst := echoServer(t, "")
		l, o := listen(t, Config{IsOwn: func(a netip.AddrPort) bool { return a == dst }}, dst)
		expectReset(t, l.Addr().String())
		waitFor(t, o, func() bool { return o.get(o.refused, RefusedLoop) == 1 }, "a loop refusal")
	})
	t.Run("connect-failure", func(t *testing.T) {
		ln, _ := net.Listen("tcp", "127.0.0.1:0")
		dst := ln.Addr().(*net.TCPAddr).AddrPort()
		ln.Close() // nothing listens there now
		l, o := listen(t, Config{}, dst)
		expectReset(t, l.Addr().String())
		waitFor(t, o, func() bool { return o.get(o.refused, RefusedConnectFailure) == 1 }, "a connect failure")
	})
	t.Run("not-allowed", func(t *testing.T) {
		dst := echoServer(t, "")
		l, o := listen(t, Config{AllowTCP: func(context.Context, netip.AddrPort) bool { return false }}, dst)
		expectReset(t, l.Addr().String())
		waitFor(t, o, func() bool { return o.get(o.refused, RefusedNotAllowed) == 1 }, "a not_allowed refusal")
	})
}

// expectReset sends non-HTTP bytes and expects the connection to end
// without an answer.
func expectReset(t *testing.T, addr string) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return // reset before the connect completed: as good
	}
	defer c.Close()
	_, _ = c.Write([]byte{0x16, 0x03, 0x01})
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := c.Read(make([]byte, 16))
	var ne net.Error
	if n != 0 || err == nil || (errors.As(err, &ne) && ne.Timeout()) {
		t.Fatalf("read = %d, %v; want the connection reset or closed", n, err)
	}
}

func TestShutdownClosesPassthroughs(t *testing.T) {
	dst := echoServer(t, "")
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l := NewListener(Config{OriginalDst: func(net.Conn) (netip.AddrPort, bool) { return dst, true }}, inner)
	l.started.Do(l.start)
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_, _ = c.Write([]byte{0x00, 0x01})
	if _, err := io.ReadFull(c, make([]byte, 2)); err != nil {
		t.Fatal(err)
	}
	if l.Active() != 1 {
		t.Fatalf("Active() = %d, want 1", l.Active())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := l.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown = %v, want the deadline (a passthrough was open)", err)
	}
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatal("the passthrough still works after Shutdown")
	}
	if _, err := l.Accept(); err == nil {
		t.Fatal("Accept after Shutdown returned a connection")
	}
}

func TestOwnAddrs(t *testing.T) {
	own := OwnAddrs(
		&net.TCPAddr{IP: net.ParseIP("127.0.0.1"), Port: 15001},
		&net.TCPAddr{IP: net.IPv4zero, Port: 15006},
		&net.TCPAddr{IP: net.IPv6unspecified, Port: 15020},
	)
	for _, tc := range []struct {
		dst  string
		want bool
	}{
		{"127.0.0.1:15001", true},
		{"127.0.0.2:15001", false},
		{"127.0.0.1:15006", true},
		{"127.0.0.5:15006", true}, // loopback is local
		{"[::1]:15020", true},
		{"198.18.0.9:15006", false}, // not an address of this host
		{"127.0.0.1:8080", false},
	} {
		if got := own(netip.MustParseAddrPort(tc.dst)); got != tc.want {
			t.Errorf("own(%s) = %v, want %v", tc.dst, got, tc.want)
		}
	}
}

// waitFor waits until cond holds, looking again after each report to o.
func waitFor(t *testing.T, o *observer, cond func() bool, what string) {
	t.Helper()
	timeout := time.After(5 * time.Second)
	for !cond() {
		select {
		case <-o.reported:
		case <-timeout:
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}
