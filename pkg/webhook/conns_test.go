package webhook

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sidecar-mesh/sidecar/internal/kubetest"
	"github.com/sidecar-mesh/sidecar/pkg/inject"
)

// TestWebhookIdleConnectionsDontLockOut: more idle TLS connections from
// one client than the webhook's whole connection limit (512) don't keep
// another client's AdmissionReview from its answer, and the idle client
// keeps no more than its share (32). With a plain limit, the 513th
// connection waited in the kernel's queue until an idle one timed out (90
// s), and the API server, after its 5 s, created pods without the sidecar.
func TestWebhookIdleConnectionsDontLockOut(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	cert := kubetest.WriteCert(t, certFile, keyFile)
	w := startWebhook(t, Config{CertFile: certFile, KeyFile: keyFile, Injector: injector(t, "sidecar:hook")})

	const idle = 600
	conns := openIdleConns(t, w.addr, cert, "127.0.0.2", idle)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()

	// Another client: its review is answered.
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(cert)
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		TLSClientConfig:   &tls.Config{RootCAs: pool},
		DisableKeepAlives: true,
		DialContext:       (&net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)}}).DialContext,
	}}
	review := podReview(`{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p","namespace":"ns"},"spec":{"containers":[{"name":"app","image":"a"}]}}`)
	resp, err := client.Post("https://"+w.addr+"/inject", "application/json", strings.NewReader(review))
	if err != nil {
		t.Fatalf("with %d idle connections from 127.0.0.2, an AdmissionReview from 127.0.0.1: %v; want an answer", idle, err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), `"patchType":"JSONPatch"`) {
		t.Fatalf("with %d idle connections from 127.0.0.2, an AdmissionReview from 127.0.0.1: %d %s; want 200 with a patch", idle, resp.StatusCode, body)
	}

	// The idle client kept its newest 32 connections; the older ones were
	// closed to make room.
	open := 0
	for _, c := range conns {
		if stillOpen(c) {
			open++
		}
	}
	if open != DefaultMaxConnsPerClient {
		t.Errorf("%d of the idle client's %d connections still open, want %d (its share)", open, idle, DefaultMaxConnsPerClient)
	}
	if l := w.logs.Lines("webhook connections over their limits: idle ones closed to make room, the rest refused (is something other than the API server connecting?)"); len(l) == 0 {
		t.Errorf("no warning logged about the connections over the limits")
	}
}

// openIdleConns opens n TLS connections from the address from, each of
// which makes one request and then stays open, idle. Connections the
// webhook closes on the way are returned too (closed).
func openIdleConns(t *testing.T, addr string, cert []byte, from string, n int) []*tls.Conn {
	t.Helper()
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(cert)
	cfg := &tls.Config{RootCAs: pool, NextProtos: []string{"http/1.1"}}
	dialer := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}, Timeout: 5 * time.Second}
	deadline := time.Now().Add(30 * time.Second)
	var conns []*tls.Conn
	for range n {
		c, err := tls.DialWithDialer(dialer, "tcp", addr, cfg)
		if err != nil {
			t.Fatalf("connection %d of %d from %s: %v", len(conns)+1, n, from, err)
		}
		conns = append(conns, c)
		c.SetDeadline(deadline)
		if _, err := io.WriteString(c, "GET /healthz HTTP/1.1\r\nHost: webhook\r\n\r\n"); err != nil {
			t.Fatalf("connection %d: %v", len(conns), err)
		}
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatalf("connection %d: GET /healthz: %v", len(conns), err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		c.SetDeadline(time.Time{})
	}
	return conns
}

