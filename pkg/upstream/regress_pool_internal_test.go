package upstream

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// Idle connections are only checked when popped; the pool is LIFO, so after
// a burst the older ones are never popped and stay open (CLOSE_WAIT once the
// server times them out) for the life of the process.
func TestIdleConnectionsReaped(t *testing.T) {
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(20 * time.Millisecond)
		io.WriteString(w, "ok")
	}))
	srv.Config.IdleTimeout = 100 * time.Millisecond
	srv.Start()
	defer srv.Close()
	tr := NewTransport(TransportConfig{IdleConnTimeout: 300 * time.Millisecond})
	defer tr.Close()
	get := func() {
		req, _ := http.NewRequest("GET", srv.URL, nil)
		resp, err := tr.RoundTrip(req)
		if err != nil {
			t.Error(err)
			return
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	var wg sync.WaitGroup
	for range 40 {
		wg.Add(1)
		go func() { defer wg.Done(); get() }()
	}
	wg.Wait()
	// steady light traffic afterwards: one request every 30ms for 1.5s
	for range 50 {
		get()
		time.Sleep(30 * time.Millisecond)
	}
	p := tr.pool(strings.TrimPrefix(srv.URL, "http://"))
	p.mu.Lock()
	n := len(p.idle)
	p.mu.Unlock()
	t.Logf("idle conns still pooled (all closed by the server): %d", n)
	if n > 1 {
		t.Errorf("stale idle connections are never reaped")
	}
}

// Send's connect timeout replaces the DialTimeout for a new connection.
func TestConnectTimeoutOfSend(t *testing.T) {
	var budgets []time.Duration
	tr := NewTransport(TransportConfig{DialTimeout: 5 * time.Second,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			dl, _ := ctx.Deadline()
			budgets = append(budgets, time.Until(dl))
			return nil, errors.New("no network here")
		}})
	defer tr.Close()
	for _, timeout := range []time.Duration{0, 50 * time.Millisecond} {
		req, _ := http.NewRequest("GET", "http://10.0.0.1:80/", nil)
		var ce *ConnectError
		if _, err := tr.Send(req, timeout); !errors.As(err, &ce) {
			t.Fatalf("RoundTrip: %v, want a *ConnectError", err)
		}
	}
	if len(budgets) != 2 || budgets[0] <= time.Second || budgets[1] > 50*time.Millisecond {
		t.Fatalf("dial deadlines %v from now, want about 5s then at most 50ms", budgets)
	}
}

// An endpoint that closes a connection at the HTTP/2 preface without a
// word (an instance restarting) is not taken to speak HTTP/1.1 only: the
// next HTTP/2 request to it, served, goes over HTTP/2.
func TestSilentCloseAtPrefaceIsNoHTTP1Mark(t *testing.T) {
	var p http.Protocols
	p.SetUnencryptedHTTP2(true) // HTTP/2 only: HTTP/1.1 is refused
	srv := &http.Server{Protocols: &p, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, r.Proto)
	})}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	first := make(chan struct{})
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		c.Close() // the first connection: closed without a word
		close(first)
		srv.Serve(ln)
	}()
	defer srv.Close()
	tr := NewTransport(TransportConfig{})
	defer tr.Close()
	send := func() (string, error) {
		req, _ := http.NewRequest("GET", "http://"+ln.Addr().String()+"/", nil)
		req.Proto, req.ProtoMajor, req.ProtoMinor = "HTTP/2.0", 2, 0
		resp, err := tr.Send(req, time.Second)
		if err != nil {
			return "", err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return string(b), nil
	}
	if _, err := send(); err == nil {
		t.Fatal("the first request was answered, want the connect failure of the closed connection")
	}
	<-first
	if got, err := send(); err != nil || got != "HTTP/2.0" {
		t.Fatalf("the next request: %q %v, want it served over HTTP/2", got, err)
	}
}
