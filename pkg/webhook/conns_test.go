package webhook

import (
	"bufio"
	"cmp"
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
	"runtime"
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
	if l := w.logs.Lines("webhook connections over their limits: idle or stalled ones closed to make room, the rest refused (is something other than the API server connecting?)"); len(l) == 0 {
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
// client goes, else of the client with the most connections; working ones
// never do, and with every candidate working the new connection is
// refused; with the default bounds, five clients can't fill every place
// with working connections. A busy connection whose requests have all
// waited stallAfter for the client's bytes goes like an idle one, so
// sixteen clients holding every place that way can't keep another out.
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
	// work makes gc busy with a request being worked on.
	work := func(gc *guardedConn) {
		g.ConnState(gc, http.StateActive)
		gc.handlers.Add(1)
	}

	a1, a2, a3 := conn("a1", "10.0.0.1"), conn("a2", "10.0.0.1"), conn("a3", "10.0.0.1")
	if a1 == nil || a2 == nil || a3 == nil || g.open() != 3 {
		t.Fatalf("three connections from one client under both bounds: admitted %v %v %v, open %d", a1 != nil, a2 != nil, a3 != nil, g.open())
	}
	work(a1)
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
	work(b1)
	for gc := range g.clients[clientAddr(&fakeAddr{"10.0.0.3:1"})].conns {
		work(gc)
	}
	for gc := range g.clients[clientAddr(&fakeAddr{"10.0.0.1:1"})].conns {
		if gc != a1 {
			work(gc)
		}
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
				work(gc)
			}
		}
	}
	if open := g.open(); open != 5*DefaultMaxConnsPerClient {
		t.Errorf("five clients opening 110 busy connections each: %d open, want %d (their shares)", open, 5*DefaultMaxConnsPerClient)
	}
	if e1 := conn("e1", "10.0.0.5"); e1 == nil {
		t.Errorf("a connection from another client, with five holding %d busy ones: refused, want admitted", g.open())
	}

	// Sixteen clients fill every place with requests whose bodies trickle
	// in. Within bodyWait of their start none can go; then another
	// client's connection takes the place of a stalled one (no byte for
	// stallAfter) first, else of the one waiting for its body the longest,
	// bytes or not: a byte more often than stallAfter keeps a connection
	// from being quiet, not from being slow.
	g = newConnGuard(DefaultMaxConns, DefaultMaxConnsPerClient, log)
	now := time.Unix(2000, 0)
	g.now = func() time.Time { return now }
	var first, second, third *guardedConn
	for i := range 16 {
		from := fmt.Sprintf("10.0.2.%d", i+1)
		for range DefaultMaxConnsPerClient {
			gc := conn("trickling", from)
			if gc == nil {
				t.Fatalf("connection %d of 512 refused", g.open()+1)
			}
			g.ConnState(gc, http.StateActive)
			gc.busySince.Store(now.UnixNano())
			gc.handlers.Add(1)
			gc.waiting.Add(1) // in a read of its body
			switch {
			case first == nil:
				first = gc
			case second == nil:
				second = gc
			case third == nil:
				third = gc
			}
		}
	}
	now = now.Add(bodyWait / 2)
	if f1 := conn("f1", "10.0.0.6"); f1 != nil || g.open() != DefaultMaxConns {
		t.Fatalf("a connection with 512 trickling ones %v into their requests: admitted %v, open %d; want it refused", bodyWait/2, f1 != nil, g.open())
	}
	first.busySince.Store(now.Add(-bodyWait).UnixNano())
	second.busySince.Store(now.Add(-bodyWait - time.Millisecond).UnixNano())
	third.lastRead.Store(now.Add(-stallAfter).UnixNano())
	if f0 := conn("f0", "10.0.0.6"); f0 == nil || !third.gone || first.gone || second.gone {
		t.Fatalf("a connection with 512 trickling ones, one stalled and two waiting %v for their bodies: admitted %v, the stalled one closed %v, the waiting ones %v %v; want it in place of the stalled one",
			bodyWait, f0 != nil, third.gone, first.gone, second.gone)
	} else {
		work(f0)
	}
	f2 := conn("f2", "10.0.0.6")
	if f2 == nil || !second.gone || first.gone || g.open() != DefaultMaxConns {
		t.Fatalf("a connection with 512 trickling ones, two of them waiting %v for their bodies: admitted %v, the longest waiting closed %v, the other %v, open %d; want it in place of the longest waiting",
			bodyWait, f2 != nil, second.gone, first.gone, g.open())
	}
	work(f2)
	// A request being worked on is not stalled, however long it has run
	// or its client has been silent.
	first.lastRead.Store(now.Add(-stallAfter).UnixNano())
	first.waiting.Add(-1)
	if f3 := conn("f3", "10.0.0.6"); f3 != nil || first.gone {
		t.Fatalf("a connection with 512 busy ones, the only silent one working: admitted %v, it closed %v; want it refused", f3 != nil, first.gone)
	}
	// The rest stall: each new connection finds room.
	now = now.Add(stallAfter)
	for i := range 100 {
		if gc := conn("g", fmt.Sprintf("10.0.3.%d", i+1)); gc == nil {
			t.Fatalf("connection %d from new clients, with the trickling ones stalled: refused, want admitted", i+1)
		}
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

// TestReviewBudget: charges grow within the budget and wait for room;
// with no room, one charge at a time may go past it, until the budget is
// under its size again; a wait ends with its context.
func TestReviewBudget(t *testing.T) {
	b := newReviewBudget(100)
	ctx := context.Background()
	c1, c2, c3 := b.charge(), b.charge(), b.charge()
	if err := c1.grow(ctx, 60); err != nil {
		t.Fatal(err)
	}
	if err := c2.grow(ctx, 40); err != nil {
		t.Fatal(err)
	}
	// No room: c1 takes the overdraft (two large reviews each holding half
	// would otherwise wait for each other) and c2 waits.
	if err := c1.grow(ctx, 30); err != nil {
		t.Fatalf("c1 grows 30 past a full budget of 100 with no overdraft taken: %v, want it granted", err)
	}
	short, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer cancel()
	if err := c2.grow(short, 10); !errors.Is(err, errNoBudget) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("c2 grows 10 while c1 holds the overdraft: %v, want to wait until the context ends", err)
	}
	got := make(chan error, 1)
	go func() { got <- c3.grow(ctx, 50) }()
	select {
	case err := <-got:
		t.Fatalf("c3 grows 50 with 130 of 100 taken: returned %v at once, want it to wait", err)
	case <-time.After(20 * time.Millisecond):
	}
	c1.release()
	c1.release() // twice: gives back once
	if err := <-got; err != nil {
		t.Fatalf("c3 grows 50 after c1's release: %v", err)
	}
	c2.release()
	c3.release()
	if b.used != 0 || b.over != nil {
		t.Fatalf("%d bytes still taken after every release (overdraft %v), want 0", b.used, b.over != nil)
	}
	if peak, want := b.maxUsed(), int64(130); peak != want {
		t.Errorf("most used at once: %d, want %d", peak, want)
	}
}

