package config

import (
	"path/filepath"
	"strings"
	"testing"
)

// The config file is read up to the input cap, and its values are quoted
// short in errors.
func TestLoadBoundsItsInput(t *testing.T) {
	if _, err := Load("/dev/zero"); err == nil || !strings.Contains(err.Error(), "/dev/zero is larger than 64 MiB") {
		t.Fatalf("Load(/dev/zero) = %v, want the 64 MiB cap named", err)
	}
	huge := strings.Repeat("x", 100000)
	c, err := Parse([]byte("service: "+huge+"\nlog: {level: "+huge+"}\nlisteners: {admin: "+huge+"}\n"), filepath.Join("dir", "sidecar.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	c.WithDefaults()
	err = c.Validate()
	if err == nil || len(err.Error()) > 2000 || !strings.Contains(err.Error(), "… (100000 bytes)") {
		t.Fatalf("Validate with three 100 KB values: %d bytes of error, want them quoted short: %.400s", len(err.Error()), err)
	}
}
