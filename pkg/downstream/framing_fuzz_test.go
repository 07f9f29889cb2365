package downstream_test

import (
	"bytes"
	"io"
	"log"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sidecar-mesh/sidecar/internal/attacktest"
	"github.com/sidecar-mesh/sidecar/pkg/downstream"
)

// FuzzFraming holds the framing check to net/http: the same client bytes
// go to a server behind the check and to a plain net/http server, and
// every request the check lets through (with its whole body) must be the
// request net/http reads at the same position, with the same body. So the
// check never frames a request differently from the server behind it, and
// a rejected request ends what the connection serves.
func FuzzFraming(f *testing.F) {
	for _, s := range attacktest.Seeds() {
		f.Add([]byte(s.Request))
	}
	f.Add([]byte("POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello" +
		"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nT: v\r\n\r\n" +
		"GET /c HTTP/1.1\r\nHost: x\r\n\r\n"))
	f.Add([]byte("POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n"))
	f.Add([]byte("OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"))
	f.Add([]byte("GET / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhiGET /2 HTTP/1.1\r\nHost: x\r\n\r\n"))
	f.Fuzz(func(t *testing.T, stream []byte) {
		if bytes.HasPrefix(stream, []byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")) {
			return // HTTP/2 with prior knowledge passes the check unchecked
		}
		if len(stream) > 64<<10 {
			return // past MaxHeaderBytes the check steps aside: net/http answers 431
		}
		checked := serveStream(t, stream, true)
		plain := serveStream(t, stream, false)
		for i, c := range checked {
			if c.verdict != "" || c.bodyErr {
				if i != len(checked)-1 {
					t.Fatalf("request %d was rejected (%q), yet %d more were served on the connection", i, c.verdict, len(checked)-1-i)
				}
				return
			}
			if c.host == "rejected.invalid" {
				t.Fatalf("request %d is the placeholder of a rejected block, served with no verdict", i)
			}
			if i >= len(plain) {
				t.Fatalf("the check passed request %d (%s), net/http alone read only %d requests from the same bytes", i, c, len(plain))
			}
			if p := plain[i]; p != c {
				t.Fatalf("request %d: the check passed %s, net/http alone read %s", i, c, p)
			}
		}
	})
}

// served is what a handler saw of one request.
type served struct {
	method, uri, host, body string
	bodyErr                 bool
	verdict                 string
}

func (s served) String() string {
	return s.method + " " + s.uri + " Host " + s.host + " body " + strings.ReplaceAll(s.body, "\r", `\r`)
}

// serveStream serves one connection that sends stream and then ends, on
// an HTTP/1.1 server configured as downstream.Listen configures one, with
// or without the framing check, and returns what the handler saw.
func serveStream(t *testing.T, stream []byte, check bool) []served {
	var (
		mu  sync.Mutex
		out []served
	)
	closed := make(chan struct{})
	var once sync.Once
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			s := served{method: r.Method, uri: r.RequestURI, host: r.Host}
			if check {
				s.verdict = downstream.TakeVerdict(r).Reason
			}
			b, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
			s.body, s.bodyErr = string(b), err != nil
			mu.Lock()
			out = append(out, s)
			mu.Unlock()
		}),
		MaxHeaderBytes:               64 << 10,
		DisableGeneralOptionsHandler: true,
		ConnState: func(_ net.Conn, st http.ConnState) {
			if st == http.StateClosed || st == http.StateHijacked {
				once.Do(func() { close(closed) })
			}
		},
	}
	var ln net.Listener = &oneConn{conn: &streamConn{r: bytes.NewReader(stream)}, done: make(chan struct{})}
	if check {
		srv.ConnContext = downstream.ConnContext
		ln = &downstream.FramingListener{Listener: ln, MaxHeaderBytes: srv.MaxHeaderBytes}
	}
	srv.ErrorLog = log.New(io.Discard, "", 0)
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = srv.Serve(ln)
	}()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Errorf("the connection was not done after 10s")
	}
	_ = srv.Close()
	<-served
	mu.Lock()
	defer mu.Unlock()
	return out
}

// oneConn is a listener that accepts conn once, then blocks until closed.
type oneConn struct {
	mu   sync.Mutex
	conn net.Conn
	done chan struct{}
	shut sync.Once
}

func (l *oneConn) Accept() (net.Conn, error) {
	l.mu.Lock()
	c := l.conn
	l.conn = nil
	l.mu.Unlock()
	if c != nil {
		return c, nil
	}
	<-l.done
	return nil, net.ErrClosed
}

func (l *oneConn) Close() error   { l.shut.Do(func() { close(l.done) }); return nil }
func (l *oneConn) Addr() net.Addr { return fakeAddr }

// streamConn is a client that sends its bytes, then closes its side; what
// the server writes is discarded.
type streamConn struct {
	mu sync.Mutex // guards r: net/http's background read may race a Read
	r  *bytes.Reader
}

func (c *streamConn) Read(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.r.Read(p)
}
func (c *streamConn) Write(p []byte) (int, error)      { return len(p), nil }
func (c *streamConn) Close() error                     { return nil }
func (c *streamConn) LocalAddr() net.Addr              { return fakeAddr }
func (c *streamConn) RemoteAddr() net.Addr             { return fakeAddr }
func (c *streamConn) SetDeadline(time.Time) error      { return nil }
func (c *streamConn) SetReadDeadline(time.Time) error  { return nil }
func (c *streamConn) SetWriteDeadline(time.Time) error { return nil }

var fakeAddr = &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 15001}
