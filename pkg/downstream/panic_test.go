package downstream

import (
	"bufio"
	"context"
	"crypto/tls"
	"io"
	"log/slog"
	"net"
	"net/http"
	"testing"
	"time"

	"golang.org/x/net/http2"

	"github.com/sidecar-mesh/sidecar/pkg/panics"
)

// A handler that panics aborts its own request only, on the fast path, on
// net/http's HTTP/1 path and on HTTP/2; the listener serves on, and each
// panic is counted under the listener's name.
func TestPanicAbortsOneRequest(t *testing.T) {
	addr := startFast(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/boom" {
			var m map[string]int
			m["x"]++
		}
		_, _ = io.WriteString(w, "ok")
	}))
	panics.SetLogger(slog.New(slog.DiscardHandler))
	defer panics.SetLogger(nil)
	before := panicCount("test.request")
	for _, raw := range []string{
		"GET /boom HTTP/1.1\r\nHost: a\r\n\r\n",                      // fast path
		"GET /boom HTTP/1.0\r\nHost: a\r\n\r\n",                      // net/http
		"GET /boom HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", // fast path, closing
	} {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		_, _ = io.WriteString(c, raw)
		if resp, err := http.ReadResponse(bufio.NewReader(c), nil); err == nil {
			t.Errorf("%q: got %d, want the connection closed without an answer", raw, resp.StatusCode)
		}
		c.Close()
	}
	tr := &http2.Transport{AllowHTTP: true,
		DialTLSContext: func(ctx context.Context, network, addr string, _ *tls.Config) (net.Conn, error) {
			return net.Dial(network, addr)
		}}
	defer tr.CloseIdleConnections()
	h2 := &http.Client{Transport: tr}
	if _, err := h2.Get("http://" + addr + "/boom"); err == nil {
		t.Error("HTTP/2: the panicking request got an answer, want its stream reset")
	}
	resp, err := h2.Get("http://" + addr + "/")
	if err != nil {
		t.Fatalf("HTTP/2 after a panic on the same connection: %v", err)
	}
	resp.Body.Close()
	if got := panicCount("test.request") - before; got != 4 {
		t.Errorf("%d panics counted under test.request, want 4", got)
	}
}

func panicCount(where string) uint64 {
	for _, c := range panics.Counts() {
		if c.Where == where {
			return c.N
		}
	}
	return 0
}
