package forward_test

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/forward"
	"golang.org/x/net/http2"
)

// A local 400 on an HTTP/2 stream ends that stream only: the connection
// carries the next request, with no GOAWAY in between.
func TestHTTP2ErrorKeepsTheConnection(t *testing.T) {
	srv := serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/bad" {
			forward.WriteError(w, r, forward.Refuse(forward.ReasonBadRequest, "", "test"))
			return
		}
		io.WriteString(w, "ok")
	}))
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
