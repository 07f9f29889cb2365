package inbound_test

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/sidecar-mesh/sidecar/pkg/inbound"
	"github.com/sidecar-mesh/sidecar/pkg/proxyhttp"
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
	srv, err := proxyhttp.Listen("inbound", "127.0.0.1:0", p, cfg.Limits, nil)
	if err != nil {
		t.Fatalf("proxyhttp.Listen: %v", err)
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

// fakeClock is a Clock whose time moves only on Advance. Timers that come
// due fire then; created reports each new timer's duration.
type fakeClock struct {
	mu      sync.Mutex // guards now and timers
	now     time.Time
	timers  []*fakeTimer
	created chan time.Duration
}

type fakeTimer struct {
	clock *fakeClock
	at    time.Time
	c     chan time.Time
}

func newFakeClock() *fakeClock {
	return &fakeClock{now: time.Unix(1_000_000, 0), created: make(chan time.Duration, 64)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) NewTimer(d time.Duration) inbound.Timer {
	c.mu.Lock()
	t := &fakeTimer{clock: c, at: c.now.Add(d), c: make(chan time.Time, 1)}
	if d <= 0 {
		t.c <- c.now
	} else {
		c.timers = append(c.timers, t)
	}
	c.mu.Unlock()
	select {
	case c.created <- d:
	default:
	}
	return t
}

// Advance moves time on by d and fires the timers that come due.
func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
	keep := c.timers[:0]
	for _, t := range c.timers {
		if t.at.After(c.now) {
			keep = append(keep, t)
			continue
		}
		t.c <- c.now
	}
	clear(c.timers[len(keep):])
	c.timers = keep
}

func (t *fakeTimer) C() <-chan time.Time { return t.c }

func (t *fakeTimer) Stop() bool {
	c := t.clock
	c.mu.Lock()
	defer c.mu.Unlock()
	for i, x := range c.timers {
		if x == t {
			c.timers = append(c.timers[:i], c.timers[i+1:]...)
			return true
		}
	}
	return false
}

// within waits for a value from ch, failing the test after 10 s: a
// safety net for a broken prober, not a timing assumption.
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
