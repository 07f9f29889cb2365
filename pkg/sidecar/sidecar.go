// Package sidecar assembles one sidecar from its configuration and runs it
// from startup to exit: the policy store and its sources, discovery (static
// endpoints, then Consul), tracing, the metrics registry, the outbound proxy
// and its listener (with transparent interception), the inbound proxy in
// front of the app, the app's probes, the health, admin and metrics
// endpoints, and the app's registration in Consul.
//
// Startup. New loads the inline policies and the policy file (either being
// invalid fails it), sets up tracing, starts the Consul endpoint source and
// the policy watches (waiting up to discovery.consul.firstWait for Consul
// KV's first answer), builds the outbound proxy and binds every listener:
// outbound (and the one for redirected IPv6), admin, metrics, health,
// inbound. A port in use fails New before anything is served, and New
// releases what it started. Run then serves every listener, starts the
// startup probe (the liveness and readiness probes start once it passes,
// at once without one), reports the outbound listener up, registers the
// app in Consul with a TTL check that follows readiness, and logs "sidecar
// ready".
//
// Shutdown, when Run's context ends or the admin API asks to quit: drain
// (/healthz/ready and the app's readyz answer 503, the Consul check goes
// critical and the app is deregistered, inbound responses close their
// connections), keep serving for lifecycle.drainWindow, then stop accepting
// and wait up to lifecycle.shutdownTimeout for the requests in flight:
// inbound, then outbound and the TCP passed through, then the admin,
// metrics and health endpoints. Last, the probes stop, the proxies' pools,
// discovery and the policy watches close, and the spans left are flushed
// (for at most 5s).
package sidecar

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/trace"

	"github.com/sidecar-mesh/sidecar/internal/rawio"
	"github.com/sidecar-mesh/sidecar/pkg/admin"
	"github.com/sidecar-mesh/sidecar/pkg/config"
	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/downstream"
	"github.com/sidecar-mesh/sidecar/pkg/engine"
	"github.com/sidecar-mesh/sidecar/pkg/inbound"
	"github.com/sidecar-mesh/sidecar/pkg/mesh"
	"github.com/sidecar-mesh/sidecar/pkg/metrics"
	"github.com/sidecar-mesh/sidecar/pkg/outbound"
	"github.com/sidecar-mesh/sidecar/pkg/requestlog"
	"github.com/sidecar-mesh/sidecar/pkg/tracing"
	"github.com/sidecar-mesh/sidecar/pkg/transparent"
	"github.com/sidecar-mesh/sidecar/pkg/upstream"
)

// Sidecar is one sidecar: its listeners and what serves them. The zero
// value is not usable: build one with New, then call Run once; Run is what
// releases what New started.
type Sidecar struct {
	log      *slog.Logger
	cfg      *config.Config
	version  any
	outbound *downstream.Server
	loops    *engine.Engine // with outboundEngine: loops, what accepts on the outbound socket
	proxy    *outbound.Proxy

	// transparent serves redirected connections under outbound; nil
	// unless transparent.enabled.
	transparent *transparent.Listener

	inbound  *downstream.Server // nil without appPort
	app      *inbound.Proxy     // nil without appPort
	admin    *http.Server
	adminLn  net.Listener
	metrics  *http.Server
	metricLn net.Listener
	health   *http.Server
	healthLn net.Listener
	healthH  *inbound.Health
	probers  []*inbound.Prober
	// readiness is the app's readiness prober; nil (always ready) without
	// one.
	readiness *inbound.Prober
	// startup is the app's startup prober; the others start once it
	// passes. Nil without one.
	startup     *inbound.Prober
	startedOnce sync.Once
	tracing     *tracing.Provider
	requests    *metrics.Requests // nil with requestMetrics off
	recorder    *requestlog.Recorder
	resilience  *resilienceMetrics
	registry    *prometheus.Registry
	static      *discovery.Static
	resolver    discovery.Chain
	consul      *discovery.Consul // nil without Consul
	mesh        *meshSide         // nil outside the mesh
	policies    *policySources    // the policy store and its watched sources
	// registration is the app's in Consul, made once Run serves; its
	// Client is nil when the app is not to be registered.
	registration discovery.RegistrationConfig
	reg          atomic.Pointer[discovery.Registration] // nil when the app is not registered

	ownOnce sync.Once                 // computes own
	own     func(netip.AddrPort) bool // the listeners' addresses; see isOwnEndpoint

	outboundUp atomic.Bool
	drainOnce  sync.Once
	drainMu    sync.Mutex     // guards closing and starting drains
	closing    bool           // shutdown has begun
	drains     sync.WaitGroup // the app's deregistration, which shutdown waits for
	quit       chan struct{}  // closed to shut down as on SIGTERM
	quitOnce   sync.Once
	serving    int // servers whose end is sent on errs
	errs       chan error
}

