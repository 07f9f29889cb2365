//go:build linux

package engine

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/sidecar-mesh/sidecar/internal/readahead"
	"github.com/sidecar-mesh/sidecar/pkg/downstream"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// forwarder is the simplest handler: every request to one upstream, the
// answer passed on, a failure answered 502.
type forwarder struct {
	up      netip.AddrPort
	handoff func(x *Exchange) bool
	served  atomic.Int64
	ends    chan error
}

func (f *forwarder) Serve(x *Exchange) {
	if f.handoff != nil && f.handoff(x) {
		x.Handoff()
		return
	}
	f.served.Add(1)
	out := outgoing(x, f.up)
	for _, h := range []string{"Connection", "Keep-Alive", "Te", "Trailer", "Upgrade", "Proxy-Connection"} {
		out.Header.Del(h)
	}
	out.Close = false
	x.Send(f.up, out, x.Body, 0, func(a *Attempt, resp *http.Response, err error) {
		if err != nil {
			x.Reply(http.StatusBadGateway, http.Header{"Content-Type": {"text/plain"}}, []byte(err.Error()), f.end)
			return
		}
		for _, h := range []string{"Connection", "Keep-Alive", "Te", "Trailer", "Upgrade", "Proxy-Connection"} {
			resp.Header.Del(h)
		}
		x.Respond(a, resp, f.end)
	})
}

// dialEngine connects to the engine at addr, every read and write of the
// connection bounded by 5 s; it is closed when t ends, if not before.
func dialEngine(t *testing.T, addr string) net.Conn {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	return conn
}

// outgoing is x's request as it goes to up.
func outgoing(x *Exchange, up netip.AddrPort) *http.Request {
	out := x.Request.Clone(context.Background())
	out.URL.Scheme, out.URL.Host, out.RequestURI = "http", up.String(), ""
	return out
}

func (f *forwarder) end(err error) {
	if f.ends != nil {
		f.ends <- err
	}
}

// chanListener is a net.Listener of the connections handed to it.
type chanListener struct {
	c    chan net.Conn
	once sync.Once
	done chan struct{}
}

func newChanListener() *chanListener {
	return &chanListener{c: make(chan net.Conn, 16), done: make(chan struct{})}
}

func (l *chanListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.c:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}
func (l *chanListener) Close() error   { l.once.Do(func() { close(l.done) }); return nil }
func (l *chanListener) Addr() net.Addr { return &net.TCPAddr{} }

// origin is a real HTTP server with the answers the tests ask for.
func origin(t *testing.T) netip.AddrPort {
	t.Helper()
	mux := http.NewServeMux()
	mux.HandleFunc("/small", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		w.Header().Set("X-Origin", "yes")
		io.WriteString(w, strings.Repeat("a", 1024))
	})
	mux.HandleFunc("/sniff", func(w http.ResponseWriter, r *http.Request) {
		w.Header()["Content-Type"] = nil
		w.Header().Set("Content-Length", "30")
		io.WriteString(w, "<html><body>hi</body></html>\n\n")
	})
	mux.HandleFunc("/chunked", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		w.Header().Set("Trailer", "X-Sum")
		for i := range 3 {
			fmt.Fprintf(w, "part %d\n", i)
			w.(http.Flusher).Flush()
		}
		w.Header().Set("X-Sum", "3")
	})
	mux.HandleFunc("/big", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Header().Set("Content-Length", fmt.Sprint(4<<20))
		b := bytes.Repeat([]byte("0123456789abcdef"), 4096)
		for range 64 {
			w.Write(b)
		}
	})
	mux.HandleFunc("/nocontent", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusNoContent) })
	mux.HandleFunc("/echo", func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		w.Header().Set("Content-Type", "text/plain")
		fmt.Fprintf(w, "%s %s %s", r.Method, r.Header.Get("X-Test"), b)
	})
	mux.HandleFunc("/close", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Connection", "close")
		io.WriteString(w, "bye")
	})
	srv := &http.Server{Handler: mux}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// start runs an engine with h in front, handing off to a net/http server
// answering "handed off".
func start(t *testing.T, h Handler, limits downstream.Limits) (*Engine, string) {
	t.Helper()
	hl := newChanListener()
	hs := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "handed off "+r.Method+" "+r.URL.Path)
	})}
	go hs.Serve(hl)
	t.Cleanup(func() { hs.Close() })
	return startHandingTo(t, h, limits, func(c net.Conn, b []byte) {
		hl.c <- &readahead.Conn{Conn: c, Head: b}
	})
}

