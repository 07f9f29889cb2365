// Package config is the sidecar's configuration file: its keys (DESIGN.md,
// "Config file"), strict loading and validation. Flags and environment
// variables are layered on top by cmd/sidecar.
package config

import (
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/policy"
	"github.com/sidecar-mesh/sidecar/pkg/readlimit"
	"github.com/sidecar-mesh/sidecar/pkg/redact"
)

// Config is the whole sidecar configuration. Zero values mean "not set";
// WithDefaults fills the listener addresses.
type Config struct {
	// Service is the name of the app this sidecar fronts (its Consul name and
	// span service.name). Empty: the sidecar only proxies outbound calls.
	Service string `yaml:"service,omitempty" json:"service,omitempty"`
	// AppPort is the app's port on 127.0.0.1. Zero: no inbound side.
	AppPort int `yaml:"appPort,omitempty" json:"appPort,omitempty"`
	// AdvertiseAddr is the address peers reach this pod at (its IP), used
	// for the Consul registration. Default: $POD_IP.
	AdvertiseAddr string `yaml:"advertiseAddr,omitempty" json:"advertiseAddr,omitempty"`
	// Listeners are the sidecar's own addresses.
	Listeners Listeners `yaml:"listeners" json:"listeners"`
	// Discovery says where endpoints come from.
	Discovery Discovery `yaml:"discovery" json:"discovery"`
	// Probes are the app's health probes, run by the sidecar.
	Probes Probes `yaml:"probes,omitempty" json:"probes,omitempty"`
	// Policies are inline Policy documents; service "*" is the default.
	Policies []yaml.Node `yaml:"policies,omitempty" json:"-"`
	// PolicyFile is a file of Policy documents, watched for changes.
	PolicyFile string `yaml:"policyFile,omitempty" json:"policyFile,omitempty"`
	// AllowHosts are external hosts ("host" or "host:port") the app may reach
	// directly through the outbound port. Empty: none; the outbound port then
	// reaches only services that discovery knows.
	AllowHosts []string `yaml:"allowHosts,omitempty" json:"allowHosts,omitempty"`
	// Limits bound the sidecar as a whole, across services.
	Limits Limits `yaml:"limits,omitempty" json:"limits"`
	// Transparent configures transparent interception: connections that
	// `sidecar iptables` redirects to the outbound port.
	Transparent Transparent `yaml:"transparent,omitempty" json:"transparent"`
	// Mesh configures the service mesh (Consul Connect); off by default.
	Mesh Mesh `yaml:"mesh,omitempty" json:"mesh"`
	// Tracing configures spans and their export; off without an endpoint.
	Tracing Tracing `yaml:"tracing,omitempty" json:"tracing"`
	// RequestMetrics turns the per-request metrics (count and duration by
	// service, direction, method and code class) on or off. Default on.
	RequestMetrics *bool `yaml:"requestMetrics,omitempty" json:"requestMetrics,omitempty"`
	// AccessLog writes one JSON line per outbound request; off by
	// default.
	AccessLog AccessLog `yaml:"accessLog,omitempty" json:"accessLog"`
	// OutboundEngine is what serves the outbound listener's plain
	// HTTP/1.1 requests: "goroutines" (the default: a goroutine per
	// connection) or "loops" (event loops, one per CPU: pkg/engine;
	// experimental; not with transparent interception).
	OutboundEngine string `yaml:"outboundEngine,omitempty" json:"outboundEngine,omitempty"`
	// Lifecycle configures the drain on shutdown.
	Lifecycle Lifecycle `yaml:"lifecycle,omitempty" json:"lifecycle"`
	// Log configures logging.
	Log Log `yaml:"log,omitempty" json:"log"`
	// AllowNonLoopbackAdmin lets listeners.admin be an address other than
	// loopback. Not a key of the file: only the flag or the environment
	// (AllowNonLoopbackAdminEnv) set it, which a pod's author does not
	// control. False: the admin API must listen on loopback.
	AllowNonLoopbackAdmin bool `yaml:"-" json:"allowNonLoopbackAdmin,omitempty"`

	file string // where the config came from, for messages
}

