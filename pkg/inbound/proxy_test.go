package inbound_test

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/forward"
	"github.com/sidecar-mesh/sidecar/pkg/inbound"
)

func TestForwardsToAppWhateverHost(t *testing.T) {
	type seen struct{ host, uri, xff, xfh string }
	var mu sync.Mutex
	var got []seen
	app := startApp(t, func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		got = append(got, seen{r.Host, r.RequestURI, r.Header.Get("X-Forwarded-For"), r.Header.Get("X-Forwarded-Host")})
		mu.Unlock()
		io.WriteString(w, "app")
	})
	_, addr := startInbound(t, inbound.Config{AppAddr: app.addr()})

	for i, tc := range []struct {
		request  string
		wantHost string
		wantURI  string
	}{
		{"GET /orders/1 HTTP/1.1\r\nHost: orders\r\n\r\n", "orders", "/orders/1"},
		{"GET /x?y=1 HTTP/1.1\r\nHost: user-service.service.consul:8080\r\n\r\n", "user-service.service.consul:8080", "/x?y=1"},
		{"GET / HTTP/1.1\r\nHost: 203.0.113.7\r\n\r\n", "203.0.113.7", "/"},
		{"GET http://elsewhere.example/abs HTTP/1.1\r\nHost: ignored\r\n\r\n", "elsewhere.example", "/abs"},
	} {
		resp, body := roundTrip(t, addr, tc.request)
		if resp.StatusCode != 200 || body != "app" {
			t.Fatalf("%q: got %d %q, want 200 from the app", tc.request, resp.StatusCode, body)
		}
		mu.Lock()
		s := got[i]
		mu.Unlock()
		if s.host != tc.wantHost || s.uri != tc.wantURI {
			t.Errorf("%q: app saw Host %q URI %q, want %q %q", tc.request, s.host, s.uri, tc.wantHost, tc.wantURI)
		}
		if s.xff != "127.0.0.1" || s.xfh != tc.wantHost {
			t.Errorf("%q: app saw X-Forwarded-For %q X-Forwarded-Host %q, want 127.0.0.1 and %q", tc.request, s.xff, s.xfh, tc.wantHost)
		}
	}
	if n := app.hits.Load(); n != 4 {
		t.Errorf("app handled %d requests, want 4", n)
	}
}

func TestMalformedRequestsNeverReachTheApp(t *testing.T) {
	app := startApp(t, func(w http.ResponseWriter, r *http.Request) { io.Copy(io.Discard, r.Body) })
	_, addr := startInbound(t, inbound.Config{AppAddr: app.addr()})

	for _, tc := range []struct{ name, request string }{
		{"Content-Length and Transfer-Encoding", "POST / HTTP/1.1\r\nHost: orders\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"},
		{"conflicting Content-Length", "POST / HTTP/1.1\r\nHost: orders\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcd"},
		{"Transfer-Encoding in HTTP/1.0", "POST / HTTP/1.0\r\nHost: orders\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"},
		{"unknown Transfer-Encoding", "POST / HTTP/1.1\r\nHost: orders\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"},
		{"space before colon", "POST / HTTP/1.1\r\nHost: orders\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n"},
		{"bare LF in the first chunk line", "POST / HTTP/1.1\r\nHost: orders\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, body := roundTrip(t, addr, tc.request)
			if resp.StatusCode != http.StatusBadRequest || resp.Header.Get(forward.ErrorHeader) != forward.ReasonBadRequest {
				t.Fatalf("got %d %s=%q %q, want 400 bad_request", resp.StatusCode, forward.ErrorHeader,
					resp.Header.Get(forward.ErrorHeader), body)
			}
		})
	}
	if n := app.hits.Load(); n != 0 {
		t.Fatalf("the app was handed %d malformed requests, want 0", n)
	}
}

