package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/sidecar-mesh/sidecar/pkg/config"
	"github.com/sidecar-mesh/sidecar/pkg/panics"
	"github.com/sidecar-mesh/sidecar/pkg/policy"
	"github.com/sidecar-mesh/sidecar/pkg/redact"
	"github.com/sidecar-mesh/sidecar/pkg/sidecar"
)

// setting is one configuration key as a flag and an environment variable.
// The environment variable is SIDECAR_ and the flag name in upper case with
// '-' as '_', plus any standard names in env. Flags beat the environment,
// the environment beats the config file.
type setting struct {
	flag  string
	usage string
	// key is the config file's key (empty: the setting has none); def is
	// the default, as shown.
	key, def string
	env      []string // standard variables read too, after SIDECAR_*
	// list settings may repeat; in the environment, entries are separated
	// by sep.
	list bool
	sep  string
	// reset, if set, clears the file's value before a list from a flag or
	// the environment is applied, so that list replaces it.
	reset func(c *config.Config)
	set   func(c *config.Config, v string) error
}

func (s setting) envName() string {
	return "SIDECAR_" + strings.ToUpper(strings.ReplaceAll(s.flag, "-", "_"))
}

// sources says, for --help, where else the setting comes from and its
// default.
func (s setting) sources() []string {
	var out []string
	if s.key != "" {
		out = append(out, "key "+s.key)
	}
	out = append(out, "env "+strings.Join(append([]string{s.envName()}, s.env...), ", "))
	if s.def != "" {
		out = append(out, "default "+s.def)
	}
	return out
}