// Listeners are host:port addresses. Empty means the default in DESIGN.md.
type Listeners struct {
	Outbound string `yaml:"outbound,omitempty" json:"outbound"`
	Inbound  string `yaml:"inbound,omitempty" json:"inbound"`
	Admin    string `yaml:"admin,omitempty" json:"admin"`
	Health   string `yaml:"health,omitempty" json:"health"`
	Metrics  string `yaml:"metrics,omitempty" json:"metrics"`
}

// Discovery configures the endpoint sources.
type Discovery struct {
	// Consul is the Consul agent to watch; nil or an empty address means
	// static endpoints only.
	Consul *Consul `yaml:"consul,omitempty" json:"consul,omitempty"`
	// Static maps service names to IP:port endpoints. It is always consulted
	// first.
	Static map[string][]string `yaml:"static,omitempty" json:"static,omitempty"`
}

// Consul configures the Consul source and the app's registration. The ACL
// token and TLS settings come from the standard CONSUL_HTTP_TOKEN,
// CONSUL_CACERT, CONSUL_CLIENT_CERT, CONSUL_CLIENT_KEY and
// CONSUL_HTTP_SSL variables.
type Consul struct {
	// Address is host:port of the Consul agent's HTTP API.
	Address string `yaml:"address,omitempty" json:"address,omitempty"`
	// Datacenter queried by default; empty: the agent's own.
	Datacenter string `yaml:"datacenter,omitempty" json:"datacenter,omitempty"`
	// Services narrows instances per service (tags, datacenter).
	Services map[string]discovery.ServiceOptions `yaml:"services,omitempty" json:"services,omitempty"`
	// WaitTime of the blocking queries. Default 5m.
	WaitTime policy.Duration `yaml:"waitTime,omitempty" json:"waitTime,omitempty"`
	// FirstWait bounds the wait of a service's first request for Consul's
	// first answer. Default 1s.
	FirstWait policy.Duration `yaml:"firstWait,omitempty" json:"firstWait,omitempty"`
	// IdleTimeout stops watching a service unused this long. Default 10m.
	IdleTimeout policy.Duration `yaml:"idleTimeout,omitempty" json:"idleTimeout,omitempty"`
	// CacheFile persists the last known good endpoints; empty: none.
	CacheFile string `yaml:"cacheFile,omitempty" json:"cacheFile,omitempty"`
	// CacheMaxAge is how old persisted endpoints may be to be used. Default 1h.
	CacheMaxAge policy.Duration `yaml:"cacheMaxAge,omitempty" json:"cacheMaxAge,omitempty"`
	// AllowLoopbackEndpoints uses instances at loopback, link-local or
	// unspecified addresses, or at host names resolving to one. False (the
	// default) drops them: such an address is the sidecar's own host
	// (static endpoints are not checked).
	AllowLoopbackEndpoints bool `yaml:"allowLoopbackEndpoints,omitempty" json:"allowLoopbackEndpoints,omitempty"`
	// Register configures the app's registration (with service, appPort
	// and advertiseAddr set).
	Register Register `yaml:"register,omitempty" json:"register"`
}

// Register configures how the app is registered in Consul.
type Register struct {
	// Disabled turns registration off.
	Disabled bool `yaml:"disabled,omitempty" json:"disabled,omitempty"`
	// ID of the instance; default SERVICE-ADDRESS-PORT, stable for the pod.
	ID   string            `yaml:"id,omitempty" json:"id,omitempty"`
	Tags []string          `yaml:"tags,omitempty" json:"tags,omitempty"`
	Meta map[string]string `yaml:"meta,omitempty" json:"meta,omitempty"`
	// TTL of the readiness check. Default 10s.
	TTL policy.Duration `yaml:"ttl,omitempty" json:"ttl,omitempty"`
	// DeregisterCriticalAfter lets Consul drop an instance whose sidecar
	// vanished. Default 1m.
	DeregisterCriticalAfter policy.Duration `yaml:"deregisterCriticalAfter,omitempty" json:"deregisterCriticalAfter,omitempty"`
}

