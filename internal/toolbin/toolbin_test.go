package toolbin

import (
	"errors"
	"io/fs"
	"strings"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestFindNamedOnly(t *testing.T) {
	t.Setenv("SIDECAR_CONSUL_BIN", "/nonexistent/consul")
	bin, err := Find("consul")
	if err == nil {
		t.Fatalf("Find(consul) with SIDECAR_CONSUL_BIN=/nonexistent/consul: got %q, want an error (no fallback to PATH or the cache)", bin)
	}
	if !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), "SIDECAR_CONSUL_BIN=/nonexistent/consul") {
		t.Fatalf("Find(consul) with SIDECAR_CONSUL_BIN=/nonexistent/consul: got error %q, want a not-exist error naming the variable", err)
	}
}

func TestCached(t *testing.T) {
	t.Setenv("SIDECAR_TOOLS_CACHE", "")
	t.Setenv("XDG_CACHE_HOME", "/xdg")
	if got, err := Cached("consul"); err != nil || got != "/xdg/sidecar-tools/bin/consul" {
		t.Fatalf("Cached(consul) with XDG_CACHE_HOME=/xdg: got %q, %v; want /xdg/sidecar-tools/bin/consul", got, err)
	}
	t.Setenv("SIDECAR_TOOLS_CACHE", "/tools")
	if got, err := Cached("consul"); err != nil || got != "/tools/bin/consul" {
		t.Fatalf("Cached(consul) with SIDECAR_TOOLS_CACHE=/tools: got %q, %v; want /tools/bin/consul", got, err)
	}
}