var settings = []setting{
	{flag: "service", usage: "name of the app this sidecar fronts: its Consul service name and span service.name", key: "service",
		set: func(c *config.Config, v string) error { c.Service = v; return nil }},
	{flag: "app-port", usage: "port of the app on 127.0.0.1, for inbound traffic and probes", key: "appPort",
		set: func(c *config.Config, v string) error {
			p, err := strconv.Atoi(v)
			if err != nil {
				return fmt.Errorf("want a port number, got %q", v)
			}
			c.AppPort = p
			return nil
		}},
	{flag: "advertise-addr", usage: "IP address peers reach this pod at, registered in Consul", key: "advertiseAddr",
		env: []string{"POD_IP"},
		set: func(c *config.Config, v string) error { c.AdvertiseAddr = v; return nil }},
	{flag: "outbound-addr", usage: "address of the outbound proxy the app calls", key: "listeners.outbound", def: config.DefaultOutbound,
		set: func(c *config.Config, v string) error { c.Listeners.Outbound = v; return nil }},
	{flag: "inbound-addr", usage: "address of the inbound proxy in front of the app", key: "listeners.inbound", def: config.DefaultInbound,
		set: func(c *config.Config, v string) error { c.Listeners.Inbound = v; return nil }},
	{flag: "admin-addr", usage: "address of the admin API", key: "listeners.admin", def: config.DefaultAdmin,
		set: func(c *config.Config, v string) error { c.Listeners.Admin = v; return nil }},
	{flag: "allow-non-loopback-admin", usage: "let the admin API listen on an address other than loopback, true or false; deliberately no key: a config file can't open the admin API to the network", def: "false",
		set: func(c *config.Config, v string) error { return setBool(v, &c.AllowNonLoopbackAdmin) }},
	{flag: "health-addr", usage: "address of the health endpoints for the kubelet", key: "listeners.health", def: config.DefaultHealth,
		set: func(c *config.Config, v string) error { c.Listeners.Health = v; return nil }},
	{flag: "metrics-addr", usage: "address of the Prometheus metrics endpoint", key: "listeners.metrics", def: config.DefaultMetrics,
		set: func(c *config.Config, v string) error { c.Listeners.Metrics = v; return nil }},
	{flag: "consul-addr", usage: "host:port of the Consul agent's HTTP API; empty: static endpoints only", key: "discovery.consul.address",
		env: []string{"CONSUL_HTTP_ADDR"},
		set: func(c *config.Config, v string) error {
			if c.Discovery.Consul == nil {
				c.Discovery.Consul = &config.Consul{}
			}
			c.Discovery.Consul.Address = v
			return nil
		}},
	{flag: "consul-allow-loopback-endpoints", usage: "use Consul instances at loopback, link-local or unspecified addresses, or at host names resolving to one (the sidecar's own host), true or false", key: "discovery.consul.allowLoopbackEndpoints", def: "false",
		set: func(c *config.Config, v string) error {
			if c.Discovery.Consul == nil {
				c.Discovery.Consul = &config.Consul{}
			}
			return setBool(v, &c.Discovery.Consul.AllowLoopbackEndpoints)
		}},
	{flag: "static", list: true, sep: ";",
		usage: "static endpoints of a service as SERVICE=IP:PORT[,IP:PORT...]; repeatable; replaces the config file's entry for SERVICE; in the environment separated by ';'", key: "discovery.static",
		set: func(c *config.Config, v string) error {
			name, addrs, ok := strings.Cut(v, "=")
			if !ok || name == "" {
				return fmt.Errorf("want SERVICE=IP:PORT[,IP:PORT...], got %q", v)
			}
			if c.Discovery.Static == nil {
				c.Discovery.Static = map[string][]string{}
			}
			var list []string
			for _, a := range strings.Split(addrs, ",") {
				if a = strings.TrimSpace(a); a != "" {
					list = append(list, a)
				}
			}
			c.Discovery.Static[strings.TrimSpace(name)] = list
			return nil
		}},
	{flag: "allow-host", list: true, sep: ",",
		usage: "external host or host:port the app may reach directly through the outbound port (DNS, IP literals, CONNECT); repeatable; in the environment separated by ','", key: "allowHosts",
		reset: func(c *config.Config) { c.AllowHosts = nil },
		set: func(c *config.Config, v string) error {
			if v = strings.TrimSpace(v); v != "" {
				c.AllowHosts = append(c.AllowHosts, v)
			}
			return nil
		}},
	{flag: "policy-file", usage: "file of Policy documents, reloaded when it changes", key: "policyFile",
		set: func(c *config.Config, v string) error { c.PolicyFile = v; return nil }},
	{flag: "outbound-max-in-flight", usage: "most outbound requests in flight, all services together; over it 503 overloaded", key: "limits.outboundMaxInFlight", def: "10000",
		set: func(c *config.Config, v string) error {
			n, err := strconv.Atoi(v)
			if err != nil {
				return fmt.Errorf("want a number, got %q", v)
			}
			c.Limits.OutboundMaxInFlight = n
			return nil
		}},
	{flag: "inbound-max-in-flight", usage: "most inbound requests in flight to the app; over it 503 overloaded", key: "limits.inboundMaxInFlight", def: "1024",
		set: func(c *config.Config, v string) error {
			n, err := strconv.Atoi(v)
			if err != nil {
				return fmt.Errorf("want a number, got %q", v)
			}
			c.Limits.InboundMaxInFlight = n
			return nil
		}},
	{flag: "max-response-header-bytes", usage: "largest status line and header block accepted from an upstream or the app; over it 502 upstream_bad_response", key: "limits.maxResponseHeaderBytes", def: "65536",
		set: func(c *config.Config, v string) error {
			n, err := strconv.Atoi(v)
			if err != nil {
				return fmt.Errorf("want a number, got %q", v)
			}
			c.Limits.MaxResponseHeaderBytes = n
			return nil
		}},
	{flag: "transparent", usage: "serve connections redirected to the outbound port by 'sidecar iptables': route HTTP by Host, then by the original destination; pass other TCP through, true or false", key: "transparent.enabled", def: "false",
		set: func(c *config.Config, v string) error { return setBool(v, &c.Transparent.Enabled) }},
	{flag: "transparent-ipv6", usage: "with --transparent, also listen on [::1] at the outbound port, where ip6tables redirects, true or false", key: "transparent.ipv6", def: "true",
		set: func(c *config.Config, v string) error {
			c.Transparent.IPv6 = new(bool)
			return setBool(v, c.Transparent.IPv6)
		}},
	{flag: "transparent-sniff-timeout", usage: "how long a redirected connection may stay silent before it is taken for a server-speaks-first protocol and passed through", key: "transparent.sniffTimeout", def: "200ms",
		set: func(c *config.Config, v string) (err error) {
			c.Transparent.SniffTimeout, err = policy.ParseDuration(v)
			return err
		}},
	{flag: "transparent-connect-timeout", usage: "connect timeout of a TCP passthrough to the original destination", key: "transparent.connectTimeout", def: "5s",
		set: func(c *config.Config, v string) (err error) {
			c.Transparent.ConnectTimeout, err = policy.ParseDuration(v)
			return err
		}},
	{flag: "transparent-opaque-ports", usage: "destination ports passed through without sniffing, comma-separated, or none", key: "transparent.opaquePorts", def: "25,587,3306,4444,5432,6379,9300,11211",
		set: func(c *config.Config, v string) (err error) {
			c.Transparent.OpaquePorts, err = config.ParsePorts(v)
			return err
		}},
	{flag: "transparent-tcp-passthrough", usage: "where non-HTTP TCP may go: any, known (endpoints of known services and allowHosts) or none", key: "transparent.tcpPassthrough", def: "any",
		set: func(c *config.Config, v string) error { c.Transparent.TCPPassthrough = v; return nil }},
	{flag: "readiness-probe", usage: "the app's readiness probe as KIND[,key=value...]: KIND is http:/PATH, tcp, grpc or grpc:SERVICE; keys port, status, interval, timeout, initialDelay, failureThreshold, successThreshold", key: "probes.readiness",
		set: func(c *config.Config, v string) (err error) {
			c.Probes.Readiness, err = config.ParseProbe(v)
			return err
		}},
	{flag: "liveness-probe", usage: "the app's liveness probe, as --readiness-probe", key: "probes.liveness",
		set: func(c *config.Config, v string) (err error) {
			c.Probes.Liveness, err = config.ParseProbe(v)
			return err
		}},
	{flag: "startup-probe", usage: "the app's startup probe, as --readiness-probe", key: "probes.startup",
		set: func(c *config.Config, v string) (err error) { c.Probes.Startup, err = config.ParseProbe(v); return err }},
	{flag: "drain-window", usage: "how long after SIGTERM the sidecar keeps serving while it reports not ready and is deregistered; 0s: none", key: "lifecycle.drainWindow", def: "5s",
		set: func(c *config.Config, v string) (err error) {
			d, err := policy.ParseDuration(v)
			c.Lifecycle.DrainWindow = &d
			return err
		}},
	{flag: "shutdown-timeout", usage: "the longest wait for in-flight requests after the drain window", key: "lifecycle.shutdownTimeout", def: "20s",
		set: func(c *config.Config, v string) (err error) {
			c.Lifecycle.ShutdownTimeout, err = policy.ParseDuration(v)
			return err
		}},
	{flag: "tracing-endpoint", usage: "OTLP collector for spans, host:port or URL; empty: tracing off", key: "tracing.endpoint",
		env: []string{"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"},
		set: func(c *config.Config, v string) error { c.Tracing.Endpoint = redact.URL(v); return nil }},
	{flag: "tracing-protocol", usage: "OTLP protocol: grpc or http/protobuf", key: "tracing.protocol", def: "grpc",
		env: []string{"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"},
		set: func(c *config.Config, v string) error { c.Tracing.Protocol = v; return nil }},
	{flag: "tracing-sampler", usage: "sampler: always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off, parentbased_traceidratio", key: "tracing.sampler", def: "parentbased_traceidratio",
		env: []string{"OTEL_TRACES_SAMPLER"},
		set: func(c *config.Config, v string) error { c.Tracing.Sampler = v; return nil }},
	{flag: "tracing-sampler-arg", usage: "ratio of the ratio samplers, 0 to 1", key: "tracing.samplerArg", def: "0.01",
		env: []string{"OTEL_TRACES_SAMPLER_ARG"},
		set: func(c *config.Config, v string) error {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				return fmt.Errorf("want a number from 0 to 1, got %q", v)
			}
			c.Tracing.SamplerArg = f
			return nil
		}},
	{flag: "tracing-propagators", list: true, sep: ",",
		usage: "trace header formats: tracecontext, baggage, b3, b3multi, jaeger, xray, ottrace; repeatable", key: "tracing.propagators", def: "tracecontext,baggage",
		env:   []string{"OTEL_PROPAGATORS"},
		reset: func(c *config.Config) { c.Tracing.Propagators = nil },
		set: func(c *config.Config, v string) error {
			if v = strings.TrimSpace(v); v != "" {
				c.Tracing.Propagators = append(c.Tracing.Propagators, v)
			}
			return nil
		}},
	{flag: "tracing-service-name", usage: "service.name of the spans", key: "tracing.serviceName", def: "service",
		env: []string{"OTEL_SERVICE_NAME"},
		set: func(c *config.Config, v string) error { c.Tracing.ServiceName = v; return nil }},
	{flag: "outbound-engine", usage: "what serves the outbound listener's plain HTTP/1.1 requests: goroutines, or loops (event loops, one per CPU; experimental; not with --transparent)", key: "outboundEngine", def: "goroutines",
		set: func(c *config.Config, v string) error { c.OutboundEngine = v; return nil }},
	{flag: "request-metrics", usage: "per-request metrics, true or false", key: "requestMetrics", def: "true",
		set: func(c *config.Config, v string) error {
			c.RequestMetrics = new(bool)
			return setBool(v, c.RequestMetrics)
		}},
	{flag: "access-log", usage: "one JSON line per outbound request, true or false", key: "accessLog.enabled", def: "false",
		set: func(c *config.Config, v string) error { return setBool(v, &c.AccessLog.Enabled) }},
	{flag: "access-log-sample", usage: "share of requests the access log writes, more than 0 and at most 1", key: "accessLog.sample", def: "1",
		set: func(c *config.Config, v string) error {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil || f <= 0 || f > 1 {
				return fmt.Errorf("want a number more than 0 and at most 1, got %q", v)
			}
			c.AccessLog.Sample = f
			return nil
		}},
	{flag: "access-log-failures-only", usage: "the access log writes failed requests only, true or false", key: "accessLog.failuresOnly", def: "false",
		set: func(c *config.Config, v string) error { return setBool(v, &c.AccessLog.FailuresOnly) }},
	{flag: "mesh", usage: "the service mesh: off, or consul-connect (identity, mutual TLS and intentions from the Consul agent)", key: "mesh.mode", def: "off",
		set: func(c *config.Config, v string) error { c.Mesh.Mode = v; return nil }},
	{flag: "mesh-inbound-tls", usage: "the mesh's mutual-TLS inbound listener, registered as the app's sidecar proxy", key: "mesh.inboundTLS", def: config.DefaultMeshInboundTLS,
		set: func(c *config.Config, v string) error { c.Mesh.InboundTLS = v; return nil }},
	{flag: "mesh-plaintext-inbound", usage: "in the mesh, deny (the plaintext inbound listener serves loopback callers only) or allow", key: "mesh.plaintextInbound", def: "deny",
		set: func(c *config.Config, v string) error { c.Mesh.PlaintextInbound = v; return nil }},
	{flag: "log-level", usage: "debug, info, warn or error", key: "log.level", def: "info",
		set: func(c *config.Config, v string) error { c.Log.Level = v; return nil }},
	{flag: "log-format", usage: "json or text", key: "log.format", def: "json",
		set: func(c *config.Config, v string) error { c.Log.Format = v; return nil }},
}