// Probes are the app's probes; a nil probe is not run.
type Probes struct {
	Readiness *Probe `yaml:"readiness,omitempty" json:"readiness,omitempty"`
	Liveness  *Probe `yaml:"liveness,omitempty" json:"liveness,omitempty"`
	Startup   *Probe `yaml:"startup,omitempty" json:"startup,omitempty"`
}

// Probe is one probe of the app: exactly one of HTTP, TCP and GRPC. Zero
// timings and thresholds mean the defaults (interval 1s, timeout 1s,
// failureThreshold 3, successThreshold 1, no initial delay).
type Probe struct {
	// HTTP is the path of an HTTP GET against the app; shown and logged
	// without the values of query parameters that name secrets.
	HTTP redact.URL `yaml:"http,omitempty" json:"http,omitempty"`
	// TCP, when true, probes with a TCP connect.
	TCP bool `yaml:"tcp,omitempty" json:"tcp,omitempty"`
	// GRPC, when set, probes with gRPC health v1; the string is the service
	// name ("" for the server as a whole).
	GRPC *string `yaml:"grpc,omitempty" json:"grpc,omitempty"`
	// Port probes this port of 127.0.0.1 instead of appPort. Zero:
	// appPort, which must then be set.
	Port int `yaml:"port,omitempty" json:"port,omitempty"`
	// Headers are sent with an HTTP probe (Host sets the Host header).
	// Secrets among them (Authorization, Cookie, names with token, secret,
	// key or password) are never shown or logged (redact.Headers).
	Headers redact.Headers `yaml:"headers,omitempty" json:"headers,omitempty"`
	// Status is the range of HTTP statuses that pass, "200-399" by default.
	Status           string          `yaml:"status,omitempty" json:"status,omitempty"`
	Interval         policy.Duration `yaml:"interval,omitempty" json:"interval,omitempty"`
	Timeout          policy.Duration `yaml:"timeout,omitempty" json:"timeout,omitempty"`
	FailureThreshold int             `yaml:"failureThreshold,omitempty" json:"failureThreshold,omitempty"`
	SuccessThreshold int             `yaml:"successThreshold,omitempty" json:"successThreshold,omitempty"`
	InitialDelay     policy.Duration `yaml:"initialDelay,omitempty" json:"initialDelay,omitempty"`
}

// StatusRange is the probe's Status as numbers.
func (p *Probe) StatusRange() (lo, hi int, err error) {
	if p.Status == "" {
		return 200, 399, nil
	}
	a, b, ok := strings.Cut(p.Status, "-")
	if !ok {
		b = a
	}
	lo, err1 := strconv.Atoi(strings.TrimSpace(a))
	hi, err2 := strconv.Atoi(strings.TrimSpace(b))
	if err1 != nil || err2 != nil || lo < 100 || hi > 599 || lo > hi {
		return 0, 0, fmt.Errorf("%s is not a status range such as 200-399", policy.Quote(p.Status))
	}
	return lo, hi, nil
}

