package webhook

import (
	"bytes"
	"cmp"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/sidecar-mesh/sidecar/internal/kubetest"
	"github.com/sidecar-mesh/sidecar/internal/logtest"
	"github.com/sidecar-mesh/sidecar/pkg/inject"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// runningWebhook is a Server serving until the test ends.
type runningWebhook struct {
	addr   string
	srv    *Server
	logs   *logtest.Buffer
	cancel context.CancelFunc
	done   chan error
}

// startWebhook serves a Server of cfg, listening on a loopback port unless
// cfg.Addr says otherwise, logging JSON at info level (as `sidecar webhook`
// does by default), until the test ends.
func startWebhook(t *testing.T, cfg Config) *runningWebhook {
	t.Helper()
	w := &runningWebhook{logs: &logtest.Buffer{}, done: make(chan error, 1)}
	cfg.Addr = cmp.Or(cfg.Addr, "127.0.0.1:0")
	cfg.Logger = slog.New(slog.NewJSONHandler(w.logs, nil))
	srv, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v\n%s", err, w.logs)
	}
	w.addr, w.srv = srv.Addr().String(), srv
	ctx, cancel := context.WithCancel(context.Background())
	w.cancel = cancel
	go func() { w.done <- srv.Run(ctx) }()
	t.Cleanup(func() { w.stop(t) })
	return w
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
			t.Errorf("webhook: Run returned %v", err)
		}
	case <-time.After(15 * time.Second):
		t.Errorf("webhook: Run did not return within 15s of its context ending")
	}
}

// injector injects image.
func injector(t *testing.T, image string) *inject.Injector {
	t.Helper()
	in, err := inject.New(inject.Config{Image: image})
	if err != nil {
		t.Fatal(err)
	}
	return in
}

func serialOf(t *testing.T, certPEM []byte) string {
	t.Helper()
	b, _ := pem.Decode(certPEM)
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c.SerialNumber.String()
}

// servedSerial dials the webhook and returns the serial of the certificate
// it presents.
func servedSerial(t *testing.T, addr string) string {
	t.Helper()
	conn, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatalf("TLS dial %s: %v", addr, err)
	}
	defer conn.Close()
	return conn.ConnectionState().PeerCertificates[0].SerialNumber.String()
}

func clientFor(certPEM []byte) *http.Client {
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(certPEM)
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: pool}, DisableKeepAlives: true}}
}

func TestWebhookServesAndReloadsCertificate(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	first := kubetest.WriteCert(t, certFile, keyFile)
	w := startWebhook(t, Config{CertFile: certFile, KeyFile: keyFile, Injector: injector(t, "sidecar:hook")})
	client := clientFor(first)
	base := "https://" + w.addr

	resp, err := client.Get(base + "/healthz")
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /healthz: %v %v, want 200", err, resp)
	}
	resp.Body.Close()

	// An AdmissionReview for a pod: a JSON Patch that adds the sidecar.
	pod := `{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p","namespace":"ns"},"spec":{"containers":[{"name":"app","image":"a","ports":[{"containerPort":8080}]}]}}`
	review := podReview(pod)
	resp, err = client.Post(base+"/inject", "application/json", strings.NewReader(review))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	var out struct {
		APIVersion string `json:"apiVersion"`
		Response   struct {
			UID       string `json:"uid"`
			Allowed   bool   `json:"allowed"`
			PatchType string `json:"patchType"`
			Patch     []byte `json:"patch"`
		} `json:"response"`
	}
	if err := json.Unmarshal(body, &out); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("POST /inject: %d %s (%v)", resp.StatusCode, body, err)
	}
	if out.APIVersion != "admission.k8s.io/v1" || out.Response.UID != "u-1" || !out.Response.Allowed || out.Response.PatchType != "JSONPatch" ||
		!bytes.Contains(out.Response.Patch, []byte(`{"op":"add","path":"/spec/initContainers","value":[{"name":"sidecar","image":"sidecar:hook"`)) {
		t.Fatalf("POST /inject: got %s\npatch %s\nwant an allowed response for u-1 whose JSON Patch adds the sidecar", body, out.Response.Patch)
	}
	if l := w.logs.Lines("admission"); len(l) != 1 || l[0]["injected"] != true || l[0]["pod"] != "p" {
		t.Errorf("admission log lines: got %v, want one saying pod p was injected", l)
	}

	// Wrong content type, oversized body, bad review.
	for _, tc := range []struct {
		name, ctype string
		body        io.Reader
		want        int
	}{
		{"text body", "text/plain", strings.NewReader(review), http.StatusUnsupportedMediaType},
		{"5 MiB body", "application/json", io.LimitReader(zeros{}, 5<<20), http.StatusRequestEntityTooLarge},
		{"not a review", "application/json", strings.NewReader(`{"kind":"Pod"}`), http.StatusBadRequest},
	} {
		resp, err := client.Post(base+"/inject", tc.ctype, tc.body)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		resp.Body.Close()
		if resp.StatusCode != tc.want {
			t.Errorf("%s: POST /inject answered %d, want %d", tc.name, resp.StatusCode, tc.want)
		}
	}

	// A new certificate in the files is served without a restart.
	if got, want := servedSerial(t, w.addr), serialOf(t, first); got != want {
		t.Fatalf("serving serial %s, want %s (the first certificate)", got, want)
	}
	second := kubetest.WriteCert(t, certFile, keyFile)
	if got, want := servedSerial(t, w.addr), serialOf(t, second); got != want {
		t.Fatalf("after rewriting the files: serving serial %s, want %s (the new certificate)", got, want)
	}
	// A broken pair is not loaded: the last good certificate stays.
	if err := os.WriteFile(keyFile, []byte("not a key"), 0o600); err != nil {
		t.Fatal(err)
	}
	if got, want := servedSerial(t, w.addr), serialOf(t, second); got != want {
		t.Fatalf("after a broken key: serving serial %s, want %s (the last good certificate)", got, want)
	}
	if n := len(w.logs.Lines("TLS certificate reloaded")); n != 1 {
		t.Errorf("%d \"TLS certificate reloaded\" log lines, want 1", n)
	}
	if !strings.Contains(w.logs.String(), "serving the previous one") {
		t.Errorf("no warning logged about the broken key pair:\n%s", w.logs)
	}
	w.stop(t)
	if n := len(w.logs.Lines("webhook stopped")); n != 1 {
		t.Errorf("%d \"webhook stopped\" log lines, want 1", n)
	}
}

// podReview is the AdmissionReview the API server sends for the creation
// of pod (JSON) in namespace ns, with uid u-1.
func podReview(pod string) string {
	return fmt.Sprintf(`{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u-1","kind":{"group":"","version":"v1","kind":"Pod"},"resource":{"group":"","version":"v1","resource":"pods"},"namespace":"ns","operation":"CREATE","userInfo":{},"object":%s}}`, pod)
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}
