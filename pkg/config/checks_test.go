package config

import (
	"strings"
	"testing"
)

// TestAdminLoopbackOnly: listeners.admin must be loopback unless the
// switch is set, and the switch is no key of the file.
func TestAdminLoopbackOnly(t *testing.T) {
	for _, tc := range []struct {
		admin string
		allow bool
		want  string // "" when valid
	}{
		{"127.0.0.1:15000", false, ""},
		{"127.9.9.9:0", false, ""},
		{"[::1]:15000", false, ""},
		{"localhost:15000", false, ""},
		{"0.0.0.0:15000", false, `listeners.admin: "0.0.0.0:15000" is not a loopback address`},
		{":15000", false, `listeners.admin: ":15000" is not a loopback address`},
		{"[::]:15000", false, "is not a loopback address"},
		{"10.1.2.3:15000", false, "SIDECAR_ALLOW_NON_LOOPBACK_ADMIN=true"},
		{"0.0.0.0:15000", true, ""},
		{":15000", true, ""},
	} {
		c, err := Parse([]byte("listeners: {admin: '"+tc.admin+"'}\n"), "pod.yaml")
		if err != nil {
			t.Fatal(err)
		}
		c.AllowNonLoopbackAdmin = tc.allow
		c.WithDefaults()
		err = c.Validate()
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("admin %s, allowed %v: got %v, want it valid", tc.admin, tc.allow, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("admin %s, allowed %v: got %v, want an error containing %q", tc.admin, tc.allow, err, tc.want)
		}
	}
	if _, err := Parse([]byte("allowNonLoopbackAdmin: true\n"), "pod.yaml"); err == nil || !strings.Contains(err.Error(), `unknown key "allowNonLoopbackAdmin"`) {
		t.Errorf("a file setting allowNonLoopbackAdmin: got %v, want an unknown-key error", err)
	}
}

func TestCheckConsulAddress(t *testing.T) {
	for _, ok := range []string{"127.0.0.1:8500", "consul:8500", "consul.service.consul:8500", "consul_1:8500", "[::1]:8500",
		"http://consul:8500", "https://consul.example.com:8501", "Consul.Example:8500"} {
		if err := CheckConsulAddress(ok); err != nil {
			t.Errorf("CheckConsulAddress(%q): %v, want nil", ok, err)
		}
	}
	for _, bad := range []string{"", "consul", ":8500", "consul:", "consul:0", "consul:65536", "consul:http",
		"consul/x:8500", "consul:8500/v1", "http://consul:8500/", "consul\n:8500", "consul:8500\n", "user@consul:8500",
		"unix:///var/run/consul.sock", "ftp://consul:8500", "-consul:8500", "con sul:8500", "a..b:8500"} {
		if err := CheckConsulAddress(bad); err == nil {
			t.Errorf("CheckConsulAddress(%q): nil, want an error", bad)
		}
	}
	// The sidecar refuses such an address at startup, naming the key.
	c, err := Parse([]byte("discovery: {consul: {address: 'consul/x:8500'}}\n"), "pod.yaml")
	if err != nil {
		t.Fatal(err)
	}
	c.WithDefaults()
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), `discovery.consul.address: "consul/x:8500": "consul/x" is not an IP address or a DNS name`) {
		t.Errorf("Validate with a Consul address that has a path: got %v", err)
	}
}

func TestProbeValidate(t *testing.T) {
	p, err := ParseProbe("http:/ready,interval=2147483647s,failureThreshold=100000")
	if err != nil {
		t.Fatal(err)
	}
	err = p.Validate("probes.readiness")
	for _, want := range []string{"probes.readiness.interval: ", "probes.readiness.failureThreshold: 100000 is not allowed"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Validate: got %v, want an error containing %q", err, want)
		}
	}
	if p, _ := ParseProbe("tcp,interval=5s"); p.Validate("probes.liveness") != nil {
		t.Errorf("Validate of a good probe: %v", p.Validate("probes.liveness"))
	}
}

func TestCheckConsulAddressNeverEchoesCredentials(t *testing.T) {
	for _, v := range []string{"user:s3cret@consul:8500", "http://user:s3cret@consul:8500", "s3cret@consul:8500"} {
		err := CheckConsulAddress(v)
		if err == nil {
			t.Fatalf("CheckConsulAddress(%q) accepted credentials in the address", v)
		}
		if strings.Contains(err.Error(), "s3cret") {
			t.Fatalf("CheckConsulAddress(%q) = %v: the error echoes the password", v, err)
		}
	}
}
