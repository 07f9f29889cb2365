package kubetest

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestServerValidatesStrictlyAndStops(t *testing.T) {
	s := Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	// The version is the one scripts/tools.sh builds.
	resp, err := s.Do(ctx, http.MethodGet, "/version", nil)
	if err != nil || resp.Status != http.StatusOK {
		t.Fatalf("GET /version: %v %+v, want 200", err, resp)
	}
	var v struct{ GitVersion string }
	if err := json.Unmarshal(resp.Body, &v); err != nil || v.GitVersion != Version {
		t.Fatalf("GET /version: gitVersion %q (%v), want %s", v.GitVersion, err, Version)
	}

	// A namespace is stored; a dry-run ConfigMap in it is not.
	if _, err := s.Create(ctx, []byte(`{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"kt"}}`), CreateOptions{}); err != nil {
		t.Fatalf("creating namespace kt: %v", err)
	}
	// Namespace leaves one that exists alone, and gives it its default
	// service account.
	if err := s.Namespace(ctx, "kt", nil); err != nil {
		t.Fatalf("Namespace kt, which exists: %v, want nil", err)
	}
	if resp, err := s.Do(ctx, http.MethodGet, "/api/v1/namespaces/kt/serviceaccounts/default", nil); err != nil || resp.Status != http.StatusOK {
		t.Fatalf("GET kt's default service account after Namespace: %v %+v, want 200", err, resp)
	}
	cm := `{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c","namespace":"kt"},"data":{"a":"b"}}`
	if _, err := s.Create(ctx, []byte(cm), CreateOptions{DryRun: true}); err != nil {
		t.Fatalf("dry-run ConfigMap: %v", err)
	}
	if resp, err := s.Do(ctx, http.MethodGet, "/api/v1/namespaces/kt/configmaps/c", nil); err != nil || resp.Status != http.StatusNotFound {
		t.Fatalf("GET the dry-run ConfigMap: %v %+v, want 404 (dry run stores nothing)", err, resp)
	}

	// Strict field validation: an unknown field is an error naming it.
	bad := `{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c","namespace":"kt"},"dta":{"a":"b"}}`
	_, err = s.Create(ctx, []byte(bad), CreateOptions{DryRun: true})
	var apiErr *APIError
	if !errors.As(err, &apiErr) || apiErr.Status != http.StatusBadRequest || !strings.Contains(apiErr.Message, `unknown field "dta"`) {
		t.Fatalf("dry-run ConfigMap with field dta: got %v, want a 400 naming unknown field \"dta\"", err)
	}

	// Objects flattens Lists and skips empty documents.
	objs, err := Objects([]byte("---\n# only a comment\n---\napiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: ConfigMap, metadata: {name: a}}\n- {apiVersion: v1, kind: ConfigMap, metadata: {name: b}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n"))
	if err != nil || len(objs) != 3 {
		t.Fatalf("Objects: got %d objects (%v), want 3", len(objs), err)
	}

	// Stopped: the API is gone; a second Stop does nothing.
	s.Stop()
	s.Stop()
	if _, err := s.Do(ctx, http.MethodGet, "/version", nil); err == nil {
		t.Fatal("GET /version after Stop: got an answer, want a connection error")
	}
}

// TestWriteCert: the files hold a matching pair, the newest, and nothing is
// left beside them.
func TestWriteCert(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	first := WriteCert(t, certFile, keyFile)
	second := WriteCert(t, certFile, keyFile)
	if _, err := tls.LoadX509KeyPair(certFile, keyFile); err != nil {
		t.Fatalf("loading the written pair: %v", err)
	}
	got, _ := os.ReadFile(certFile)
	if !bytes.Equal(got, second) || bytes.Equal(first, second) {
		t.Errorf("after two writes the certificate file holds the first certificate or they are equal; want the second, a new one")
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 2 {
		t.Errorf("%d files in the directory, want 2 (tls.crt, tls.key)", len(entries))
	}
}