func TestConcurrencyLimit(t *testing.T) {
	arrived := make(chan struct{}, 16)
	release := make(chan struct{})
	app := startApp(t, func(w http.ResponseWriter, r *http.Request) {
		arrived <- struct{}{}
		<-release
	})
	p, addr := startInbound(t, inbound.Config{AppAddr: app.addr(), MaxInFlight: 3})

	codes := make(chan int, 3)
	for range 3 {
		go func() {
			resp, _, err := exchange(addr, "GET /slow HTTP/1.1\r\nHost: orders\r\n\r\n")
			if err != nil {
				codes <- -1
				return
			}
			codes <- resp.StatusCode
		}()
	}
	for range 3 {
		within(t, arrived, "request at the app")
	}
	if n := p.InFlight(); n != 3 {
		t.Fatalf("InFlight() = %d with 3 requests at the app, want 3", n)
	}
	for range 2 {
		resp, body := roundTrip(t, addr, "GET /more HTTP/1.1\r\nHost: orders\r\n\r\n")
		if resp.StatusCode != 503 || resp.Header.Get(forward.ErrorHeader) != forward.ReasonOverloaded {
			t.Fatalf("request over the limit: got %d %q, want 503 overloaded", resp.StatusCode, body)
		}
	}
	if n := app.hits.Load(); n != 3 {
		t.Fatalf("app handled %d requests, want 3 (the ones over the limit must not reach it)", n)
	}

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := p.Wait(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("Wait with 3 in flight and a canceled context = %v, want context.Canceled", err)
	}
	waited := make(chan error, 1)
	go func() { waited <- p.Wait(context.Background()) }()
	close(release)
	for range 3 {
		if code := within(t, codes, "answer"); code != 200 {
			t.Fatalf("request under the limit: got %d, want 200", code)
		}
	}
	if err := within(t, waited, "return from Wait"); err != nil {
		t.Fatalf("Wait = %v, want nil", err)
	}
	if n := p.InFlight(); n != 0 {
		t.Fatalf("InFlight() = %d after every answer, want 0", n)
	}
	if resp, _ := roundTrip(t, addr, "GET /after HTTP/1.1\r\nHost: orders\r\n\r\n"); resp.StatusCode != 200 {
		t.Fatalf("after the burst: got %d, want 200", resp.StatusCode)
	}
}

// closedAddr returns a loopback address nothing listens on.
func closedAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

func TestAppDown(t *testing.T) {
	_, addr := startInbound(t, inbound.Config{AppAddr: closedAddr(t), Service: "orders"})
	resp, body := roundTrip(t, addr, "GET /orders HTTP/1.1\r\nHost: orders\r\n\r\n")
	if resp.StatusCode != http.StatusBadGateway || resp.Header.Get(forward.ErrorHeader) != forward.ReasonConnectFailure {
		t.Fatalf("got %d %s=%q, want 502 %s", resp.StatusCode, forward.ErrorHeader,
			resp.Header.Get(forward.ErrorHeader), forward.ReasonConnectFailure)
	}
	var e forward.LocalError
	if err := json.Unmarshal([]byte(body), &e); err != nil || e.Reason != forward.ReasonConnectFailure || e.Service != "orders" {
		t.Fatalf("body %q (%v), want JSON naming %s and service orders", body, err, forward.ReasonConnectFailure)
	}
}

func TestConnectRefused(t *testing.T) {
	app := startApp(t, func(w http.ResponseWriter, r *http.Request) {})
	_, addr := startInbound(t, inbound.Config{AppAddr: app.addr()})
	resp, _ := roundTrip(t, addr, "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
	if resp.StatusCode != http.StatusForbidden || resp.Header.Get(forward.ErrorHeader) != forward.ReasonNotAllowed {
		t.Fatalf("CONNECT: got %d, want 403 %s", resp.StatusCode, forward.ReasonNotAllowed)
	}
	if n := app.hits.Load(); n != 0 {
		t.Fatalf("app handled %d requests, want 0", n)
	}
}

func TestUpgradeThroughObserver(t *testing.T) {
	// The app switches to a protocol that echoes what it is sent.
	app := startApp(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Connection", "Upgrade")
		w.Header().Set("Upgrade", r.Header.Get("Upgrade"))
		w.WriteHeader(http.StatusSwitchingProtocols)
		_ = http.NewResponseController(w).Flush()
		conn, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer conn.Close()
		_, _ = io.Copy(conn, brw)
	})
	obs := &recordingObserver{}
	_, addr := startInbound(t, inbound.Config{AppAddr: app.addr(), Observer: obs})
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(c)
	io.WriteString(c, "GET /ws HTTP/1.1\r\nHost: orders\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\nping\n")
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade: %v %v, want 101", resp, err)
	}
	if echo, err := br.ReadString('\n'); err != nil || echo != "ping\n" {
		t.Fatalf("after the upgrade: read %q, %v, want the echo of ping", echo, err)
	}
	c.Close()
	if res := obs.waitEnds(t, 1)[0].res; res.Status != http.StatusSwitchingProtocols {
		t.Fatalf("Observer.End status %d, want 101", res.Status)
	}
}

