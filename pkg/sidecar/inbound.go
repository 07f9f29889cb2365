package sidecar

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"

	"github.com/sidecar-mesh/sidecar/pkg/config"
	"github.com/sidecar-mesh/sidecar/pkg/downstream"
	"github.com/sidecar-mesh/sidecar/pkg/inbound"
	"github.com/sidecar-mesh/sidecar/pkg/upstream"
)

// listenInbound builds the app's probers and the health endpoints and
// binds the health listener and, when appPort is set, the inbound proxy in
// front of the app. Nothing is served or probed until serve.
func (s *Sidecar) listenInbound() error {
	cfg := s.cfg
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
	s.registerHealthMetrics(s.readiness, liveness, startup)
	checks := []inbound.Check{{Name: "outbound", Err: func() error {
		if !s.outboundUp.Load() {
			return errors.New("the outbound listener is not serving yet")
		}
		return nil
	}}}
	if s.mesh != nil {
		checks = append(checks, inbound.Check{Name: "mesh", Err: s.mesh.ready})
	}
	s.healthH = inbound.NewHealthHandler(inbound.HealthConfig{
		Sidecar:   checks,
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
		Transport: upstream.TransportConfig{MaxResponseHeaderBytes: cfg.Limits.MaxResponseHeaderBytes}})
	if err != nil {
		return err
	}
	s.resilience.setInbound(s.app)
	var plain http.Handler = s.app
	if s.mesh != nil {
		if err := s.mesh.listen(s, s.app); err != nil {
			return err
		}
		if cfg.Mesh.DenyPlaintext() {
			plain = loopbackOnly(s.app, cfg.Mesh.InboundTLSAddr())
		}
	}
	s.inbound, err = downstream.Listen("inbound", cfg.Listeners.Inbound, plain, downstream.Limits{}, s.log)
	return err
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
