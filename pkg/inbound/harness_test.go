package inbound_test

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/sidecar-mesh/sidecar/pkg/downstream"
	"github.com/sidecar-mesh/sidecar/pkg/inbound"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// testApp is a real HTTP app on loopback; hits counts the requests its
// handler was given.
type testApp struct {
	srv  *httptest.Server
	hits atomic.Int64
}

func startApp(t *testing.T, h http.HandlerFunc) *testApp {
	t.Helper()
	a := &testApp{}
	a.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		a.hits.Add(1)
		h(w, r)
	}))
	t.Cleanup(a.srv.Close)
	return a
}

func (a *testApp) addr() string { return a.srv.Listener.Addr().String() }

// startInbound serves an inbound Proxy on a hardened loopback listener,
// as cmd/sidecar does, and returns its address.
func startInbound(t *testing.T, cfg inbound.Config) (*inbound.Proxy, string) {
	t.Helper()
	p, err := inbound.New(cfg)
	if err != nil {
		t.Fatalf("inbound.New: %v", err)
	}
	srv, err := downstream.Listen("inbound", "127.0.0.1:0", p, cfg.Limits, nil)
	if err != nil {
		t.Fatalf("downstream.Listen: %v", err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve() }()
	t.Cleanup(func() {
		_ = srv.Close()
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
		p.Close()
	})
	return p, srv.Addr().String()
}

// exchange sends a raw request on a new connection and returns the
// response read back. Safe to call from any goroutine.
func exchange(addr, request string) (*http.Response, string, error) {
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return nil, "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, request); err != nil {
		return nil, "", err
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return nil, "", err
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	return resp, string(body), err
}

// roundTrip is exchange for the test goroutine: an error fails the test.
func roundTrip(t *testing.T, addr, request string) (*http.Response, string) {
	t.Helper()
	resp, body, err := exchange(addr, request)
	if err != nil {
		t.Fatalf("request %.60q: %v", request, err)
	}
	return resp, body
}

// memListener is a listener in memory: each Dial hands Accept the other
// end of a net.Pipe. Made in a synctest bubble, its connections block
// durably (a socket's do not), so virtual time passes while an app served
// on it holds a request. Dial counts the connections made.
type memListener struct {
	conns  chan net.Conn
	closed chan struct{}
	once   sync.Once
	dials  atomic.Int64
}

var _ net.Listener = (*memListener)(nil)

func newMemListener() *memListener {
	return &memListener{conns: make(chan net.Conn), closed: make(chan struct{})}
}

func (l *memListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.closed:
		return nil, net.ErrClosed
	}
}

func (l *memListener) Close() error {
	l.once.Do(func() { close(l.closed) })
	return nil
}

func (l *memListener) Addr() net.Addr { return memAddr{} }

// Dial connects to the listener, whatever the address; it is a
// ProberConfig.DialContext.
func (l *memListener) Dial(ctx context.Context, _, _ string) (net.Conn, error) {
	l.dials.Add(1)
	client, server := net.Pipe()
	select {
	case l.conns <- server:
		return client, nil
	case <-l.closed:
		return nil, syscall.ECONNREFUSED
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

type memAddr struct{}

func (memAddr) Network() string { return "memory" }
func (memAddr) String() string  { return "memory" }

// startMemApp serves h on a memListener until the test ends. Call it in
// the bubble whose prober dials it.
func startMemApp(t *testing.T, h http.HandlerFunc) *memListener {
	t.Helper()
	ln := newMemListener()
	srv := &http.Server{Handler: h}
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = srv.Serve(ln)
	}()
	t.Cleanup(func() {
		_ = srv.Close()
		<-served
	})
	return ln
}

// within waits for a value from ch, failing the test after 10 s: a
// safety net for a broken prober, not a timing assumption. In a synctest
// bubble the 10 s are virtual: they pass only once every goroutine of the
// bubble is stuck.
func within[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(10 * time.Second):
		t.Fatalf("no %s within 10s", what)
		panic("unreachable")
	}
}