// runOptions are the inputs of `sidecar run`.
type runOptions struct {
	configFile string
	// base is the configuration without a file; nil: the empty one, and
	// run says so once (`sidecar demo` has its own).
	base    func() *config.Config
	flags   *pflag.FlagSet
	scalars map[string]*string
	lists   map[string]*[]string
	getenv  func(string) string
	stdout  io.Writer
	stderr  io.Writer

	cfg    *config.Config // set by complete
	noFile bool           // set by complete: no file, no base
}

func newRunOptions(stdout, stderr io.Writer, getenv func(string) string) *runOptions {
	return &runOptions{
		scalars: map[string]*string{},
		lists:   map[string]*[]string{},
		getenv:  getenv,
		stdout:  stdout,
		stderr:  stderr,
	}
}

// addFlags registers --config and one flag per setting.
func (o *runOptions) addFlags(fs *pflag.FlagSet) {
	o.flags = fs
	without := "no services but those given by flags and the environment"
	if o.base != nil {
		without = "the demo's"
	}
	fs.StringVarP(&o.configFile, "config", "c", "", "configuration file (YAML); without it, "+without+" (env SIDECAR_CONFIG)")
	for _, s := range settings {
		usage := s.usage + " (" + strings.Join(s.sources(), ", ") + ")"
		if s.list {
			o.lists[s.flag] = fs.StringArray(s.flag, nil, usage)
		} else {
			o.scalars[s.flag] = fs.String(s.flag, "", usage)
			if s.def == "true" || s.def == "false" {
				// A switch: --access-log alone says true, as kubectl's and
				// sidecar inject's do; --access-log=false turns it off.
				fs.Lookup(s.flag).NoOptDefVal = "true"
			}
		}
	}
}