// startHandingTo runs an engine with h in front, handing off to handoff.
func startHandingTo(t *testing.T, h Handler, limits downstream.Limits, handoff func(net.Conn, []byte)) (*Engine, string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e, err := New(ln, Config{Loops: 2, Handler: h, Limits: limits, Handoff: handoff})
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- e.Serve() }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := e.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		if err := <-served; err != nil {
			t.Errorf("serve: %v", err)
		}
		ln.Close()
	})
	return e, ln.Addr().String()
}

func client(t *testing.T) *http.Client {
	tr := &http.Transport{MaxIdleConnsPerHost: 4, DisableCompression: true}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr}
}

func get(t *testing.T, c *http.Client, method, url string, body io.Reader) (*http.Response, []byte) {
	t.Helper()
	req, _ := http.NewRequest(method, url, body)
	req.Header.Set("X-Test", "t")
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatalf("%s %s: body: %v", method, url, err)
	}
	return resp, b
}

// TestAnswersAsDirect: through the engine, every kind of answer reads as
// the origin's, on kept-alive connections.
func TestAnswersAsDirect(t *testing.T) {
	up := origin(t)
	f := &forwarder{up: up}
	_, addr := start(t, f, downstream.Limits{})
	c := client(t)
	for range 3 { // the second and third time on pooled connections, both sides
		for _, tc := range []struct {
			method, path, body string
		}{
			{"GET", "/small", ""}, {"GET", "/sniff", ""}, {"GET", "/chunked", ""}, {"GET", "/big", ""},
			{"GET", "/nocontent", ""}, {"HEAD", "/small", ""}, {"POST", "/echo", "hello"}, {"PUT", "/echo", ""},
			{"GET", "/close", ""}, {"GET", "/missing", ""},
		} {
			var rb io.Reader
			if tc.body != "" {
				rb = strings.NewReader(tc.body)
			}
			want, wb := get(t, c, tc.method, "http://"+up.String()+tc.path, rb)
			if tc.body != "" {
				rb = strings.NewReader(tc.body)
			}
			got, gb := get(t, c, tc.method, "http://"+addr+tc.path, rb)
			if got.StatusCode != want.StatusCode || !bytes.Equal(gb, wb) {
				t.Fatalf("%s %s: %d %q, want %d %q", tc.method, tc.path, got.StatusCode, trim(gb), want.StatusCode, trim(wb))
			}
			for _, h := range []string{"Content-Type", "Content-Length", "X-Origin"} {
				if h == "Content-Type" && tc.path == "/sniff" {
					// Behind a proxy, net/http's writer sniffs a type the
					// origin did not give; the engine's head does the same.
					if got.Header.Get(h) != "text/html; charset=utf-8" {
						t.Errorf("sniffed type %q", got.Header.Get(h))
					}
					continue
				}
				if got.Header.Get(h) != want.Header.Get(h) {
					t.Errorf("%s %s: %s %q, want %q", tc.method, tc.path, h, got.Header.Get(h), want.Header.Get(h))
				}
			}
			if got.ContentLength != want.ContentLength || fmt.Sprint(got.TransferEncoding) != fmt.Sprint(want.TransferEncoding) {
				t.Errorf("%s %s: framing %d %v, want %d %v", tc.method, tc.path, got.ContentLength, got.TransferEncoding, want.ContentLength, want.TransferEncoding)
			}
			if fmt.Sprint(got.Trailer) != fmt.Sprint(want.Trailer) {
				t.Errorf("%s %s: trailers %v, want %v", tc.method, tc.path, got.Trailer, want.Trailer)
			}
		}
	}
	if f.served.Load() != 30 {
		t.Errorf("served %d requests, want 30", f.served.Load())
	}
}

func trim(b []byte) string {
	if len(b) > 80 {
		return string(b[:80]) + "..."
	}
	return string(b)
}