// TestReadBody: a body is charged as it arrives, about what it has sent,
// not what it declares, and never more than its declared length.
func TestReadBody(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name     string
		body     string
		declared int64
		charged  int64
		err      bool
	}{
		{"exact", strings.Repeat("x", 3000), 3000, 3000, false},
		{"unknown length", strings.Repeat("x", 3000), -1, 4096, false},
		{"empty", "", 0, 0, false},
		{"declares 4 MiB, sends 10 bytes", strings.Repeat("x", 10), maxBody, firstRead, false},
		{"over the limit", strings.Repeat("x", maxBody+1), -1, maxBody, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newReviewBudget(reviewBytes)
			c := b.charge()
			got, err := readBody(ctx, http.MaxBytesReader(nil, io.NopCloser(strings.NewReader(tc.body)), maxBody), tc.declared, c)
			if (err != nil) != tc.err || err == nil && string(got) != tc.body {
				t.Fatalf("readBody of %d bytes declaring %d: %d bytes, %v; want the body back (error: %v)", len(tc.body), tc.declared, len(got), err, tc.err)
			}
			if c.n != tc.charged {
				t.Errorf("readBody of %d bytes declaring %d charged %d, want %d", len(tc.body), tc.declared, c.n, tc.charged)
			}
		})
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
	hog := budget.charge()
	review := podReview(`{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p","namespace":"ns"},"spec":{"containers":[{"name":"app","image":"a"}]}}`)
	post := func(ctx context.Context) int {
		req := httptest.NewRequestWithContext(ctx, http.MethodPost, "/inject", strings.NewReader(review))
		req.Header.Set("Content-Type", "application/json")
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		return rec.Code
	}
	if err := hog.grow(context.Background(), 1<<20); err != nil {
		t.Fatal(err)
	}
	// Another takes the overdraft: the review has no room.
	if err := budget.charge().grow(context.Background(), 1); err != nil {
		t.Fatal(err)
	}
	short, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if code := post(short); code != http.StatusServiceUnavailable {
		t.Errorf("a review with the budget taken, its caller gone: %d, want 503", code)
	}
	hog.release()
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

	answered, failures := postReviews(cert, w.addr)
	stopTrickling()
	if answered != reviews {
		t.Errorf("with 110 connections trickling bodies from each of %d addresses, %d of %d AdmissionReviews from 127.0.0.1 answered within 5 s, want all; first failure: %s (trickling connections opened %d, refused %d)",
			len(addrs), answered, reviews, failures[0], tr.opened, tr.refused)
	}
}