// complete loads the config file and layers the environment and flags on it.
func (o *runOptions) complete() (err error) {
	file := o.configFile
	if !o.flags.Changed("config") {
		file = o.getenv("SIDECAR_CONFIG")
	}
	var cfg *config.Config
	if file == "" && o.base != nil {
		cfg = o.base()
	} else if cfg, err = config.Load(file); err != nil {
		return err
	}
	o.noFile = file == "" && o.base == nil
	for _, s := range settings {
		var values []string
		var from string
		switch {
		case o.flags.Changed(s.flag) && s.list:
			values, from = *o.lists[s.flag], "--"+s.flag
		case o.flags.Changed(s.flag):
			values, from = []string{*o.scalars[s.flag]}, "--"+s.flag
		default:
			for _, name := range append([]string{s.envName()}, s.env...) {
				if v := o.getenv(name); v != "" {
					values, from = []string{v}, name
					if s.list {
						values = strings.Split(v, s.sep)
					}
					break
				}
			}
		}
		if from == "" {
			continue
		}
		if s.reset != nil {
			s.reset(cfg)
		}
		for _, v := range values {
			if err := s.set(cfg, v); err != nil {
				return fmt.Errorf("%s: %w", from, err)
			}
		}
	}
	cfg.WithDefaults()
	o.cfg = cfg
	return nil
}

