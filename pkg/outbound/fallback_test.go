package outbound_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"testing"
	"time"

	"golang.org/x/net/http2"

	"github.com/sidecar-mesh/sidecar/internal/toolbin"
)

// pythonHTTPServer starts `python3 -m http.server` on loopback, serving a
// directory with one file, and returns its address. It answers HTTP/2's
// preface with a bare HTML 505 page and no status line, as the
// development servers of Flask and Django do.
func pythonHTTPServer(t *testing.T) string {
	t.Helper()
	python := toolbin.Path(t, "python3")
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "hello.txt"), []byte("hello from python"), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(python, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", dir)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	port := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(out)
		re := regexp.MustCompile(`port (\d+)`)
		for sc.Scan() {
			if m := re.FindStringSubmatch(sc.Text()); m != nil {
				port <- m[1]
				break
			}
		}
		_, _ = io.Copy(io.Discard, out)
	}()
	select {
	case p := <-port:
		return net.JoinHostPort("127.0.0.1", p)
	case <-time.After(20 * time.Second):
		t.Fatal("python3 -m http.server did not say its port")
		return ""
	}
}

// An HTTP/2 client calls a service whose endpoint is Python's http.server,
// which answers the HTTP/2 preface with a bare HTML page: the request goes
// over HTTP/1.1 instead (it never reached the server), every time.
func TestH2FallbackToPythonHTTPServer(t *testing.T) {
	addr := pythonHTTPServer(t)
	sc := startSidecar(t, options{static: map[string][]string{"py": {addr}}})
	tr := &http2.Transport{AllowHTTP: true, DialTLSContext: func(ctx context.Context, network, _ string, _ *tls.Config) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, sc.addr)
	}}
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	for i := range 3 {
		resp, err := c.Get("http://py/hello.txt")
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(body) != "hello from python" {
			t.Fatalf("request %d: got %d %q (x-sidecar-error %q), want 200 from python", i, resp.StatusCode, body, resp.Header.Get("X-Sidecar-Error"))
		}
	}
}