// TestWebhookTricklingBodiesDontHoldTheBudget: 32 connections from one
// address, each declaring a body of 4 MiB (the whole review budget) and
// sending a byte a second, don't keep another client's AdmissionReviews
// from their answers within 5 s, and what they send is all they hold of
// the budget. Each reserved the length it declared before its body was
// read, so they took turns holding the whole budget, and 7 reviews in 20
// were answered.
func TestWebhookTricklingBodiesDontHoldTheBudget(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	cert := kubetest.WriteCert(t, certFile, keyFile)
	w := startWebhook(t, Config{CertFile: certFile, KeyFile: keyFile, Injector: injector(t, "sidecar:hook")})

	tr := newTricklers(w.addr, cert, []string{"127.0.0.2"}, DefaultMaxConnsPerClient)
	tr.declared = maxBody
	tr.tick()
	stopTrickling := tr.run()
	defer stopTrickling()
	mem := watchMemory()
	answered, failures := postReviews(cert, w.addr)
	heap := mem()
	stopTrickling()
	if answered != reviews {
		t.Errorf("with %d connections from 127.0.0.2 trickling bodies that declare %d bytes, %d of %d AdmissionReviews from 127.0.0.1 answered within 5 s, want all; first failure: %s",
			DefaultMaxConnsPerClient, maxBody, answered, reviews, failures[0])
	}
	checkMemory(t, w, heap)
}

// TestWebhookStalledConnectionsDontLockOut: 32 connections from each of 16
// addresses, as many as the webhook takes, each declaring a body of 4 MiB
// and sending a byte a second, and opened again as soon as the webhook
// closes them, don't keep another client's AdmissionReviews from their
// answers within 5 s. They counted as busy until their 3 s were up, so
// none could be closed to make room, and the reviews' connections were
// refused: a connection whose requests wait for a client that has sent
// nothing for stallAfter now makes room like an idle one.
func TestWebhookStalledConnectionsDontLockOut(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	cert := kubetest.WriteCert(t, certFile, keyFile)
	w := startWebhook(t, Config{CertFile: certFile, KeyFile: keyFile, Injector: injector(t, "sidecar:hook")})

	var addrs []string
	for i := range DefaultMaxConns / DefaultMaxConnsPerClient {
		addrs = append(addrs, fmt.Sprintf("127.0.0.%d", i+2))
	}
	tr := newTricklers(w.addr, cert, addrs, DefaultMaxConnsPerClient)
	tr.declared = maxBody
	tr.tick()
	// Those cut after 3 s while the rest were being opened (on a slow
	// machine) come back at each tick.
	t.Logf("%d trickling connections from %d addresses: %d open of %d places", len(tr.conns), len(addrs), w.srv.guard.open(), DefaultMaxConns)
	stopTrickling := tr.run()
	defer stopTrickling()
	mem := watchMemory()
	answered, failures := postReviews(cert, w.addr)
	heap := mem()
	stopTrickling()
	if answered != reviews {
		t.Errorf("with %d connections from each of %d addresses trickling bodies that declare %d bytes, %d of %d AdmissionReviews from 127.0.0.1 answered within 5 s, want all; first failure: %s (trickling connections opened %d, refused %d)",
			DefaultMaxConnsPerClient, len(addrs), maxBody, answered, reviews, failures[0], tr.opened, tr.refused)
	}
	checkMemory(t, w, heap)
}