// TestHandsOffWhatItDoesNotServe: a request the engine does not read
// (chunked, malformed, HTTP/1.0, too large a body) goes, with every byte
// read of its connection, to the listener's server; so does one the
// handler declines.
func TestHandsOffWhatItDoesNotServe(t *testing.T) {
	up := origin(t)
	f := &forwarder{up: up, handoff: func(x *Exchange) bool { return x.Request.URL.Path == "/decline" }}
	_, addr := start(t, f, downstream.Limits{})
	for _, tc := range []struct{ raw, want string }{
		{"GET /decline HTTP/1.1\r\nHost: a\r\n\r\n", "handed off GET /decline"},
		{"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", "handed off POST /x"},
		{"GET /old HTTP/1.0\r\nHost: a\r\n\r\n", "handed off GET /old"},
		{"GET /small HTTP/1.1\r\nHost: a\r\n\r\nGET /decline HTTP/1.1\r\nHost: a\r\n\r\n", "handed off GET /decline"},
		{fmt.Sprintf("POST /big HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%s", MaxBody+1, strings.Repeat("b", MaxBody+1)), "handed off POST /big"},
		{"GET /under_score HTTP/1.1\r\nHost: a\r\nContent_Length: 5\r\n\r\n", "handed off GET /under_score"},
		{"GET /a HTTP/1.1\r\nHost: a\r\nX: 1\r\n folded\r\n\r\n", "handed off GET /a"},
		{"\r\nGET /crlf HTTP/1.1\r\nHost: a\r\n\r\n", "400 Bad Request"}, // net/http, handed it, refuses it
		{"GET /lf HTTP/1.1\nHost: a\n\n", "handed off GET /lf"},
	} {
		conn := dialEngine(t, addr)
		io.WriteString(conn, tc.raw)
		if tcp, ok := conn.(*net.TCPConn); ok && !strings.Contains(tc.raw, "HTTP/1.0") {
			tcp.CloseWrite()
		}
		all, _ := io.ReadAll(conn)
		conn.Close()
		if !strings.Contains(string(all), tc.want) {
			t.Errorf("%q: got %q, want %q in it", trim([]byte(tc.raw)), trim(all), tc.want)
		}
	}
}

// TestPipelined: requests sent at once are answered in order, one
// connection each side.
func TestPipelined(t *testing.T) {
	up := origin(t)
	_, addr := start(t, &forwarder{up: up}, downstream.Limits{})
	conn := dialEngine(t, addr)
	var raw strings.Builder
	for i := range 20 {
		fmt.Fprintf(&raw, "POST /echo HTTP/1.1\r\nHost: a\r\nX-Test: %d\r\nContent-Length: 1\r\n\r\n%d", i, i%10)
	}
	io.WriteString(conn, raw.String())
	br := bufio.NewReader(conn)
	for i := range 20 {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("answer %d: %v", i, err)
		}
		b, _ := io.ReadAll(resp.Body)
		if want := fmt.Sprintf("POST %d %d", i, i%10); string(b) != want {
			t.Fatalf("answer %d: %q, want %q", i, b, want)
		}
	}
}

// TestUpstreamDownIs502: a connect failure reaches the handler as one.
func TestUpstreamDownIs502(t *testing.T) {
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	up := ln.Addr().(*net.TCPAddr).AddrPort()
	ln.Close()
	_, addr := start(t, &forwarder{up: up}, downstream.Limits{})
	resp, b := get(t, client(t), "GET", "http://"+addr+"/x", nil)
	if resp.StatusCode != http.StatusBadGateway || !strings.Contains(string(b), "connect") {
		t.Fatalf("%d %q, want 502 naming the connect failure", resp.StatusCode, b)
	}
}

// An upstream connection that sent a byte past its answer is never reused
// (the byte would be the next request's answer); one that answered
// cleanly is.
func TestStrayBytesRetireTheConnection(t *testing.T) {
	var conns atomic.Int64
	up := rawUpstream(t, nil, func(c net.Conn) {
		conns.Add(1)
		br := bufio.NewReader(c)
		for {
			req, err := http.ReadRequest(br)
			if err != nil {
				return
			}
			answer := "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
			if req.URL.Path == "/stray" {
				answer += "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nforge"
			}
			io.WriteString(c, answer)
		}
	})
	_, addr := start(t, &forwarder{up: up}, downstream.Limits{})
	c := client(t)
	for range 3 {
		if resp, b := get(t, c, "GET", "http://"+addr+"/clean", nil); resp.StatusCode != 200 || string(b) != "ok" {
			t.Fatalf("clean: %d %q", resp.StatusCode, b)
		}
	}
	if n := conns.Load(); n != 1 {
		t.Fatalf("%d upstream connections for three clean answers in a row, want 1 (reused)", n)
	}
	for range 3 {
		if resp, b := get(t, c, "GET", "http://"+addr+"/stray", nil); resp.StatusCode != 200 || string(b) != "ok" {
			t.Fatalf("stray: %d %q, want the answer and never the forged one", resp.StatusCode, b)
		}
	}
	if resp, b := get(t, c, "GET", "http://"+addr+"/clean", nil); string(b) != "ok" {
		t.Fatalf("after stray bytes: %d %q", resp.StatusCode, b)
	}
	if n := conns.Load(); n != 4 {
		t.Fatalf("%d upstream connections, want 4: each answer with bytes after it retired its connection", n)
	}
}