// Option configures New.
type Option func(*Sidecar)

// WithLogger sets the logger of the sidecar and of everything it builds.
// The default discards.
func WithLogger(log *slog.Logger) Option { return func(s *Sidecar) { s.log = log } }

// WithVersion sets what the admin API's /version answers, as JSON.
func WithVersion(v any) Option { return func(s *Sidecar) { s.version = v } }

// New builds the sidecar of cfg, which must be complete and valid
// (config.Config's WithDefaults and Validate), and binds every listener:
// see the package doc. Nothing is served until Run.
func New(cfg *config.Config, opts ...Option) (_ *Sidecar, err error) {
	s := &Sidecar{cfg: cfg, log: slog.New(slog.DiscardHandler), errs: make(chan error, 8), quit: make(chan struct{})}
	for _, o := range opts {
		o(s)
	}
	log := s.log
	if s.static, err = discovery.NewStatic(cfg.Discovery.Static); err != nil {
		return nil, fmt.Errorf("discovery.static: %w", err)
	}
	if s.policies, err = loadPolicies(cfg, log); err != nil {
		return nil, err
	}
	s.tracing, err = tracing.Setup(context.Background(), tracing.Config{
		Endpoint:    string(cfg.Tracing.Endpoint),
		Protocol:    cfg.Tracing.Protocol,
		Sampler:     cfg.Tracing.Sampler,
		SamplerArg:  cfg.Tracing.SamplerArg,
		Propagators: cfg.Tracing.Propagators,
		Service:     cmp.Or(cfg.Tracing.ServiceName, cfg.Service),
		Logger:      log,
	})
	if err != nil {
		s.policies.close()
		return nil, err
	}
	defer func() {
		if err != nil {
			s.release()
		}
	}()
	s.resolver = discovery.Chain{s.static}
	var kvWatch discovery.PolicyWatchConfig // without a Client: no Consul
	if co := cfg.Discovery.Consul; co != nil && co.Address != "" {
		client, err := discovery.NewClient(discovery.ClientConfig{Address: co.Address, Datacenter: co.Datacenter})
		if err != nil {
			return nil, fmt.Errorf("discovery.consul: %w", err)
		}
		s.consul, err = discovery.NewConsul(discovery.ConsulConfig{
			Client:      client,
			Services:    co.Services,
			WaitTime:    co.WaitTime.D(),
			FirstWait:   co.FirstWait.D(),
			IdleTimeout: co.IdleTimeout.D(),
			CacheFile:   co.CacheFile,
			CacheMaxAge: co.CacheMaxAge.D(),
			Logger:      log,

			AllowLoopbackEndpoints: co.AllowLoopbackEndpoints,
			Mesh:                   cfg.Mesh.On(),
		})
		if err != nil {
			return nil, err
		}
		s.resolver = append(s.resolver, s.consul)
		kvWatch = discovery.PolicyWatchConfig{Client: client, WaitTime: co.WaitTime.D(), Logger: log}
		if r := co.Register; cfg.Service != "" && cfg.AppPort != 0 && !r.Disabled {
			s.registration = discovery.RegistrationConfig{
				Client:                  client,
				Service:                 cfg.Service,
				ID:                      r.ID,
				Address:                 cfg.AdvertiseAddr,
				Tags:                    r.Tags,
				Meta:                    r.Meta,
				TTL:                     r.TTL.D(),
				DeregisterCriticalAfter: r.DeregisterCriticalAfter.D(),
				Ready:                   s.appReady,
				Logger:                  log,
			}
		}
	}

	if err := s.policies.watch(kvWatch, cfg.Discovery.Consul); err != nil {
		return nil, err
	}
	s.registerMetrics()
	if cfg.Mesh.On() {
		if kvWatch.Client == nil {
			return nil, errors.New("mesh: the service mesh needs the Consul agent (discovery.consul.address)")
		}
		if s.mesh, err = s.newMeshSide(discovery.NewMeshAgent(kvWatch.Client)); err != nil {
			return nil, err
		}
	}
	var accessLog *slog.Logger
	if cfg.AccessLog.Enabled {
		accessLog = log.With("component", "access")
	}
	s.recorder = requestlog.New(requestlog.Config{AccessLog: accessLog, Sample: cfg.AccessLog.Sample, FailuresOnly: cfg.AccessLog.FailuresOnly})
	// The address a host name resolves to is checked again when the
	// outbound transport dials it: discovery checked what the name
	// resolved to then, and it may resolve elsewhere now (DNS rebinding).
	// The transport never asks about an IP literal, and that is the line
	// drawn: a static endpoint is an IP address the operator chose, often
	// 127.0.0.1 (the demo's are), and Consul's IP addresses were checked by
	// discovery already. The own-host rule is discovery's, on with Consul
	// unless allowLoopbackEndpoints; a dial cannot tell where a name came
	// from, so an allow-listed host name is held to it too (one that
	// resolves to this host is the same rebinding). The own-listener rule
	// is the chain's IsOwn, which sees only the endpoints that are
	// addresses, applied to what a name resolves to.
	ownHost := s.consul != nil && !cfg.Discovery.Consul.AllowLoopbackEndpoints
	refuseResolved := func(ap netip.AddrPort) string {
		if s.isOwnEndpoint(ap) {
			return "one of the sidecar's own listeners"
		}
		if why := discovery.OwnHostReason(ap.Addr()); ownHost && why != "" {
			return "the sidecar's own host (" + why + "), and discovery.consul.allowLoopbackEndpoints is off"
		}
		return ""
	}
	s.proxy, err = outbound.New(outbound.Config{Resolver: s.resolver, Policies: s.policies.store,
		AllowHosts: cfg.AllowHosts, MaxInFlight: cfg.Limits.OutboundMaxInFlight, Observer: s.resilience,
		Tracer: s.tracer(), Propagator: s.tracing.Propagator(), Metrics: s.requests, Logger: log, Recorder: s.recorder,
		Transport: upstream.TransportConfig{MaxResponseHeaderBytes: cfg.Limits.MaxResponseHeaderBytes, RefuseResolved: refuseResolved},
		IsOwn:     s.isOwnEndpoint, Mesh: s.meshSender()})
	if err != nil {
		return nil, err
	}
	s.resilience.setProxy(s.proxy)
	s.outbound, err = downstream.Listen("outbound", cfg.Listeners.Outbound, s.proxy, downstream.Limits{}, log)
	if err != nil {
		return nil, err
	}
	s.proxy.SetConnServer(s.outbound.ServeConn)
	if cfg.OutboundEngine == config.EngineLoops {
		// The engine accepts on the outbound socket; what it does not
		// serve goes to the listener's server, as a connection of its own.
		srv := s.outbound
		s.loops, err = engine.New(srv.RawListener(), engine.Config{Handler: s.proxy.LoopHandler(), Logger: log.With("component", "engine"),
			Handoff:   func(c net.Conn, buffered []byte) { srv.ServeConn(rawio.Wrap(c), buffered) },
			Transport: upstream.TransportConfig{MaxResponseHeaderBytes: cfg.Limits.MaxResponseHeaderBytes}})
		if err != nil {
			return nil, fmt.Errorf("outbound engine: %w", err)
		}
	}
	if err := s.listenTransparent(); err != nil {
		return nil, err
	}
	s.adminLn, err = net.Listen("tcp", cfg.Listeners.Admin)
	if err != nil {
		return nil, fmt.Errorf("admin listener on %s: %w", cfg.Listeners.Admin, err)
	}
	s.metricLn, err = net.Listen("tcp", cfg.Listeners.Metrics)
	if err != nil {
		return nil, fmt.Errorf("metrics listener on %s: %w", cfg.Listeners.Metrics, err)
	}
	if err := s.listenInbound(); err != nil {
		return nil, err
	}
	s.metrics = controlServer(metrics.Handler(s.registry))
	s.admin = controlServer(admin.Handler(admin.Sources{
		Config:     s.configView,
		Resolver:   s.resolver,
		Version:    s.version,
		Resilience: s.proxy.Status,
		Drain:      s.drainSoon,
		Quit:       s.quitNow,
		Policies:   s.policies.store,
		Requests:   s.recorder,
		Profiling:  true, // loopback clients only
	}))
	s.admin.RegisterOnShutdown(s.recorder.CloseTaps) // the taps' streams end
	return s, nil
}

