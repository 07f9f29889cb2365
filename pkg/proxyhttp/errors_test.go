package proxyhttp

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// A local 400 on an HTTP/2 stream ends that stream only: the connection
// carries the next request, with no GOAWAY in between.
func TestHTTP2ErrorKeepsTheConnection(t *testing.T) {
	srv := startFastLimits(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/bad" {
			WriteError(w, r, &LocalError{Status: http.StatusBadRequest, Reason: ReasonBadRequest, Detail: "test"})
			return
		}
		io.WriteString(w, "ok")
	}), Limits{})
	var dials atomic.Int32
	tr := &http2.Transport{AllowHTTP: true, DialTLSContext: func(ctx context.Context, network, addr string, _ *tls.Config) (net.Conn, error) {
		dials.Add(1)
		return (&net.Dialer{}).DialContext(ctx, network, addr)
	}}
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	for _, step := range []struct {
		path   string
		status int
	}{{"/bad", 400}, {"/ok", 200}, {"/bad", 400}, {"/ok", 200}} {
		resp, err := c.Get("http://" + srv.Addr().String() + step.path)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != step.status || resp.Header.Get("Connection") != "" {
			t.Fatalf("%s: %d with Connection %q, want %d and none", step.path, resp.StatusCode, resp.Header.Get("Connection"), step.status)
		}
	}
	if n := dials.Load(); n != 1 {
		t.Fatalf("%d connections for 4 requests, want 1: a 400 sent a GOAWAY", n)
	}
}

// An HTTP/2 client that resets its stream mid-body is gone, not a bad
// request: its handler does not answer 400 into the void.
func TestHTTP2StreamResetIsClientGone(t *testing.T) {
	got := make(chan error, 1)
	srv := startFastLimits(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b := NewBodyReader(w, r, 5*time.Second)
		_, err := io.Copy(io.Discard, b)
		got <- err
	}), Limits{})
	tr := &http2.Transport{AllowHTTP: true, DialTLSContext: func(ctx context.Context, network, addr string, _ *tls.Config) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, network, addr)
	}}
	defer tr.CloseIdleConnections()
	pr, pw := io.Pipe()
	defer pw.Close()
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+srv.Addr().String()+"/", pr)
	done := make(chan struct{})
	go func() {
		defer close(done)
		if resp, err := tr.RoundTrip(req); err == nil {
			resp.Body.Close()
		}
	}()
	io.WriteString(pw, "the first part of the body")
	cancel() // RST_STREAM(CANCEL)
	<-done
	select {
	case err := <-got:
		var ce *ClientError
		if !errors.As(err, &ce) || !ce.Gone() || ce.Timeout() {
			t.Fatalf("body error %v; want a ClientError that says the client is gone", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the handler's body read did not end")
	}
}