// A client that sends half a head and stops is cut at the header timeout;
// one that is idle between requests at the idle timeout.
func TestReadTimeouts(t *testing.T) {
	up := origin(t)
	_, addr := start(t, &forwarder{up: up}, downstream.Limits{ReadHeaderTimeout: 200 * time.Millisecond, IdleTimeout: 300 * time.Millisecond})
	for _, tc := range []struct {
		name, send string
		max        time.Duration
	}{
		{"half a head", "GET /small HTTP/1.1\r\nHost: a\r\n", time.Second},
		{"idle after an answer", "GET /small HTTP/1.1\r\nHost: a\r\n\r\n", 2 * time.Second},
	} {
		c := dialEngine(t, addr)
		start := time.Now()
		io.WriteString(c, tc.send)
		io.ReadAll(c) // until the engine closes it
		if took := time.Since(start); took > tc.max {
			t.Errorf("%s: closed after %v, want within %v", tc.name, took, tc.max)
		}
		c.Close()
	}
}

// retrier sends a request again, after a backoff of 100 ms, when its
// first answer is a 503, dropping that answer.
type retrier struct{ up netip.AddrPort }

func (h *retrier) Serve(x *Exchange) {
	out := outgoing(x, h.up)
	var again func(*Attempt, *http.Response, error)
	again = func(a *Attempt, resp *http.Response, err error) {
		switch {
		case err != nil:
			x.Reply(http.StatusBadGateway, nil, []byte(err.Error()), nil)
		case resp.StatusCode == http.StatusServiceUnavailable:
			a.Drop(time.Second)
			x.AfterFunc(100*time.Millisecond, func() { x.Send(h.up, out, x.Body, 0, again) })
		default:
			x.Respond(a, resp, nil)
		}
	}
	x.Send(h.up, out, x.Body, 0, again)
}

// A dropped answer (a retry follows) keeps its connection when the rest of
// its body is short and comes: the retry goes out on it. One with a byte
// after its body, or a body longer than is read to keep it, does not.
func TestDroppedAnswerKeepsItsConnection(t *testing.T) {
	for _, tc := range []struct {
		name, first string
		conns       int64
	}{
		{"short body, late", "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 10\r\n\r\nretry", 1},
		{"no body", "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n", 1},
		{"a stray byte", "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 10\r\n\r\nretry", 2},
		{"long body", fmt.Sprintf("HTTP/1.1 503 Service Unavailable\r\nContent-Length: %d\r\n\r\n", maxDrain+1), 2},
		{"connection: close", "HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", 2},
	} {
		var conns, served atomic.Int64
		up := rawUpstream(t, nil, func(c net.Conn) {
			conns.Add(1)
			br := bufio.NewReader(c)
			for {
				if _, err := http.ReadRequest(br); err != nil {
					return
				}
				if served.Add(1) > 1 {
					io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
					continue
				}
				io.WriteString(c, tc.first)
				switch tc.name {
				case "short body, late":
					time.Sleep(20 * time.Millisecond)
					io.WriteString(c, "-body")
				case "a stray byte":
					time.Sleep(20 * time.Millisecond)
					io.WriteString(c, "-body!")
				case "connection: close":
					return
				}
			}
		})
		_, addr := start(t, &retrier{up: up}, downstream.Limits{})
		resp, b := get(t, client(t), "GET", "http://"+addr+"/x", nil)
		if resp.StatusCode != 200 || string(b) != "ok" {
			t.Fatalf("%s: %d %q, want the retry's answer", tc.name, resp.StatusCode, b)
		}
		if n := conns.Load(); n != tc.conns {
			t.Errorf("%s: %d upstream connections, want %d", tc.name, n, tc.conns)
		}
	}
}
