//go:build !noinjector

package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sidecar-mesh/sidecar/internal/kubetest"
	"github.com/sidecar-mesh/sidecar/internal/logtest"
)

// runningWebhook is `sidecar webhook` started in-process.
type runningWebhook struct {
	addr   string
	logs   *logtest.Buffer
	cancel context.CancelFunc
	done   chan error
}

// startWebhook runs `sidecar webhook ARGS` until the test ends and waits
// until it serves.
func startWebhook(t *testing.T, getenv func(string) string, args ...string) *runningWebhook {
	t.Helper()
	w := &runningWebhook{logs: &logtest.Buffer{}, done: make(chan error, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	w.cancel = cancel
	cmd := newRootCommand(strings.NewReader(""), io.Discard, w.logs, getenv)
	cmd.SetArgs(append([]string{"webhook", "--addr=127.0.0.1:0"}, args...))
	go func() { w.done <- cmd.ExecuteContext(ctx) }()
	t.Cleanup(func() { w.stop(t) })
	deadline := time.Now().Add(10 * time.Second)
	for {
		if l := w.logs.Lines("webhook serving"); len(l) > 0 {
			w.addr = l[0]["addr"].(string)
			return w
		}
		select {
		case err := <-w.done:
			w.done <- err
			t.Fatalf("sidecar webhook exited at start: %v\n%s", err, w.logs)
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("sidecar webhook not serving within 10s:\n%s", w.logs)
		}
	}
}

func (w *runningWebhook) stop(t *testing.T) {
	t.Helper()
	if w.cancel == nil {
		return
	}
	w.cancel()
	w.cancel = nil
	select {
	case err := <-w.done:
		if err != nil {
			t.Errorf("sidecar webhook: exit error %v", err)
		}
	case <-time.After(15 * time.Second):
		t.Errorf("sidecar webhook did not stop within 15s of its context ending")
	}
}

// TestWebhookCommand: `sidecar webhook` serves over TLS with the pair its
// flags name, and says where it serves, with what image and version, and
// that it stopped.
func TestWebhookCommand(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	cert := kubetest.WriteCert(t, certFile, keyFile)
	w := startWebhook(t, func(string) string { return "" }, "--tls-cert-file="+certFile, "--tls-key-file="+keyFile, "--image=sidecar:hook")
	if l := w.logs.Lines("webhook serving")[0]; l["component"] != "webhook" || l["image"] != "sidecar:hook" || l["version"] != version {
		t.Errorf("log line %v: want component webhook, image sidecar:hook, version %s", l, version)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(cert)
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: pool}, DisableKeepAlives: true}}
	resp, err := client.Get("https://" + w.addr + "/healthz")
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /healthz: %v %v, want 200", err, resp)
	}
	resp.Body.Close()
	w.stop(t)
	if l := w.logs.Lines("webhook stopped"); len(l) != 1 || l[0]["component"] != "webhook" {
		t.Errorf("\"webhook stopped\" log lines %v, want one of component webhook", l)
	}
}

func TestWebhookCommandErrors(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	kubetest.WriteCert(t, certFile, keyFile)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"webhook"}, "--tls-cert-file and --tls-key-file are required"},
		{[]string{"webhook", "--tls-cert-file=" + certFile, "--tls-key-file=" + keyFile, "--addr=nope"}, `--addr "nope": want host:port`},
		{[]string{"webhook", "--tls-cert-file=" + certFile, "--tls-key-file=" + dir + "/missing.key", "--addr=127.0.0.1:0"}, "TLS key"},
		{[]string{"webhook", "--tls-cert-file=" + certFile, "--tls-key-file=" + keyFile, "--addr=127.0.0.1:0", "--ca-bundle-file=" + certFile}, "not running in a cluster"},
		{[]string{"webhook", "--tls-cert-file=" + certFile, "--tls-key-file=" + keyFile, "--memory-request=1Gi"}, "memory request 1Gi is above its limit 256Mi"},
	} {
		_, _, err := injectCLI(t, "", tc.args...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("sidecar %s: got %v, want an error containing %q", strings.Join(tc.args, " "), err, tc.want)
		}
	}
}