// ParseProbe reads a probe from its flag form: KIND[,key=value...] where
// KIND is http:/PATH, tcp, grpc or grpc:SERVICE, and the keys are port,
// interval, timeout, initialDelay, failureThreshold, successThreshold and
// status. Example: "http:/health,interval=2s,failureThreshold=5".
func ParseProbe(spec string) (*Probe, error) {
	parts := strings.Split(spec, ",")
	p := &Probe{}
	kind, arg, _ := strings.Cut(strings.TrimSpace(parts[0]), ":")
	switch kind {
	case "http":
		if !strings.HasPrefix(arg, "/") {
			return nil, fmt.Errorf("%s: want http:/PATH", policy.Quote(parts[0]))
		}
		p.HTTP = redact.URL(arg)
	case "tcp":
		p.TCP = true
	case "grpc":
		p.GRPC = &arg
	default:
		return nil, fmt.Errorf("%s: want http:/PATH, tcp, grpc or grpc:SERVICE", policy.Quote(parts[0]))
	}
	for _, kv := range parts[1:] {
		k, v, ok := strings.Cut(strings.TrimSpace(kv), "=")
		if !ok {
			return nil, fmt.Errorf("%s: want key=value", policy.Quote(kv))
		}
		var err error
		switch k {
		case "port":
			p.Port, err = strconv.Atoi(v)
		case "status":
			p.Status = v
		case "interval":
			p.Interval, err = policy.ParseDuration(v)
		case "timeout":
			p.Timeout, err = policy.ParseDuration(v)
		case "initialDelay":
			p.InitialDelay, err = policy.ParseDuration(v)
		case "failureThreshold":
			p.FailureThreshold, err = strconv.Atoi(v)
		case "successThreshold":
			p.SuccessThreshold, err = strconv.Atoi(v)
		default:
			return nil, fmt.Errorf("unknown probe setting %s (allowed: port, status, interval, timeout, initialDelay, failureThreshold, successThreshold)", policy.Quote(k))
		}
		if err != nil {
			return nil, fmt.Errorf("%s=%s: %w", k, policy.Quote(v), err)
		}
	}
	return p, nil
}

func (p *Probe) validate(key string, add func(string, ...any)) {
	if p == nil {
		return
	}
	kinds := 0
	if p.HTTP != "" {
		kinds++
		if !strings.HasPrefix(string(p.HTTP), "/") {
			add("%s.http: %s must start with /", key, policy.Quote(p.HTTP.Redacted()))
		}
	}
	if p.TCP {
		kinds++
	}
	if p.GRPC != nil {
		kinds++
	}
	if kinds != 1 {
		add("%s: set exactly one of http, tcp and grpc (found %d)", key, kinds)
	}
	if p.Port < 0 || p.Port > 65535 {
		add("%s.port: %d out of range 1-65535", key, p.Port)
	}
	if _, _, err := p.StatusRange(); err != nil {
		add("%s.status: %v", key, err)
	}
	for _, d := range []struct {
		name string
		v    policy.Duration
	}{{"interval", p.Interval}, {"timeout", p.Timeout}, {"initialDelay", p.InitialDelay}} {
		if d.v < 0 || d.v.D() > time.Hour {
			add("%s.%s: %s is not allowed (allowed: 0 for the default, up to 1h)", key, d.name, d.v)
		}
	}
	if p.FailureThreshold < 0 || p.FailureThreshold > 1000 {
		add("%s.failureThreshold: %d is not allowed (allowed: 1 to 1000, or 0 for 3)", key, p.FailureThreshold)
	}
	if p.SuccessThreshold < 0 || p.SuccessThreshold > 1000 {
		add("%s.successThreshold: %d is not allowed (allowed: 1 to 1000, or 0 for 1)", key, p.SuccessThreshold)
	}
}

