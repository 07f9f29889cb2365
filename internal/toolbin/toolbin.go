// Package toolbin finds the real tools integration tests run (h2spec,
// Consul, kube-apiserver and the like) where scripts/tools.sh installs
// them.
package toolbin

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// Path returns the binary of tool name: $SIDECAR_<NAME>_BIN when set (and
// then only that), else name on PATH, else the scripts/tools.sh cache
// ($SIDECAR_TOOLS_CACHE or ${XDG_CACHE_HOME:-$HOME/.cache}/sidecar-tools,
// then bin/NAME). Without one the test fails when $CI is set (a missing
// tool in CI is a failure) and is skipped otherwise, naming the command
// that installs it.
func Path(t testing.TB, name string) string {
	t.Helper()
	bin, err := Find(name)
	if err == nil {
		return bin
	}
	Missing(t, name, err, "run scripts/tools.sh test, or set "+envName(name))
	return ""
}

// Dir returns the directory scripts/tools.sh installs a set of packages
// into (the cache's NAME, e.g. "node-clients"), failing in CI and skipping
// elsewhere when it is missing, as Path does.
func Dir(t testing.TB, name string) string {
	t.Helper()
	root, err := cacheRoot()
	dir := filepath.Join(root, name)
	if err == nil {
		var info os.FileInfo
		if info, err = os.Stat(dir); err == nil && !info.IsDir() {
			err = fmt.Errorf("%s is not a directory", dir)
		}
	}
	if err == nil {
		return dir
	}
	Missing(t, name, err, "run scripts/tools.sh test")
	return ""
}

// Missing ends a test that lacks what, a tool found some other way than
// Path and Dir: it fails when $CI is set (a missing tool in CI is a
// failure) and skips otherwise, saying why (err) and how to install it
// (hint).
func Missing(t testing.TB, what string, err error, hint string) {
	t.Helper()
	if os.Getenv("CI") != "" {
		t.Fatalf("toolbin: no %s (CI is set, so this fails instead of skipping): %v; %s", what, err, hint)
	}
	t.Skipf("toolbin: no %s: %v; %s", what, err, hint)
}

func envName(name string) string {
	return "SIDECAR_" + strings.ToUpper(strings.ReplaceAll(name, "-", "_")) + "_BIN"
}

// Find returns the binary of tool name as Path does, or an error that says
// where it looked.
func Find(name string) (string, error) {
	env := envName(name)
	if bin := os.Getenv(env); bin != "" {
		if err := Executable(bin); err != nil {
			return "", fmt.Errorf("%s=%s: %w", env, bin, err)
		}
		return bin, nil
	}
	if bin, err := exec.LookPath(name); err == nil {
		return bin, nil
	}
	bin, err := Cached(name)
	if err != nil {
		return "", fmt.Errorf("%s is not on PATH and the tools cache is unknown: %w", name, err)
	}
	if err := Executable(bin); err != nil {
		return "", fmt.Errorf("%s is not on PATH nor in the tools cache: %w", name, err)
	}
	return bin, nil
}

// Cached is where scripts/tools.sh links tool name, whether or not it is
// there: bin/NAME in the cache.
func Cached(name string) (string, error) {
	root, err := cacheRoot()
	if err != nil {
		return "", err
	}
	return filepath.Join(root, "bin", name), nil
}

// cacheRoot is where scripts/tools.sh keeps what it installs: the same
// lookup as TOOLS_CACHE there ($SIDECAR_TOOLS_CACHE, else
// ${XDG_CACHE_HOME:-$HOME/.cache}/sidecar-tools; not os.UserCacheDir,
// which differs on macOS).
func cacheRoot() (string, error) {
	if root := os.Getenv("SIDECAR_TOOLS_CACHE"); root != "" {
		return root, nil
	}
	cache := os.Getenv("XDG_CACHE_HOME")
	if cache == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return "", err
		}
		cache = filepath.Join(home, ".cache")
	}
	return filepath.Join(cache, "sidecar-tools"), nil
}

// Executable says why path is not an executable file, or nil.
func Executable(path string) error {
	info, err := os.Stat(path)
	if err != nil {
		return err
	}
	if info.IsDir() || info.Mode().Perm()&0o111 == 0 {
		return fmt.Errorf("%s is not an executable file (mode %s)", path, info.Mode())
	}
	return nil
}