// stillOpen says whether the webhook has left c open: a read waits rather
// than ending.
func stillOpen(c *tls.Conn) bool {
	c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	_, err := c.Read(make([]byte, 1))
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// TestConnGuard: over a bound, the longest idle connection of the same
// client goes, else of the client with the most connections; busy ones
// never do, and with every candidate busy the new connection is refused;
// with the default bounds, five clients can't fill every place with busy
// connections.
func TestConnGuard(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	g := newConnGuard(4, 3, log)
	clock := time.Unix(1000, 0)
	g.now = func() time.Time { clock = clock.Add(time.Second); return clock }
	var mu sync.Mutex
	closed := map[string]bool{}
	conn := func(name, from string) *guardedConn {
		c := &fakeConn{name: name, from: from, onClose: func() { mu.Lock(); closed[name] = true; mu.Unlock() }}
		gc := g.admit(c)
		if gc != nil {
			g.ConnState(gc, http.StateNew)
		}
		return gc
	}
	wasClosed := func(name string) bool { mu.Lock(); defer mu.Unlock(); return closed[name] }

	a1, a2, a3 := conn("a1", "10.0.0.1"), conn("a2", "10.0.0.1"), conn("a3", "10.0.0.1")
	if a1 == nil || a2 == nil || a3 == nil || g.open() != 3 {
		t.Fatalf("three connections from one client under both bounds: admitted %v %v %v, open %d", a1 != nil, a2 != nil, a3 != nil, g.open())
	}
	g.ConnState(a1, http.StateActive) // busy
	// Over the client's bound: its longest idle (a2, not the busy a1) goes.
	if a4 := conn("a4", "10.0.0.1"); a4 == nil || !wasClosed("a2") || wasClosed("a1") || g.open() != 3 {
		t.Fatalf("a4 over the per-client bound: admitted %v, a2 closed %v, a1 closed %v, open %d; want a4 in place of a2", a4 != nil, wasClosed("a2"), wasClosed("a1"), g.open())
	}
	b1 := conn("b1", "10.0.0.2")
	// Over the total: the client with the most connections (a) loses its
	// longest idle (a3).
	if c1 := conn("c1", "10.0.0.3"); c1 == nil || !wasClosed("a3") || wasClosed("b1") || g.open() != 4 {
		t.Fatalf("c1 over the total: admitted %v, a3 closed %v, b1 closed %v, open %d; want c1 in place of a3", c1 != nil, wasClosed("a3"), wasClosed("b1"), g.open())
	}
	// Every connection busy: refused, and closed.
	for _, c := range []*guardedConn{b1} {
		g.ConnState(c, http.StateActive)
	}
	for gc := range g.clients[clientAddr(&fakeAddr{"10.0.0.3:1"})].conns {
		g.ConnState(gc, http.StateActive)
	}
	for gc := range g.clients[clientAddr(&fakeAddr{"10.0.0.1:1"})].conns {
		g.ConnState(gc, http.StateActive)
	}
	if d1 := conn("d1", "10.0.0.4"); d1 != nil || !wasClosed("d1") || g.open() != 4 {
		t.Fatalf("d1 with every connection busy: admitted %v, closed %v, open %d; want it refused", d1 != nil, wasClosed("d1"), g.open())
	}
	// A connection that closes frees its place; closing twice frees one.
	a1.Close()
	a1.Close()
	if g.open() != 3 {
		t.Fatalf("after a1 closed: open %d, want 3", g.open())
	}

	// With the default bounds, five clients holding as many busy
	// connections as they can (bodies trickling in) leave room for
	// another: each holds its share, and the rest are refused.
	g = newConnGuard(DefaultMaxConns, DefaultMaxConnsPerClient, log)
	for i := range 5 {
		from := fmt.Sprintf("10.0.1.%d", i+1)
		for range 110 {
			if gc := conn("busy", from); gc != nil {
				g.ConnState(gc, http.StateActive)
			}
		}
	}
	if open := g.open(); open != 5*DefaultMaxConnsPerClient {
		t.Errorf("five clients opening 110 busy connections each: %d open, want %d (their shares)", open, 5*DefaultMaxConnsPerClient)
	}
	if e1 := conn("e1", "10.0.0.5"); e1 == nil {
		t.Errorf("a connection from another client, with five holding %d busy ones: refused, want admitted", g.open())
	}
}

type fakeConn struct {
	net.Conn
	name, from string
	onClose    func()
}

func (c *fakeConn) RemoteAddr() net.Addr { return &fakeAddr{c.from + ":40000"} }
func (c *fakeConn) Close() error         { c.onClose(); return nil }

type fakeAddr struct{ s string }

func (a *fakeAddr) Network() string { return "tcp" }
func (a *fakeAddr) String() string  { return a.s }

// TestReviewBudget: reviews take their size from the budget and wait for
// room; one larger than the budget runs alone; a wait ends with its
// context.
func TestReviewBudget(t *testing.T) {
	b := newReviewBudget(100)
	ctx := context.Background()
	r1, err := b.acquire(ctx, 60)
	if err != nil {
		t.Fatal(err)
	}
	short, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer cancel()
	if _, err := b.acquire(short, 50); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("acquire 50 with 60 of 100 taken: %v, want to wait until the context ends", err)
	}
	got := make(chan error, 1)
	go func() {
		r2, err := b.acquire(ctx, 1000) // more than the budget: all of it
		if err == nil {
			r2()
		}
		got <- err
	}()
	select {
	case err := <-got:
		t.Fatalf("acquire 1000 with 60 taken returned %v at once, want it to wait", err)
	case <-time.After(20 * time.Millisecond):
	}
	r1()
	r1() // twice: gives back once
	if err := <-got; err != nil {
		t.Fatalf("acquire 1000 after a release: %v", err)
	}
	if b.used != 0 {
		t.Fatalf("%d bytes still taken after every release, want 0", b.used)
	}
}