// Limits are sidecar-wide caps. Zero means the default; there is no "no
// limit": an unbounded proxy is one a runaway app can take down.
type Limits struct {
	// OutboundMaxInFlight caps the app's outbound requests in flight, all
	// services together; over it a request gets 503 overloaded at once.
	// Default 10000. Each service also has its policy's
	// concurrency.maxInFlight.
	OutboundMaxInFlight int `yaml:"outboundMaxInFlight,omitempty" json:"outboundMaxInFlight,omitempty"`
	// InboundMaxInFlight caps requests in flight to the app; over it a
	// request gets 503 overloaded at once. Default 1024.
	InboundMaxInFlight int `yaml:"inboundMaxInFlight,omitempty" json:"inboundMaxInFlight,omitempty"`
	// MaxResponseHeaderBytes bounds the status line and header block of
	// an answer from an upstream or the app (each interim 1xx answer's
	// too); over it the answer is refused with 502 upstream_bad_response.
	// Default 65536, as Envoy's 60 KiB.
	MaxResponseHeaderBytes int `yaml:"maxResponseHeaderBytes,omitempty" json:"maxResponseHeaderBytes,omitempty"`
}

// Tracing configures OpenTelemetry tracing. The standard OTEL_* variables
// set the same keys (see the flags).
type Tracing struct {
	// Endpoint of the OTLP collector, host:port or a URL; shown and logged
	// without userinfo or secret query parameters. Empty: tracing
	// off (trace headers still pass through untouched).
	Endpoint redact.URL `yaml:"endpoint,omitempty" json:"endpoint,omitempty"`
	// Protocol is grpc (default) or http/protobuf.
	Protocol string `yaml:"protocol,omitempty" json:"protocol,omitempty"`
	// Sampler is an OTEL_TRACES_SAMPLER name; default
	// parentbased_traceidratio.
	Sampler string `yaml:"sampler,omitempty" json:"sampler,omitempty"`
	// SamplerArg is the ratio of the ratio samplers; default 0.01.
	SamplerArg float64 `yaml:"samplerArg,omitempty" json:"samplerArg,omitempty"`
	// Propagators are OTEL_PROPAGATORS names; default tracecontext, baggage.
	Propagators []string `yaml:"propagators,omitempty" json:"propagators,omitempty"`
	// ServiceName is the spans' service.name; default service.
	ServiceName string `yaml:"serviceName,omitempty" json:"serviceName,omitempty"`
}

// The outbound engines (Config.OutboundEngine).
const (
	EngineGoroutines = "goroutines"
	EngineLoops      = "loops"
)

// Drain is the drain window: DrainWindow, or 0 when unset (before the
// defaults are applied).
func (l Lifecycle) Drain() time.Duration {
	if l.DrainWindow == nil {
		return 0
	}
	return l.DrainWindow.D()
}

// Lifecycle configures startup and shutdown.
type Lifecycle struct {
	// DrainWindow is how long, after SIGTERM (or the admin API's POST
	// /quitquitquit), the sidecar keeps accepting inbound and outbound
	// requests while it reports not ready and is deregistered, so that
	// peers and the kubelet stop sending before it stops listening.
	// Unset: 5s; 0s: none (a Job's sidecar, a test), as written.
	DrainWindow *policy.Duration `yaml:"drainWindow,omitempty" json:"drainWindow,omitempty"`
	// ShutdownTimeout bounds the wait for in-flight requests once the
	// listeners are closed; then the sidecar exits anyway. Default 20s (with
	// the drain window, inside Kubernetes' default 30s grace period).
	ShutdownTimeout policy.Duration `yaml:"shutdownTimeout,omitempty" json:"shutdownTimeout,omitempty"`
}

// Log configures the logger.
type Log struct {
	// Level is debug, info, warn or error. Default info.
	Level string `yaml:"level,omitempty" json:"level,omitempty"`
	// Format is json or text. Default json.
	Format string `yaml:"format,omitempty" json:"format,omitempty"`
}

// AccessLog configures the access log: one line per outbound request
// (service, method, path, status, reason, attempts, duration, upstream
// endpoint, trace ID) through the sidecar's logger, at info level, written
// off the request path (a line the writer cannot keep up with is dropped).
type AccessLog struct {
	// Enabled turns it on. False: no line per request.
	Enabled bool `yaml:"enabled,omitempty" json:"enabled"`
	// Sample is the share of requests logged, more than 0 and at most 1;
	// 0 (unset): 1, every request.
	Sample float64 `yaml:"sample,omitempty" json:"sample,omitempty"`
	// FailuresOnly logs failed requests only (the sidecar's own errors,
	// 5xx answers, gRPC server failures).
	FailuresOnly bool `yaml:"failuresOnly,omitempty" json:"failuresOnly"`
}

