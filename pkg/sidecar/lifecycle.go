package sidecar

import (
	"context"
	"errors"
	"net"
	"net/http"
	"time"

	"github.com/sidecar-mesh/sidecar/internal/execpages"
	"github.com/sidecar-mesh/sidecar/pkg/discovery"
)

// Run serves, registers the app in Consul, and waits until ctx ends or the
// admin API asks to quit (POST /quitquitquit); then it shuts down and
// returns what went wrong on the way (see the package doc). The drain
// window and the shutdown timeout bound the shutdown, not ctx. Call it
// once.
func (s *Sidecar) Run(ctx context.Context) error {
	s.serve()
	if s.registration.Client != nil {
		if err := s.register(); err != nil {
			s.log.Warn("not registering the app in Consul", "reason", err.Error())
		}
	}
	inboundAddr := ""
	if s.inbound != nil {
		inboundAddr = s.inbound.Addr().String()
	}
	s.log.Info("sidecar ready", "outbound", s.outbound.Addr().String(), "inbound", inboundAddr,
		"admin", s.adminLn.Addr().String(), "health", s.healthLn.Addr().String(), "metrics", s.metricLn.Addr().String(),
		"probes", len(s.probers), "static_services", len(s.static.Services()), "consul", s.consul != nil,
		"registered", s.reg.Load() != nil)
	// Started: the executable's pages that only starting used go back
	// (about 2 MB of the resident set under load).
	if n, err := execpages.Release(); err != nil {
		s.log.Debug("executable pages not released", "err", err.Error())
	} else {
		s.log.Debug("executable pages released", "bytes", n)
	}

	select {
	case <-ctx.Done():
	case <-s.quit:
	}
	s.log.Info("shutting down", "drainWindow", s.cfg.Lifecycle.Drain().String(),
		"shutdownTimeout", s.cfg.Lifecycle.ShutdownTimeout.String())
	return s.shutdown(context.Background())
}

// serve starts every listener's server and the probers.
func (s *Sidecar) serve() {
	if s.mesh != nil {
		s.mesh.start()
		if s.mesh.server != nil {
			s.goServe(s.mesh.server.Serve)
		}
	}
	if s.loops != nil {
		s.goServe(s.loops.Serve)
		s.goServe(s.outbound.ServeConns)
	} else {
		s.goServe(s.outbound.Serve)
	}
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
func (s *Sidecar) startProbers() {
	for _, p := range s.probers {
		if p != s.startup {
			p.Start()
		}
	}
}

// goServe runs serve until its server is shut down; shutdown collects the
// results.
func (s *Sidecar) goServe(serve func() error) {
	s.serving++
	go func() {
		if err := serve(); !errors.Is(err, http.ErrServerClosed) {
			s.errs <- err
			return
		}
		s.errs <- nil
	}()
}

// appReady is what the Consul check reports: the app passes its readiness
// probe (or has none) and the sidecar is not draining.
func (s *Sidecar) appReady() bool {
	return s.outboundUp.Load() && !s.healthH.Draining() && s.readiness.OK()
}

// drain starts draining, once: /healthz/ready and the app's readyz answer
// 503, the Consul check goes critical and the app is deregistered, and
// inbound responses carry Connection: close so that clients move to other
// instances. Everything keeps serving. It does not wait for Consul: the
// deregistration runs on a goroutine of s.drains, bounded by
// deregisterTimeout, so that an agent that stopped answering can neither
// hold back the drain window nor the exit. Callers hold s.drainMu, so that
// nothing is added to s.drains once shutdown waits on it.
func (s *Sidecar) drain() {
	s.drainOnce.Do(func() {
		s.log.Info("draining: reporting not ready and deregistering")
		s.healthH.Drain()
		if s.inbound != nil {
			s.inbound.SetKeepAlivesEnabled(false)
		}
		if srv := s.meshServer(); srv != nil {
			srv.SetKeepAlivesEnabled(false)
		}
		if reg := s.reg.Load(); reg != nil {
			s.drains.Go(func() { s.deregister(reg) })
		}
	})
}

// deregisterTimeout bounds the app's deregistration. The agent is local
// and answers in milliseconds: one that has not answered in 5s is stuck
// (stopped, swapping, partitioned from its servers), and the TTL check,
// which nobody refreshes any more, takes the instance out of every answer
// within its TTL anyway.
const deregisterTimeout = 5 * time.Second

// deregister takes the app out of Consul, giving up after
// deregisterTimeout, or sooner when the drain window and the shutdown
// timeout together are shorter: the shutdown they bound waits for it.
func (s *Sidecar) deregister(reg *discovery.Registration) {
	timeout := deregisterTimeout
	if lc := s.cfg.Lifecycle; lc.Drain()+lc.ShutdownTimeout.D() > 0 {
		timeout = min(timeout, lc.Drain()+lc.ShutdownTimeout.D())
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	if err := reg.Deregister(ctx); err != nil {
		s.log.Warn("deregistering from Consul", "err", err.Error())
	}
}

// drainSoon drains for the admin API; it returns at once.
func (s *Sidecar) drainSoon() {
	s.drainMu.Lock()
	defer s.drainMu.Unlock()
	if s.closing {
		return // shutdown drains
	}
	s.drain()
}

// quitNow asks Run to shut down, as SIGTERM does.
func (s *Sidecar) quitNow() { s.quitOnce.Do(func() { close(s.quit) }) }

// shutdown drains, keeps serving the app's inbound and outbound traffic for
// the drain window, then stops accepting and waits for in-flight requests
// until ctx ends or the shutdown timeout passes, and releases everything.
// No accepted request is dropped unless ctx ends first. The drain window
// starts at once, whatever Consul does: the deregistration runs beside it,
// is waited for only once the listeners are closed, and gives up within
// the drain window and the shutdown timeout, so that a stuck agent never
// makes the shutdown longer.
func (s *Sidecar) shutdown(ctx context.Context) error {
	s.drainMu.Lock()
	s.closing = true
	s.drain()
	s.drainMu.Unlock()
	if w := s.cfg.Lifecycle.Drain(); w > 0 {
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
	if srv := s.meshServer(); srv != nil {
		err = errors.Join(err, srv.Shutdown(wait))
	}
	if s.inbound != nil {
		err = errors.Join(err, s.inbound.Shutdown(wait), s.app.Wait(wait))
	}
	if s.loops != nil {
		err = errors.Join(err, s.loops.Shutdown(wait))
	}
	err = errors.Join(err, s.outbound.Shutdown(wait), s.shutdownTransparent(wait))
	s.outboundUp.Store(false)
	err = errors.Join(err, s.admin.Shutdown(wait), s.metrics.Shutdown(wait), s.health.Shutdown(wait))
	s.drains.Wait() // the deregistration, which still needs the Consul client
	for _, p := range s.probers {
		p.Stop()
	}
	s.proxy.Close()
	if s.mesh != nil {
		s.mesh.stop()
	}
	s.recorder.Close() // after the proxy: the access log has every request's line
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

func (s *Sidecar) inFlightInbound() int64 {
	if s.app == nil {
		return 0
	}
	return s.app.InFlight()
}