// TestWebhookHandlerWaitsForBudget: with the budget taken, a review waits,
// and is answered 503 when its caller gives up; once there is room it is
// answered.
func TestWebhookHandlerWaitsForBudget(t *testing.T) {
	in, err := inject.New(inject.Config{Image: "sidecar:1"})
	if err != nil {
		t.Fatal(err)
	}
	budget := newReviewBudget(1 << 20)
	h := newHandler(in, slog.New(slog.NewTextHandler(io.Discard, nil)), budget)
	review := podReview(`{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p","namespace":"ns"},"spec":{"containers":[{"name":"app","image":"a"}]}}`)
	post := func(ctx context.Context) int {
		req := httptest.NewRequestWithContext(ctx, http.MethodPost, "/inject", strings.NewReader(review))
		req.Header.Set("Content-Type", "application/json")
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		return rec.Code
	}
	release, err := budget.acquire(context.Background(), 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	short, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if code := post(short); code != http.StatusServiceUnavailable {
		t.Errorf("a review with the budget taken, its caller gone: %d, want 503", code)
	}
	release()
	if code := post(context.Background()); code != http.StatusOK {
		t.Errorf("a review with room: %d, want 200", code)
	}
}

// TestWebhookTricklingBodiesDontLockOut: connections whose request headers
// are complete and whose bodies trickle in a byte a second, 110 from each
// of five addresses and opened again as soon as the webhook closes them,
// don't keep another client's AdmissionReviews from their answers within
// the API server's 5 s; and such a connection is cut a few seconds after
// its headers. They counted as busy, so none could be closed to make room:
// with 128 per client, five addresses filled all 512 places for the 15 s of
// the read timeout, and 1 review in 20 was answered.
func TestWebhookTricklingBodiesDontLockOut(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	cert := kubetest.WriteCert(t, certFile, keyFile)
	w := startWebhook(t, Config{CertFile: certFile, KeyFile: keyFile, Injector: injector(t, "sidecar:hook")})

	// A connection whose body stops after its first byte is answered 408,
	// not left to hold its place until the read timeout (15 s).
	one := newTricklers(w.addr, cert, []string{"127.0.0.7"}, 1)
	one.tick()
	start := time.Now()
	c := one.conns[0].c
	if c == nil {
		t.Fatalf("a connection from 127.0.0.7 was refused; want it admitted")
	}
	c.SetReadDeadline(start.Add(20 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	took := time.Since(start)
	one.close()
	if err != nil || resp.StatusCode != http.StatusRequestTimeout || took > bodyTimeout+2*time.Second {
		status := "no answer"
		if err == nil {
			status = resp.Status
		}
		t.Errorf("a review whose body stalled after its first byte: %s (%v) after %v; want 408 within %v", status, err, took.Round(time.Millisecond), bodyTimeout+2*time.Second)
	}

	addrs := []string{"127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6"}
	tr := newTricklers(w.addr, cert, addrs, 110)
	tr.tick() // opens them all before the reviews start
	stopTrickling := tr.run()
	defer stopTrickling()

	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(cert)
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		TLSClientConfig:   &tls.Config{RootCAs: pool},
		DisableKeepAlives: true,
		DialContext:       (&net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)}}).DialContext,
	}}
	review := podReview(`{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p","namespace":"ns"},"spec":{"containers":[{"name":"app","image":"a"}]}}`)
	const reviews = 20
	answered := 0
	var failures []string
	for i := range reviews {
		if i > 0 {
			time.Sleep(250 * time.Millisecond)
		}
		resp, err := client.Post("https://"+w.addr+"/inject", "application/json", strings.NewReader(review))
		if err != nil {
			failures = append(failures, err.Error())
			continue
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), `"patchType":"JSONPatch"`) {
			failures = append(failures, fmt.Sprintf("%d %s", resp.StatusCode, body))
			continue
		}
		answered++
	}
	stopTrickling()
	if answered != reviews {
		t.Errorf("with 110 connections trickling bodies from each of %d addresses, %d of %d AdmissionReviews from 127.0.0.1 answered within 5 s, want all; first failure: %s (trickling connections opened %d, refused %d)",
			len(addrs), answered, reviews, failures[0], tr.opened, tr.refused)
	}
}