func (o *runOptions) validate() error {
	if err := o.cfg.Validate(); err != nil {
		return fmt.Errorf("invalid configuration:\n%w", err)
	}
	return nil
}

// run starts the sidecar and serves until ctx ends, then shuts down. The
// drain window and the shutdown timeout bound the shutdown; a second
// signal ends the process at once (see main).
func (o *runOptions) run(ctx context.Context) error {
	log := newLogger(o.stderr, o.cfg.Log)
	if o.noFile {
		sayNoConfigFile(log, o.cfg)
	}
	panics.SetLogger(log)
	sc, err := sidecar.New(o.cfg, sidecar.WithLogger(log), sidecar.WithVersion(currentBuild()))
	if err != nil {
		return err
	}
	return sc.Run(ctx)
}

// sayNoConfigFile logs, once at startup, that run has no config file and
// where its services come from, if from anywhere.
func sayNoConfigFile(log *slog.Logger, cfg *config.Config) {
	const what = "no config file (--config, SIDECAR_CONFIG)"
	static := len(cfg.Discovery.Static)
	consul := cfg.Discovery.Consul != nil && cfg.Discovery.Consul.Address != ""
	if static == 0 && !consul {
		log.Warn(what + ": no services are known until one is given, or --static, or a Consul address (--consul-addr, CONSUL_HTTP_ADDR)")
		return
	}
	log.Info(what+": services from flags and the environment only", "static", static, "consul", consul)
}

func newRunCommand(stdout, stderr io.Writer, getenv func(string) string) *cobra.Command {
	o := newRunOptions(stdout, stderr, getenv)
	cmd := &cobra.Command{
		Use:   "run",
		Short: "Run the proxy",
		Long: `Run the sidecar: the outbound proxy the app calls on 127.0.0.1:15001 and the
admin API on 127.0.0.1:15000.

Configuration comes from --config FILE, then the environment (SIDECAR_*,
CONSUL_HTTP_ADDR), then flags: flags beat the environment, the environment
beats the file. Without a file the sidecar knows only the services that flags
(--static, --consul-addr) and the environment give it, and says so once in its
log; "sidecar demo" runs it with example services.`,
		Args: func(cmd *cobra.Command, args []string) error {
			for _, a := range args {
				if _, err := strconv.ParseBool(a); err == nil {
					// A switch takes its value after '=': written alone it
					// means true, and the word after it is an argument.
					return fmt.Errorf("unexpected argument %q: give a switch its value with '=', as --request-metrics=%s (alone, --request-metrics means true)", a, a)
				}
			}
			return cobra.NoArgs(cmd, args)
		},
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := o.complete(); err != nil {
				return err
			}
			if err := o.validate(); err != nil {
				return err
			}
			return o.run(cmd.Context())
		},
	}
	o.addFlags(cmd.Flags())
	return cmd
}

// setBool sets *dst from a flag's or variable's true or false.
func setBool(v string, dst *bool) error {
	b, err := strconv.ParseBool(v)
	if err != nil {
		return fmt.Errorf("want true or false, got %q", v)
	}
	*dst = b
	return nil
}

func newLogger(w io.Writer, c config.Log) *slog.Logger {
	var level slog.Level
	_ = level.UnmarshalText([]byte(c.Level))
	opts := &slog.HandlerOptions{Level: level}
	if c.Format == "text" {
		return slog.New(slog.NewTextHandler(w, opts))
	}
	return slog.New(slog.NewJSONHandler(w, opts))
}
