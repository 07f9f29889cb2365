package config_test

import (
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/config"
)

func TestTransparentKeys(t *testing.T) {
	c, err := config.Parse([]byte(`
transparent:
  enabled: true
  ipv6: false
  sniffTimeout: 50ms
  connectTimeout: 2s
  opaquePorts: [3306]
  tcpPassthrough: known
`), "test.yaml")
	if err != nil {
		t.Fatal(err)
	}
	c.WithDefaults()
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	tr := c.Transparent
	if !tr.Enabled || tr.IPv6Listener() || tr.SniffTimeout.D() != 50*time.Millisecond || tr.ConnectTimeout.D() != 2*time.Second ||
		!slices.Equal(tr.Opaque(), []uint16{3306}) || tr.Passthrough() != config.PassthroughKnown {
		t.Errorf("parsed %+v", tr)
	}
	var zero config.Transparent
	if !zero.IPv6Listener() || zero.Passthrough() != config.PassthroughAny || len(zero.Opaque()) != len(config.DefaultOpaquePorts) {
		t.Errorf("defaults: ipv6 %v, passthrough %q, opaque %v", zero.IPv6Listener(), zero.Passthrough(), zero.Opaque())
	}
	if p, err := config.ParsePorts("none"); err != nil || p == nil || len(p) != 0 {
		t.Errorf(`ParsePorts("none") = %v, %v; want an empty list (no opaque ports)`, p, err)
	}

	bad, err := config.Parse([]byte(`
transparent:
  sniffTimeout: 1m
  opaquePorts: [0]
  tcpPassthrough: some
`), "bad.yaml")
	if err != nil {
		t.Fatal(err)
	}
	bad.WithDefaults()
	err = bad.Validate()
	for _, want := range []string{"transparent.sniffTimeout", "transparent.opaquePorts[0]", "transparent.tcpPassthrough"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Validate() = %v, want an error naming %s", err, want)
		}
	}
}
