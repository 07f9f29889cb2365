package main

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

	consulapi "github.com/hashicorp/consul/api"
	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/trace"

	"github.com/sidecar-mesh/sidecar/pkg/admin"
	"github.com/sidecar-mesh/sidecar/pkg/config"
	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/inbound"
	"github.com/sidecar-mesh/sidecar/pkg/metrics"
	"github.com/sidecar-mesh/sidecar/pkg/outbound"
	"github.com/sidecar-mesh/sidecar/pkg/panics"
	"github.com/sidecar-mesh/sidecar/pkg/proxyhttp"
	"github.com/sidecar-mesh/sidecar/pkg/tracing"
	"github.com/sidecar-mesh/sidecar/pkg/transparent"
)

// sidecar is one running instance: its listeners and what serves them.
type sidecar struct {
	log      *slog.Logger
	cfg      *config.Config
	outbound *proxyhttp.Server
	proxy    *outbound.Proxy

	// transparent serves redirected connections under outbound; nil
	// unless transparent.enabled.
	transparent *transparent.Listener

	inbound  *proxyhttp.Server // nil without appPort
	app      *inbound.Proxy    // nil without appPort
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
	resilience  *resilienceMetrics
	registry    *prometheus.Registry
	consul      *discovery.Consul                      // nil without Consul
	policies    *policySources                         // the policy store and its watched sources
	reg         atomic.Pointer[discovery.Registration] // nil when the app is not registered

	ownOnce sync.Once                 // computes own
	own     func(netip.AddrPort) bool // the listeners' addresses; see isOwnEndpoint

	outboundUp atomic.Bool
	drainOnce  sync.Once
	quit       chan struct{} // closed to shut down as on SIGTERM
	quitOnce   sync.Once
	serving    int // servers whose end is sent on errs
	errs       chan error
}

