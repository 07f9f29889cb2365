package readlimit

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestReadAll(t *testing.T) {
	data, err := ReadAll(strings.NewReader("service: a\n"), "stdin")
	if err != nil || string(data) != "service: a\n" {
		t.Fatalf("ReadAll = %q, %v", data, err)
	}
	const limit = 3 << 20
	exact := bytes.Repeat([]byte{'a'}, limit)
	if data, err := readAtMost(bytes.NewReader(exact), "stdin", limit, -1); err != nil || len(data) != limit {
		t.Fatalf("reading exactly the limit: %d bytes, %v", len(data), err)
	}
	_, err = readAtMost(bytes.NewReader(append(exact, 'a')), "stdin", limit, -1)
	var tl *TooLargeError
	if !errors.As(err, &tl) || tl.Name != "stdin" || tl.Limit != limit || !IsTooLarge(err) ||
		err.Error() != "stdin is larger than 3 MiB, the most sidecar reads of a file or standard input" {
		t.Fatalf("reading one byte past the limit: %v, want a TooLargeError naming stdin and 3 MiB", err)
	}
	// A file that grew past the limit after its size was taken.
	if _, err := readAtMost(strings.NewReader("abcd"), "p.yaml", 3, 2); !IsTooLarge(err) {
		t.Fatalf("reading a file grown past the limit: %v, want the cap", err)
	}
	if data, err := readAtMost(strings.NewReader("abc"), "p.yaml", 3, 2); err != nil || string(data) != "abc" {
		t.Fatalf("reading a file grown within the limit: %q, %v", data, err)
	}
}

func TestReadFile(t *testing.T) {
	// /dev/zero never ends: read up to the cap, then refused.
	if _, err := ReadFile("/dev/zero"); !IsTooLarge(err) || !strings.Contains(err.Error(), "/dev/zero is larger than 64 MiB") {
		t.Fatalf("ReadFile(/dev/zero) = %v, want the cap", err)
	}
	// A sparse regular file past the cap is refused from its size.
	big := filepath.Join(t.TempDir(), "big.yaml")
	if err := os.WriteFile(big, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(big, 1<<40); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadFile(big); !IsTooLarge(err) {
		t.Fatalf("ReadFile of a 1 TiB file = %v, want the cap", err)
	}
	if _, err := ReadFile(filepath.Join(t.TempDir(), "missing")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("ReadFile of a missing file = %v, want ErrNotExist", err)
	}
	small := filepath.Join(t.TempDir(), "p.yaml")
	if err := os.WriteFile(small, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if data, err := ReadFile(small); err != nil || string(data) != "x" {
		t.Fatalf("ReadFile = %q, %v", data, err)
	}
}