// configView is what the admin API's /config shows: the configuration in
// force and, in the mesh, this sidecar's identity (never its key).
func (s *Sidecar) configView() any {
	if s.mesh == nil {
		return s.cfg
	}
	st := s.mesh.identity.Status()
	return struct {
		*config.Config
		MeshIdentity *mesh.IdentityStatus `json:"meshIdentity"`
	}{s.cfg, &st}
}

// meshServer is the mesh's inbound TLS listener; nil outside the mesh or
// before it is bound.
func (s *Sidecar) meshServer() *downstream.Server {
	if s.mesh == nil {
		return nil
	}
	return s.mesh.server
}

// meshSender is the outbound proxy's sender to the mesh's endpoints; nil
// outside the mesh.
func (s *Sidecar) meshSender() outbound.MeshSender {
	if s.mesh == nil {
		return nil
	}
	return s.mesh.transport
}

// release closes what New started, when New fails.
func (s *Sidecar) release() {
	_ = s.tracing.Shutdown(context.Background())
	for _, ln := range []interface{ Close() error }{s.adminLn, s.metricLn, s.healthLn} {
		if ln != nil {
			_ = ln.Close()
		}
	}
	for _, srv := range []*downstream.Server{s.outbound, s.inbound, s.meshServer()} {
		if srv != nil {
			_ = srv.Listener.Close()
		}
	}
	if s.mesh != nil {
		s.mesh.stop()
	}
	if s.loops != nil {
		_ = s.loops.Close()
	}
	if s.proxy != nil {
		s.proxy.Close()
	}
	s.recorder.Close()
	if s.consul != nil {
		s.consul.Close()
	}
	s.policies.close()
}