// reviews is how many AdmissionReviews postReviews posts.
const reviews = 20

// postReviews posts reviews AdmissionReviews from 127.0.0.1 to the webhook
// at addr, a new connection each, one every 250 ms, each given 5 s (the
// API server's timeout in k8s/webhook.yaml), and says how many were
// answered 200 with a patch, and how the others failed.
func postReviews(cert []byte, addr string) (answered int, failures []string) {
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(cert)
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		TLSClientConfig:   &tls.Config{RootCAs: pool},
		DisableKeepAlives: true,
		DialContext:       (&net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)}}).DialContext,
	}}
	review := podReview(`{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p","namespace":"ns"},"spec":{"containers":[{"name":"app","image":"a"}]}}`)
	for i := range reviews {
		if i > 0 {
			time.Sleep(250 * time.Millisecond)
		}
		resp, err := client.Post("https://"+addr+"/inject", "application/json", strings.NewReader(review))
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
	return answered, failures
}

// watchMemory samples the test process's heap every 100 ms until the
// function it returns is called, which returns the largest sample.
func watchMemory() (stop func() uint64) {
	quit, done := make(chan struct{}), make(chan uint64)
	go func() {
		var peak uint64
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			var m runtime.MemStats
			runtime.ReadMemStats(&m)
			peak = max(peak, m.HeapInuse)
			select {
			case <-quit:
				done <- peak
				return
			case <-tick.C:
			}
		}
	}()
	return func() uint64 { close(quit); return <-done }
}

// checkMemory checks that the connections trickling bodies of a declared
// 4 MiB each held no more of the review budget than its size, and that the
// process, the clients' connections included, stayed under the webhook's
// memory limit (256Mi) with a heap of peak bytes.
func checkMemory(t *testing.T, w *runningWebhook, peak uint64) {
	t.Helper()
	if used := w.srv.budget.maxUsed(); used > reviewBytes {
		t.Errorf("the review budget had %d bytes charged at once, want at most its %d", used, reviewBytes)
	}
	if peak > 256<<20 {
		t.Errorf("the heap reached %d MiB, want under the webhook's 256 MiB limit", peak>>20)
	}
	t.Logf("review budget: at most %d bytes charged; heap at most %d MiB", w.srv.budget.maxUsed(), peak>>20)
}

// tricklers are connections that send a request's headers at once and then
// its body a byte at each tick; a connection the webhook refuses or closes
// is opened again at the next tick. Each tick goes through the addresses
// at once. Not safe for concurrent use.
type tricklers struct {
	addr            string
	cfg             *tls.Config
	declared        int // the Content-Length each sends; 0: 100000
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

const trickleHeaders = "POST /inject HTTP/1.1\r\nHost: webhook\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n{"

func (tr *tricklers) tick() {
	var wg sync.WaitGroup
	var mu sync.Mutex // guards tr.opened, tr.refused
	// The connections of each address in turn, the addresses at once.
	for start := 0; start < len(tr.conns); {
		end := start
		for end < len(tr.conns) && tr.conns[end].from == tr.conns[start].from {
			end++
		}
		wg.Add(1)
		go func(ks []trickler) {
			defer wg.Done()
			opened, refused := tr.tickEach(ks)
			mu.Lock()
			tr.opened += opened
			tr.refused += refused
			mu.Unlock()
		}(tr.conns[start:end])
		start = end
	}
	wg.Wait()
}

func (tr *tricklers) tickEach(ks []trickler) (opened, refused int) {
	for i := range ks {
		k := &ks[i]
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
			refused++
			continue
		}
		c.SetWriteDeadline(time.Now().Add(time.Second))
		if _, err := fmt.Fprintf(c, trickleHeaders, cmp.Or(tr.declared, 100000)); err != nil {
			c.Close()
			refused++
			continue
		}
		k.c = c
		opened++
	}
	return opened, refused
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
