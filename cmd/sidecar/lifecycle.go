package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/sidecar-mesh/sidecar/pkg/config"
	"github.com/sidecar-mesh/sidecar/pkg/inbound"
	"github.com/sidecar-mesh/sidecar/pkg/proxyhttp"
)

// startInbound binds the inbound proxy in front of the app (when appPort is
// set) and builds the app's probers and the health endpoints. Nothing is
// served or probed until serve.
func (s *sidecar) startInbound(cfg *config.Config) error {
	var err error
	appAddr := net.JoinHostPort("127.0.0.1", strconv.Itoa(cfg.AppPort))
	newProber := func(name string, c *config.Probe, initiallyOK bool, onChange func(bool)) (*inbound.Prober, error) {
		if c == nil {
			return nil, nil
		}
		p, err := inboundProbe(c)
		if err != nil {
			return nil, fmt.Errorf("probes.%s: %w", name, err)
		}
		pr, err := inbound.NewProber(inbound.ProberConfig{Name: name, Probe: p, AppAddr: appAddr,
			InitiallyOK: initiallyOK, OnChange: onChange, Logger: s.log})
		if err != nil {
			return nil, fmt.Errorf("probes.%s: %w", name, err)
		}
		s.probers = append(s.probers, pr)
		return pr, nil
	}
	// App readiness feeds the Consul check at once, so peers stop routing
	// to an unready app within one probe interval.
	refresh := func(bool) {
		if reg := s.reg.Load(); reg != nil {
			reg.Refresh()
		}
	}
	if s.readiness, err = newProber("readiness", cfg.Probes.Readiness, false, refresh); err != nil {
		return err
	}
	liveness, err := newProber("liveness", cfg.Probes.Liveness, true, nil)
	if err != nil {
		return err
	}
	// As the kubelet does, liveness and readiness probing waits for the
	// startup probe to pass once.
	startup, err := newProber("startup", cfg.Probes.Startup, false, func(ok bool) {
		if ok {
			s.startedOnce.Do(s.startProbers)
		}
	})
	if err != nil {
		return err
	}
	s.startup = startup
	for _, p := range []struct {
		name   string
		prober *inbound.Prober
	}{{"readiness", s.readiness}, {"liveness", liveness}, {"startup", startup}} {
		if p.prober != nil {
			s.registry.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "sidecar_app_probe_passing",
				Help: "1 while the app passes the probe (after its thresholds), else 0.", ConstLabels: prometheus.Labels{"probe": p.name}},
				func() float64 { return b2f(p.prober.OK()) }))
		}
	}
	s.registry.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "sidecar_ready",
		Help: "1 while /healthz/ready answers 200: outbound up, the app ready, no drain."},
		func() float64 { return b2f(len(s.healthH.Ready()) == 0) }))
	s.healthH = inbound.NewHealthHandler(inbound.HealthConfig{
		Sidecar: []inbound.Check{{Name: "outbound", Err: func() error {
			if !s.outboundUp.Load() {
				return errors.New("the outbound listener is not serving yet")
			}
			return nil
		}}},
		Liveness:  liveness,
		Readiness: s.readiness,
		Startup:   startup,
		Logger:    s.log,
	})
	s.healthLn, err = net.Listen("tcp", cfg.Listeners.Health)
	if err != nil {
		return fmt.Errorf("health listener on %s: %w", cfg.Listeners.Health, err)
	}
	s.health = controlServer(s.healthH)
	if cfg.AppPort == 0 {
		return nil
	}
	var observer inbound.Observer
	if s.tracing.Enabled() || s.requests != nil {
		observer = inbound.NewTelemetry(s.tracer(), s.tracing.Propagator(), s.requests, cfg.Service)
	}
	s.app, err = inbound.New(inbound.Config{AppAddr: appAddr, Service: cfg.Service,
		MaxInFlight: cfg.Limits.InboundMaxInFlight, Observer: observer, Logger: s.log,
		Transport: proxyhttp.TransportConfig{MaxResponseHeaderBytes: cfg.Limits.MaxResponseHeaderBytes}})
	if err == nil {
		s.resilience.setInbound(s.app)
	}
	if err != nil {
		return err
	}
	s.inbound, err = proxyhttp.Listen("inbound", cfg.Listeners.Inbound, s.app, proxyhttp.Limits{}, s.log)
	return err
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// inboundProbe maps a configured probe onto pkg/inbound's.
func inboundProbe(c *config.Probe) (inbound.Probe, error) {
	p := inbound.Probe{
		TCP:              c.TCP,
		Port:             c.Port,
		InitialDelay:     c.InitialDelay.D(),
		Interval:         c.Interval.D(),
		Timeout:          c.Timeout.D(),
		SuccessThreshold: c.SuccessThreshold,
		FailureThreshold: c.FailureThreshold,
	}
	if c.HTTP != "" {
		lo, hi, err := c.StatusRange()
		if err != nil {
			return p, err
		}
		p.HTTP = &inbound.HTTPProbe{Path: string(c.HTTP), StatusMin: lo, StatusMax: hi}
		if len(c.Headers) > 0 {
			p.HTTP.Headers = http.Header{}
			for k, v := range c.Headers {
				p.HTTP.Headers.Set(k, v)
			}
		}
	}
	if c.GRPC != nil {
		p.GRPC = &inbound.GRPCProbe{Service: *c.GRPC}
	}
	return p.WithDefaults(), p.Validate()
}