// start binds every listener first (so a port in use fails fast, before
// anything is served) and then serves them.
func start(cfg *config.Config, log *slog.Logger) (_ *sidecar, err error) {
	static, err := discovery.NewStatic(cfg.Discovery.Static)
	if err != nil {
		return nil, fmt.Errorf("discovery.static: %w", err)
	}
	policies, err := loadPolicies(cfg, log)
	if err != nil {
		return nil, err
	}
	s := &sidecar{log: log, cfg: cfg, policies: policies, errs: make(chan error, 8), quit: make(chan struct{})}
	panics.SetLogger(log)
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
		policies.close()
		return nil, err
	}
	defer func() {
		if err == nil {
			return
		}
		_ = s.tracing.Shutdown(context.Background())
		for _, ln := range []interface{ Close() error }{s.adminLn, s.metricLn, s.healthLn} {
			if ln != nil {
				_ = ln.Close()
			}
		}
		for _, srv := range []*proxyhttp.Server{s.outbound, s.inbound} {
			if srv != nil {
				_ = srv.Listener.Close()
			}
		}
		if s.proxy != nil {
			s.proxy.Close()
		}
		if s.consul != nil {
			s.consul.Close()
		}
		s.policies.close()
	}()
	resolver := discovery.Chain{static}
	var client *consulapi.Client
	if co := cfg.Discovery.Consul; co != nil && co.Address != "" {
		client, err = consulClient(co)
		if err != nil {
			return nil, err
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
		})
		if err != nil {
			return nil, err
		}
		resolver = append(resolver, s.consul)
	}

	if err := s.policies.watch(client, cfg.Discovery.Consul); err != nil {
		return nil, err
	}
	reg := newRegistry(resolver)
	if s.consul != nil {
		reg.MustRegister(droppedCollector{s.consul})
	}
	reg.MustRegister(policyCollector{store: s.policies.store})
	resilience := newResilienceMetrics(reg)
	s.resilience, s.registry = resilience, reg
	if cfg.RequestMetrics == nil || *cfg.RequestMetrics {
		s.requests = metrics.NewRequests(reg)
	}
	reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "sidecar_tracing_dropped_spans_total",
		Help: "Sampled spans dropped: export queue full or the collector unreachable."},
		func() float64 { return float64(s.tracing.Dropped()) }))
	s.proxy, err = outbound.New(outbound.Config{Resolver: resolver, Policies: s.policies.store,
		AllowHosts: cfg.AllowHosts, MaxInFlight: cfg.Limits.OutboundMaxInFlight, Observer: resilience,
		Tracer: s.tracer(), Propagator: s.tracing.Propagator(), Metrics: s.requests, Logger: log,
		Transport: proxyhttp.TransportConfig{MaxResponseHeaderBytes: cfg.Limits.MaxResponseHeaderBytes},
		IsOwn:     s.isOwnEndpoint})
	if err != nil {
		return nil, err
	}
	resilience.setProxy(s.proxy)
	s.outbound, err = proxyhttp.Listen("outbound", cfg.Listeners.Outbound, s.proxy, proxyhttp.Limits{}, log)
	if err != nil {
		return nil, err
	}
	s.proxy.SetConnServer(s.outbound.ServeConn)
	if err := s.startTransparent(cfg, resolver, reg); err != nil {
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
	if err := s.startInbound(cfg); err != nil {
		return nil, err
	}
	s.metrics = controlServer(metricsHandler(reg))
	s.admin = controlServer(admin.Handler(admin.Sources{
		Config:     func() any { return cfg },
		Resolver:   resolver,
		Version:    currentBuild(),
		Resilience: func() any { return s.proxy.Status() },
		Drain:      func() { go s.drain(context.Background()) },
		Quit:       s.quitNow,
		Policies:   s.policies.store,
		Profiling:  true, // loopback clients only
	}))
	s.serve()

	if client != nil && cfg.Service != "" && cfg.AppPort != 0 && !cfg.Discovery.Consul.Register.Disabled {
		if err := s.register(cfg, client); err != nil {
			log.Warn("not registering the app in Consul", "reason", err.Error())
		}
	}
	inboundAddr := ""
	if s.inbound != nil {
		inboundAddr = s.inbound.Addr().String()
	}
	log.Info("sidecar ready", "outbound", s.outbound.Addr().String(), "inbound", inboundAddr,
		"admin", s.adminLn.Addr().String(), "health", s.healthLn.Addr().String(), "metrics", s.metricLn.Addr().String(),
		"probes", len(s.probers), "static_services", len(static.Services()), "consul", s.consul != nil,
		"registered", s.reg.Load() != nil)
	return s, nil
}

// register keeps the app registered in Consul, at the advertise address
// and the inbound port, with a TTL check fed by readiness.
func (s *sidecar) register(cfg *config.Config, client *consulapi.Client) error {
	if cfg.AdvertiseAddr == "" {
		return errors.New("no advertise address (set --advertise-addr or POD_IP)")
	}
	_, portStr, err := net.SplitHostPort(cfg.Listeners.Inbound)
	if err != nil {
		return err
	}
	port, _ := strconv.Atoi(portStr)
	r := cfg.Discovery.Consul.Register
	reg, err := discovery.Register(discovery.RegistrationConfig{
		Client:                  client,
		Service:                 cfg.Service,
		ID:                      r.ID,
		Address:                 cfg.AdvertiseAddr,
		Port:                    port,
		Tags:                    r.Tags,
		Meta:                    r.Meta,
		TTL:                     r.TTL.D(),
		DeregisterCriticalAfter: r.DeregisterCriticalAfter.D(),
		Ready:                   s.appReady,
		Logger:                  s.log,
	})
	if err != nil {
		return err
	}
	s.reg.Store(reg)
	return nil
}

// tracer is the proxies' tracer: nil when tracing is off, so that they
// make no spans at all.
func (s *sidecar) tracer() trace.Tracer {
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

// consulClient builds a client from the standard CONSUL_* environment
// (token, TLS) with the configured address and datacenter.
func consulClient(co *config.Consul) (*consulapi.Client, error) {
	cc := consulapi.DefaultConfig()
	cc.Address = co.Address
	if co.Datacenter != "" {
		cc.Datacenter = co.Datacenter
	}
	c, err := consulapi.NewClient(cc)
	if err != nil {
		return nil, fmt.Errorf("discovery.consul: %w", err)
	}
	return c, nil
}
