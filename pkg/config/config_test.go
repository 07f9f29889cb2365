package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// Without a file, the configuration is empty: listeners at their defaults,
// no services (the demo's belong to `sidecar demo`).
func TestLoadWithoutFile(t *testing.T) {
	c, err := Load("")
	if err != nil {
		t.Fatal(err)
	}
	c.WithDefaults()
	if err := c.Validate(); err != nil {
		t.Fatalf("the configuration without a file does not validate: %v", err)
	}
	if len(c.Discovery.Static) != 0 || c.Discovery.Consul != nil || c.Service != "" || len(c.Policies) != 0 {
		t.Fatalf("the configuration without a file: static %v, consul %+v, service %q, %d policies; want none of them",
			c.Discovery.Static, c.Discovery.Consul, c.Service, len(c.Policies))
	}
	if c.Listeners != (Listeners{Outbound: DefaultOutbound, Inbound: DefaultInbound, Admin: DefaultAdmin, Health: DefaultHealth, Metrics: DefaultMetrics}) {
		t.Fatalf("listeners %+v, want the defaults", c.Listeners)
	}
}

func TestDesignExampleParses(t *testing.T) {
	// The config example of DESIGN.md, key for key.
	doc := `
service: orders
appPort: 8080
listeners: {outbound: 127.0.0.1:15001, inbound: 0.0.0.0:15006, admin: 127.0.0.1:15000,
            health: 0.0.0.0:15020, metrics: 0.0.0.0:15090}
discovery:
  consul: {address: 127.0.0.1:8500}
  static:
    user-service: [127.0.0.1:9001, 127.0.0.1:9002]
probes:
  readiness: {http: /health, interval: 1s, timeout: 1s, failureThreshold: 3, successThreshold: 1}
  liveness: {tcp: true}
  startup: {grpc: ""}
policies:
  - {service: "*", timeout: 10s}
policyFile: policies.yaml
`
	c, err := Parse([]byte(doc), "design.yaml")
	if err != nil {
		t.Fatal(err)
	}
	c.WithDefaults()
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if c.Service != "orders" || c.AppPort != 8080 || c.Discovery.Consul.Address != "127.0.0.1:8500" ||
		c.Probes.Readiness.HTTP != "/health" || c.Probes.Readiness.Interval.D().String() != "1s" ||
		!c.Probes.Liveness.TCP || c.Probes.Startup.GRPC == nil || len(c.Policies) != 1 || c.PolicyFile != "policies.yaml" {
		t.Fatalf("parsed %+v", c)
	}
}

func TestLoadErrorsNameFileLineAndKey(t *testing.T) {
	dir := t.TempDir()
	cases := []struct{ name, doc, want string }{
		{"unknown top-level key", "service: a\nappport: 1\n", `bad.yaml:2: unknown key "appport" (allowed: accessLog, advertiseAddr, allowHosts, appPort,`},
		{"unknown nested key", "listeners:\n  outbound: 127.0.0.1:1\n  outbund: x\n", `bad.yaml:3: unknown key "listeners.outbund" (allowed: admin, health, inbound, metrics, outbound)`},
		{"unknown probe key", "probes:\n  readiness:\n    htp: /x\n", `bad.yaml:3: unknown key "probes.readiness.htp"`},
		{"wrong type", "appPort: eighty\n", "bad.yaml:1: cannot unmarshal !!str `eighty` into int"},
		{"bad duration", "probes:\n  readiness: {http: /, interval: soon}\n", `bad.yaml:2: invalid duration "soon"`},
		{"syntax", "listeners: [\n", "bad.yaml:"},
		{"two documents", "service: a\n---\nservice: b\n", "bad.yaml:2: more than one YAML document"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(dir, "bad.yaml")
			if err := os.WriteFile(path, []byte(tc.doc), 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := Load(path)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Load(%q) error:\n  %v\nwant it to contain:\n  %s", tc.doc, err, tc.want)
			}
			if !strings.HasPrefix(err.Error(), path) {
				t.Fatalf("error %q does not start with the file name", err)
			}
		})
	}
}

