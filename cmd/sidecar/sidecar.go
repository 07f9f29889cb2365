package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/admin"
	"github.com/sidecar-mesh/sidecar/pkg/config"
	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/outbound"
	"github.com/sidecar-mesh/sidecar/pkg/proxyhttp"
)

// sidecar is one running instance: its listeners and what serves them.
type sidecar struct {
	log      *slog.Logger
	outbound *proxyhttp.Server
	proxy    *outbound.Proxy
	admin    *http.Server
	adminLn  net.Listener
	errs     chan error
}

// start binds every listener first (so a port in use fails fast, before
// anything is served) and then serves them.
func start(cfg *config.Config, log *slog.Logger) (*sidecar, error) {
	static, err := discovery.NewStatic(cfg.Discovery.Static)
	if err != nil {
		return nil, fmt.Errorf("discovery.static: %w", err)
	}
	if cfg.Discovery.Consul != nil && cfg.Discovery.Consul.Address != "" {
		log.Warn("Consul discovery is not available in this build; serving static endpoints only",
			"consul", cfg.Discovery.Consul.Address)
	}
	for _, k := range []struct {
		key string
		set bool
	}{
		{"appPort", cfg.AppPort != 0},
		{"probes", cfg.Probes != (config.Probes{})},
		{"policies", len(cfg.Policies) > 0},
		{"policyFile", cfg.PolicyFile != ""},
	} {
		if k.set {
			log.Warn("configuration key is accepted but not in effect in this build", "key", k.key)
		}
	}
	resolver := discovery.Chain{static}

	proxy, err := outbound.New(outbound.Config{Resolver: resolver, AllowHosts: cfg.AllowHosts, Logger: log})
	if err != nil {
		return nil, err
	}
	out, err := proxyhttp.Listen("outbound", cfg.Listeners.Outbound, proxy, proxyhttp.Limits{}, log)
	if err != nil {
		return nil, err
	}
	adminLn, err := net.Listen("tcp", cfg.Listeners.Admin)
	if err != nil {
		_ = out.Listener.Close()
		return nil, fmt.Errorf("admin listener on %s: %w", cfg.Listeners.Admin, err)
	}
	s := &sidecar{
		log:      log,
		outbound: out,
		proxy:    proxy,
		adminLn:  adminLn,
		errs:     make(chan error, 2),
		admin: &http.Server{
			Handler: admin.Handler(admin.Sources{
				Config:   func() any { return cfg },
				Resolver: resolver,
				Version:  currentBuild(),
			}),
			ReadHeaderTimeout: 5 * time.Second,
			ReadTimeout:       10 * time.Second,
			WriteTimeout:      10 * time.Second,
			IdleTimeout:       60 * time.Second,
			MaxHeaderBytes:    16 << 10,
		},
	}
	go func() { s.errs <- out.Serve() }()
	go func() {
		if err := s.admin.Serve(adminLn); !errors.Is(err, http.ErrServerClosed) {
			s.errs <- err
			return
		}
		s.errs <- nil
	}()
	log.Info("sidecar ready", "outbound", out.Addr().String(), "admin", adminLn.Addr().String(),
		"services", len(static.Services()))
	return s, nil
}

// shutdown stops accepting, lets in-flight requests finish until ctx ends,
// and releases upstream connections.
func (s *sidecar) shutdown(ctx context.Context) error {
	err := errors.Join(s.outbound.Shutdown(ctx), s.admin.Shutdown(ctx))
	s.proxy.Close()
	for range 2 {
		err = errors.Join(err, <-s.errs)
	}
	return err
}