// register keeps the app registered in Consul, at the advertise address
// and the inbound port, with a TTL check fed by readiness; in the mesh,
// its sidecar proxy too, at the mesh's TLS port.
func (s *Sidecar) register() error {
	rc := s.registration
	if rc.Address == "" {
		return errors.New("no advertise address (set --advertise-addr or POD_IP)")
	}
	_, port, err := net.SplitHostPort(s.cfg.Listeners.Inbound)
	if err != nil {
		return err
	}
	rc.Port, _ = strconv.Atoi(port)
	if s.mesh != nil {
		if rc.SidecarProxy, err = s.mesh.sidecarProxy(s.cfg.AppPort); err != nil {
			return fmt.Errorf("the mesh's sidecar proxy: %w", err)
		}
	}
	reg, err := discovery.Register(rc)
	if err != nil {
		return err
	}
	s.reg.Store(reg)
	return nil
}

// tracer is the proxies' tracer: nil when tracing is off, so that they
// make no spans at all.
func (s *Sidecar) tracer() trace.Tracer {
	if !s.tracing.Enabled() {
		return nil
	}
	return s.tracing.Tracer()
}

// controlServer serves the sidecar's own small endpoints (admin, metrics,
// health): short timeouts and small headers, nothing like the proxies'
// limits.
func controlServer(h http.Handler) *http.Server {
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      10 * time.Second,
		IdleTimeout:       60 * time.Second,
		MaxHeaderBytes:    16 << 10,
	}
}