// appReady is what the Consul check reports: the app passes its readiness
// probe (or has none) and the sidecar is not draining.
func (s *sidecar) appReady() bool {
	return s.outboundUp.Load() && !s.healthH.Draining() && s.readiness.OK()
}

// serve starts every listener's server and the probers.
func (s *sidecar) serve() {
	s.goServe(s.outbound.Serve)
	if s.inbound != nil {
		s.goServe(s.inbound.Serve)
	}
	for _, srv := range []struct {
		s  *http.Server
		ln net.Listener
	}{{s.admin, s.adminLn}, {s.metrics, s.metricLn}, {s.health, s.healthLn}} {
		s.goServe(func() error { return srv.s.Serve(srv.ln) })
	}
	if s.startup != nil {
		s.startup.Start()
	} else {
		s.startedOnce.Do(s.startProbers)
	}
	s.outboundUp.Store(true)
}

// startProbers starts the app's probes other than the startup probe.
func (s *sidecar) startProbers() {
	for _, p := range s.probers {
		if p != s.startup {
			p.Start()
		}
	}
}

// goServe runs serve until its server is shut down; shutdown collects the
// results.
func (s *sidecar) goServe(serve func() error) {
	s.serving++
	go func() {
		if err := serve(); !errors.Is(err, http.ErrServerClosed) {
			s.errs <- err
			return
		}
		s.errs <- nil
	}()
}

// drain starts draining, once: /healthz/ready and the app's readyz answer
// 503, the Consul check goes critical and the app is deregistered, and
// inbound responses carry Connection: close so that clients move to other
// instances. Everything keeps serving.
func (s *sidecar) drain(ctx context.Context) {
	s.drainOnce.Do(func() {
		s.log.Info("draining: reporting not ready and deregistering")
		s.healthH.Drain()
		if s.inbound != nil {
			s.inbound.SetKeepAlivesEnabled(false)
		}
		if reg := s.reg.Load(); reg != nil {
			if err := reg.Deregister(ctx); err != nil {
				s.log.Warn("deregistering from Consul", "error", err.Error())
			}
		}
	})
}

// quit asks run to shut down, as SIGTERM does.
func (s *sidecar) quitNow() { s.quitOnce.Do(func() { close(s.quit) }) }

// shutdown drains, keeps serving the app's inbound and outbound traffic for
// the drain window, then stops accepting and waits for in-flight requests
// until ctx ends, and releases everything. No accepted request is dropped
// unless ctx ends first.
func (s *sidecar) shutdown(ctx context.Context) error {
	s.drain(ctx)
	if w := s.cfg.Lifecycle.DrainWindow.D(); w > 0 {
		s.log.Info("drain window", "for", w.String())
		t := time.NewTimer(w)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
		}
	}
	wait, cancel := context.WithTimeout(ctx, s.cfg.Lifecycle.ShutdownTimeout.D())
	defer cancel()
	s.log.Info("closing listeners and waiting for in-flight requests", "inbound", s.inFlightInbound(), "outbound", s.proxy.InFlight())
	var err error
	if s.inbound != nil {
		err = errors.Join(err, s.inbound.Shutdown(wait), s.app.Wait(wait))
	}
	err = errors.Join(err, s.outbound.Shutdown(wait), s.shutdownTransparent(wait))
	s.outboundUp.Store(false)
	err = errors.Join(err, s.admin.Shutdown(wait), s.metrics.Shutdown(wait), s.health.Shutdown(wait))
	for _, p := range s.probers {
		p.Stop()
	}
	s.proxy.Close()
	if s.app != nil {
		s.app.Close()
	}
	if s.consul != nil {
		s.consul.Close()
	}
	s.policies.close()
	// What is left of the spans goes out before the exit, within the
	// shutdown's bounds.
	flush, cancelFlush := context.WithTimeout(context.Background(), 5*time.Second)
	err = errors.Join(err, s.tracing.Shutdown(flush))
	cancelFlush()
	for range s.serving {
		err = errors.Join(err, <-s.errs)
	}
	return err
}

func (s *sidecar) inFlightInbound() int64 {
	if s.app == nil {
		return 0
	}
	return s.app.InFlight()
}