// tricklers are connections that send a request's headers at once and then
// its body a byte at each tick; a connection the webhook refuses or closes
// is opened again at the next tick. Not safe for concurrent use.
type tricklers struct {
	addr            string
	cfg             *tls.Config
	conns           []trickler
	opened, refused int
}

type trickler struct {
	from string
	c    *tls.Conn
}

func newTricklers(addr string, cert []byte, from []string, per int) *tricklers {
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(cert)
	tr := &tricklers{addr: addr, cfg: &tls.Config{RootCAs: pool, NextProtos: []string{"http/1.1"}}}
	for _, f := range from {
		for range per {
			tr.conns = append(tr.conns, trickler{from: f})
		}
	}
	return tr
}

const trickleHeaders = "POST /inject HTTP/1.1\r\nHost: webhook\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"

func (tr *tricklers) tick() {
	for i := range tr.conns {
		k := &tr.conns[i]
		if k.c != nil {
			k.c.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
			if _, err := io.WriteString(k.c, " "); err == nil {
				continue
			}
			k.c.Close()
			k.c = nil
		}
		dialer := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(k.from)}, Timeout: time.Second}
		c, err := tls.DialWithDialer(dialer, "tcp", tr.addr, tr.cfg)
		if err != nil {
			tr.refused++
			continue
		}
		c.SetWriteDeadline(time.Now().Add(time.Second))
		if _, err := io.WriteString(c, trickleHeaders); err != nil {
			c.Close()
			tr.refused++
			continue
		}
		k.c = c
		tr.opened++
	}
}

// run ticks every second until the function it returns is called, which
// closes the connections; calling it again does nothing.
func (tr *tricklers) run() (stop func()) {
	quit, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			select {
			case <-quit:
				return
			case <-tick.C:
				tr.tick()
			}
		}
	}()
	var once sync.Once
	return func() { once.Do(func() { close(quit); <-done; tr.close() }) }
}

func (tr *tricklers) close() {
	for i := range tr.conns {
		if c := tr.conns[i].c; c != nil {
			c.Close()
			tr.conns[i].c = nil
		}
	}
}