// Default listener addresses (DESIGN.md, "Ports").
const (
	DefaultOutbound = "127.0.0.1:15001"
	DefaultInbound  = "0.0.0.0:15006"
	DefaultAdmin    = "127.0.0.1:15000"
	DefaultHealth   = "0.0.0.0:15020"
	DefaultMetrics  = "0.0.0.0:15090"
)

// Load reads a configuration file strictly. An empty path gives the empty
// configuration: no service, no discovery, the listeners at their defaults
// once WithDefaults fills them.
func Load(path string) (*Config, error) {
	if path == "" {
		return &Config{}, nil
	}
	data, err := readlimit.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	return Parse(data, path)
}

// Parse decodes a configuration document strictly; name is used in errors.
func Parse(data []byte, name string) (*Config, error) {
	var c Config
	if err := policy.DecodeStrict(data, name, &c); err != nil {
		return nil, err
	}
	c.file = name
	return &c, nil
}

// WithDefaults fills unset listener addresses and log settings.
func (c *Config) WithDefaults() {
	set := func(p *string, v string) {
		if *p == "" {
			*p = v
		}
	}
	set(&c.Listeners.Outbound, DefaultOutbound)
	set(&c.Listeners.Inbound, DefaultInbound)
	set(&c.Listeners.Admin, DefaultAdmin)
	set(&c.Listeners.Health, DefaultHealth)
	set(&c.Listeners.Metrics, DefaultMetrics)
	set(&c.Log.Level, "info")
	set(&c.Log.Format, "json")
	if c.Lifecycle.DrainWindow == nil {
		d := policy.Duration(5 * time.Second)
		c.Lifecycle.DrainWindow = &d
	}
	if c.Lifecycle.ShutdownTimeout == 0 {
		c.Lifecycle.ShutdownTimeout = policy.Duration(20 * time.Second)
	}
}