// recordingObserver records what an Observer is told and adds a header
// on Start, as a tracing layer injecting trace context would.
type recordingObserver struct {
	mu     sync.Mutex // guards starts and ends
	starts int
	ends   []observed
	ended  chan struct{}
}

type observed struct {
	method string
	marked bool // End got the request Start returned
	res    inbound.Result
}

type markKey struct{}

// observerTraceparent is the trace context recordingObserver adds.
const observerTraceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

func (o *recordingObserver) Start(r *http.Request) *http.Request {
	o.mu.Lock()
	o.starts++
	o.mu.Unlock()
	r.Header.Set("Traceparent", observerTraceparent)
	return r.WithContext(context.WithValue(r.Context(), markKey{}, true))
}

func (o *recordingObserver) End(r *http.Request, res inbound.Result) {
	o.mu.Lock()
	o.ends = append(o.ends, observed{r.Method, r.Context().Value(markKey{}) == true, res})
	ch := o.ended
	o.mu.Unlock()
	if ch != nil {
		ch <- struct{}{}
	}
}

// waitEnds waits until n requests have ended (End runs after the answer
// is sent, so a client may see it first).
func (o *recordingObserver) waitEnds(t *testing.T, n int) []observed {
	t.Helper()
	for {
		o.mu.Lock()
		if len(o.ends) >= n {
			ends := append([]observed(nil), o.ends...)
			o.mu.Unlock()
			return ends
		}
		if o.ended == nil {
			o.ended = make(chan struct{}, 64)
		}
		ch := o.ended
		o.mu.Unlock()
		within(t, ch, "Observer.End")
	}
}

func TestObserver(t *testing.T) {
	traceparents := make(chan string, 4)
	app := startApp(t, func(w http.ResponseWriter, r *http.Request) {
		traceparents <- r.Header.Get("Traceparent")
		w.WriteHeader(http.StatusCreated)
	})
	obs := &recordingObserver{}
	_, addr := startInbound(t, inbound.Config{AppAddr: app.addr(), Observer: obs})
	obsDown := &recordingObserver{}
	_, downAddr := startInbound(t, inbound.Config{AppAddr: closedAddr(t), Observer: obsDown})

	roundTrip(t, addr, "PUT /a HTTP/1.1\r\nHost: orders\r\nContent-Length: 2\r\n\r\nhi")
	roundTrip(t, addr, "POST / HTTP/1.1\r\nHost: orders\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
	roundTrip(t, downAddr, "GET /b HTTP/1.1\r\nHost: orders\r\n\r\n")

	if traceparent := <-traceparents; !strings.HasPrefix(traceparent, "00-0af7651916cd43dd8448eb211c80319c-") {
		t.Errorf("app saw Traceparent %q, want the one Observer.Start set", traceparent)
	}
	ends := obs.waitEnds(t, 2)
	want := []struct {
		status int
		reason string
	}{{http.StatusCreated, ""}, {http.StatusBadRequest, forward.ReasonBadRequest}}
	for i, w := range want {
		e := ends[i]
		if e.res.Status != w.status || e.res.Reason != w.reason || !e.marked || e.res.Duration <= 0 {
			t.Errorf("End #%d: %+v (request from Start: %v), want status %d reason %q and a duration", i, e.res, e.marked, w.status, w.reason)
		}
	}
	down := obsDown.waitEnds(t, 1)
	if r := down[0].res; r.Status != http.StatusBadGateway || r.Reason != forward.ReasonConnectFailure || down[0].method != "GET" {
		t.Errorf("End with the app down: %s %+v, want GET 502 %s", down[0].method, r, forward.ReasonConnectFailure)
	}
	obs.mu.Lock()
	defer obs.mu.Unlock()
	if obs.starts != 2 || len(obs.ends) != 2 {
		t.Errorf("Start called %d times, End %d, want 2 and 2", obs.starts, len(obs.ends))
	}
}

func TestNewValidates(t *testing.T) {
	for _, cfg := range []inbound.Config{
		{},
		{AppAddr: "8080"},
		{AppAddr: "127.0.0.1:8080", MaxInFlight: -1},
	} {
		if p, err := inbound.New(cfg); err == nil {
			p.Close()
			t.Errorf("New(%+v) = nil error, want one", cfg)
		}
	}
}