func TestValidate(t *testing.T) {
	c := &Config{Service: "Orders_1", AppPort: 70000, Listeners: Listeners{Outbound: "nope"},
		Discovery: Discovery{Static: map[string][]string{"a": {"host:1"}}}, Log: Log{Level: "loud"}}
	c.WithDefaults()
	err := c.Validate()
	if err == nil {
		t.Fatal("Validate accepted an invalid config")
	}
	bad, perr := Parse([]byte("policies:\n  - {service: \"*\", timeout: 0s}\n  - {service: a, retry: {attemps: 2}}\n"), "c.yaml")
	if perr != nil {
		t.Fatal(perr)
	}
	bad.WithDefaults()
	perr = bad.Validate()
	for _, want := range []string{"c.yaml:2: policies[0]: timeout: 0s is not allowed", `c.yaml:3: unknown key "retry.attemps"`} {
		if perr == nil || !strings.Contains(perr.Error(), want) {
			t.Errorf("inline policies: error %v lacks %q", perr, want)
		}
	}
	for _, want := range []string{"service:", "appPort: 70000", "listeners.outbound:", "discovery.static:", "log.level:"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("Validate error lacks %q:\n%v", want, err)
		}
	}
}

func TestProbesLimitsLifecycleValidated(t *testing.T) {
	c, err := Parse([]byte(`
probes:
  readiness: {http: health, tcp: true, status: 500-200, interval: 2h}
  liveness: {port: 70000, failureThreshold: -1}
limits: {inboundMaxInFlight: -1, outboundMaxInFlight: 2000000}
lifecycle: {drainWindow: 11m}
`), "c.yaml")
	if err != nil {
		t.Fatal(err)
	}
	c.WithDefaults()
	verr := c.Validate()
	for _, want := range []string{
		`probes.readiness.http: "health" must start with /`,
		"probes.readiness: set exactly one of http, tcp and grpc (found 2)",
		`probes.readiness.status: "500-200" is not a status range`,
		"probes.readiness.interval: 2h0m0s is not allowed",
		"probes.liveness: set exactly one of http, tcp and grpc (found 0)",
		"probes.liveness.port: 70000",
		"probes.liveness.failureThreshold: -1",
		"probes.readiness: no port: set appPort, or the probe's port",
		"limits.inboundMaxInFlight: -1",
		"limits.outboundMaxInFlight: 2000000",
		"lifecycle.drainWindow: 11m0s",
	} {
		if verr == nil || !strings.Contains(verr.Error(), want) {
			t.Errorf("Validate error lacks %q:\n%v", want, verr)
		}
	}
	if c.Lifecycle.ShutdownTimeout.D() != 20*time.Second {
		t.Errorf("lifecycle.shutdownTimeout default %v, want 20s", c.Lifecycle.ShutdownTimeout)
	}
}

// A probe with its own port runs without appPort (a container that declares
// no port, as in Kubernetes' http-liveness example); one without needs it.
func TestProbeOwnPortNeedsNoAppPort(t *testing.T) {
	c, err := Parse([]byte("probes:\n  liveness: {http: /healthz, port: 8080}\n  startup: {tcp: true, port: 8080}\n"), "c.yaml")
	if err != nil {
		t.Fatal(err)
	}
	c.WithDefaults()
	if err := c.Validate(); err != nil {
		t.Fatalf("probes with their own port and no appPort: %v, want them valid", err)
	}
	c.Probes.Readiness = &Probe{HTTP: "/ready"}
	err = c.Validate()
	if want := "probes.readiness: no port: set appPort, or the probe's port"; err == nil || err.Error() != want {
		t.Fatalf("a probe without a port and no appPort: got %v, want exactly %q", err, want)
	}
}

func TestParseProbe(t *testing.T) {
	p, err := ParseProbe("http:/health,port=8081,interval=2s,timeout=500ms,initialDelay=1s,failureThreshold=5,successThreshold=2,status=200-299")
	if err != nil {
		t.Fatal(err)
	}
	lo, hi, _ := p.StatusRange()
	if p.HTTP != "/health" || p.Port != 8081 || p.Interval.D() != 2*time.Second || p.Timeout.D() != 500*time.Millisecond ||
		p.InitialDelay.D() != time.Second || p.FailureThreshold != 5 || p.SuccessThreshold != 2 || lo != 200 || hi != 299 {
		t.Fatalf("ParseProbe = %+v", p)
	}
	if p, err := ParseProbe("grpc:orders"); err != nil || p.GRPC == nil || *p.GRPC != "orders" {
		t.Fatalf("grpc:orders = %+v, %v", p, err)
	}
	if p, err := ParseProbe("tcp"); err != nil || !p.TCP {
		t.Fatalf("tcp = %+v, %v", p, err)
	}
	for _, bad := range []string{"http:health", "udp", "tcp,interval", "tcp,every=1s", "tcp,interval=soon"} {
		if _, err := ParseProbe(bad); err == nil {
			t.Errorf("ParseProbe(%q) accepted", bad)
		}
	}
}