// Validate checks every key and returns all problems, each naming its key.
func (c *Config) Validate() error {
	var errs []error
	add := func(format string, a ...any) { errs = append(errs, fmt.Errorf(format, a...)) }
	if c.Service != "" && !policy.ValidServiceName(c.Service) {
		add("service: %s is not a valid service name (lower-case letters, digits and '-', at most 63)", policy.Quote(c.Service))
	}
	if c.AppPort < 0 || c.AppPort > 65535 {
		add("appPort: %d out of range 1-65535", c.AppPort)
	}
	for _, l := range []struct{ key, addr string }{
		{"listeners.outbound", c.Listeners.Outbound}, {"listeners.inbound", c.Listeners.Inbound},
		{"listeners.admin", c.Listeners.Admin}, {"listeners.health", c.Listeners.Health},
		{"listeners.metrics", c.Listeners.Metrics},
	} {
		if err := checkListenAddr(l.addr); err != nil {
			add("%s: %s: %v", l.key, policy.Quote(l.addr), err)
		}
	}
	if err := CheckAdminAddr(c.Listeners.Admin, c.AllowNonLoopbackAdmin); err != nil {
		add("listeners.admin: %v", err)
	}
	if n := c.Limits.OutboundMaxInFlight; n < 0 || n > 1000000 {
		add("limits.outboundMaxInFlight: %d is not allowed (allowed: 1 to 1000000, or 0 for the default)", n)
	}
	if n := c.Limits.InboundMaxInFlight; n < 0 || n > 1000000 {
		add("limits.inboundMaxInFlight: %d is not allowed (allowed: 1 to 1000000, or 0 for the default)", n)
	}
	if n := c.Limits.MaxResponseHeaderBytes; n < 0 || (n > 0 && n < 1024) || n > 16<<20 {
		add("limits.maxResponseHeaderBytes: %d is not allowed (allowed: 1024 to 16777216, or 0 for 65536)", n)
	}
	for _, p := range []struct {
		key   string
		probe *Probe
	}{{"probes.readiness", c.Probes.Readiness}, {"probes.liveness", c.Probes.Liveness}, {"probes.startup", c.Probes.Startup}} {
		p.probe.validate(p.key, add)
		if p.probe != nil && p.probe.Port == 0 && c.AppPort == 0 {
			add("%s: no port: set appPort, or the probe's port", p.key)
		}
	}
	c.Transparent.validate(add)
	c.validateMesh(add)
	switch c.OutboundEngine {
	case "", EngineGoroutines:
	case EngineLoops:
		if c.Transparent.Enabled {
			add("outboundEngine: %s does not serve redirected connections (transparent.enabled); use %s", EngineLoops, EngineGoroutines)
		}
	default:
		add("outboundEngine: %s is not allowed (allowed: %s, %s)", policy.Quote(c.OutboundEngine), EngineGoroutines, EngineLoops)
	}
	if err := CheckDrainWindow(c.Lifecycle.Drain()); err != nil {
		add("lifecycle.drainWindow: %v", err)
	}
	if d := c.Lifecycle.ShutdownTimeout; d < 0 || d.D() > time.Hour {
		add("lifecycle.shutdownTimeout: %s is not allowed (allowed: 0s to 1h)", d)
	}
	if c.AdvertiseAddr != "" && net.ParseIP(c.AdvertiseAddr) == nil {
		add("advertiseAddr: %s is not an IP address", policy.Quote(c.AdvertiseAddr))
	}
	if co := c.Discovery.Consul; co != nil && co.Address != "" {
		if err := CheckConsulAddress(co.Address); err != nil {
			add("discovery.consul.address: %v", err)
		}
	}
	if _, err := discovery.NewStatic(c.Discovery.Static); err != nil {
		add("discovery.static: %v", err)
	}
	if _, err := c.InlinePolicies(); err != nil {
		errs = append(errs, err)
	}
	if s := c.AccessLog.Sample; s < 0 || s > 1 {
		add("accessLog.sample: %v is not allowed (allowed: more than 0, at most 1; 0 for 1)", s)
	}
	if err := CheckLogLevel(c.Log.Level); err != nil {
		add("log.level: %v", err)
	}
	switch c.Log.Format {
	case "json", "text":
	default:
		add("log.format: %s (allowed: json, text)", policy.Quote(c.Log.Format))
	}
	return errors.Join(errs...)
}

func checkListenAddr(addr string) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return errors.New("want host:port")
	}
	if host != "" && net.ParseIP(host) == nil && host != "localhost" {
		return errors.New("host must be an IP address or localhost")
	}
	p, err := strconv.Atoi(port)
	if err != nil || p < 0 || p > 65535 {
		return fmt.Errorf("port %s out of range 0-65535", policy.Quote(port))
	}
	return nil
}

// InlinePolicies decodes and validates the inline policies, returning every
// problem with its file, line and index.
func (c *Config) InlinePolicies() ([]policy.Policy, error) {
	var (
		out  []policy.Policy
		errs []error
		seen = map[string]bool{}
	)
	for i := range c.Policies {
		p, err := policy.DecodePolicyNode(&c.Policies[i], c.file, fmt.Sprintf("%s:%d: policies[%d]", c.file, c.Policies[i].Line, i))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if seen[p.Service] {
			errs = append(errs, fmt.Errorf("policies[%d]: service %s has more than one policy", i, policy.Quote(p.Service)))
			continue
		}
		seen[p.Service] = true
		out = append(out, p)
	}
	return out, errors.Join(errs...)
}
