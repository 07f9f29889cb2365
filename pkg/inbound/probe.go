package inbound

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http/httpguts"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/sidecar-mesh/sidecar/pkg/panics"
	"github.com/sidecar-mesh/sidecar/pkg/redact"
	"github.com/sidecar-mesh/sidecar/pkg/upstream"
)

// Probe defaults (DESIGN.md, "Config file").
const (
	DefaultProbeInterval    = time.Second
	DefaultProbeTimeout     = time.Second
	DefaultSuccessThreshold = 1
	DefaultFailureThreshold = 3
)

// Probe describes one probe of the app, as a Kubernetes probe does: exactly
// one of HTTP, TCP and GRPC, run every Interval. The zero value of a timing
// or threshold field means its default; the zero Probe is invalid (no kind).
type Probe struct {
	// HTTP, when set, probes with an HTTP GET.
	HTTP *HTTPProbe
	// TCP, when true, probes with a TCP connect.
	TCP bool
	// GRPC, when set, probes with gRPC health v1 (grpc.health.v1.Health/Check).
	GRPC *GRPCProbe
	// Port replaces the port of the app's address for this probe. Zero: the
	// app's port.
	Port int
	// InitialDelay is the wait before the first probe. Zero: none.
	InitialDelay time.Duration
	// Interval is the time from the start of one probe to the start of the
	// next. Default 1s.
	Interval time.Duration
	// Timeout bounds one probe; no answer by then is a failure. Default 1s.
	Timeout time.Duration
	// SuccessThreshold is how many successes in a row turn a failing probe
	// passing. Default 1.
	SuccessThreshold int
	// FailureThreshold is how many failures in a row turn a passing probe
	// failing. Default 3.
	FailureThreshold int
}

// HTTPProbe is an HTTP GET against the app; a status in [StatusMin,
// StatusMax] passes. The zero value is a GET of / that passes on 200-399.
type HTTPProbe struct {
	// Path (with an optional query) of the GET. Default "/".
	Path string
	// Headers are sent with the GET; a Host entry sets the Host header.
	// Nil: none beyond User-Agent and Accept.
	Headers http.Header
	// StatusMin and StatusMax bound the statuses that pass. Zero: 200 and
	// 399 respectively, the kubelet's rule.
	StatusMin, StatusMax int
}

// GRPCProbe asks the app's gRPC health service. The zero value asks about
// the server as a whole.
type GRPCProbe struct {
	// Service is the name asked about; empty asks about the server as a
	// whole.
	Service string
}

// WithDefaults returns p with zero fields set to their defaults.
func (p Probe) WithDefaults() Probe {
	if p.Interval <= 0 {
		p.Interval = DefaultProbeInterval
	}
	if p.Timeout <= 0 {
		p.Timeout = DefaultProbeTimeout
	}
	if p.SuccessThreshold <= 0 {
		p.SuccessThreshold = DefaultSuccessThreshold
	}
	if p.FailureThreshold <= 0 {
		p.FailureThreshold = DefaultFailureThreshold
	}
	if p.HTTP != nil {
		h := *p.HTTP
		if h.Path == "" {
			h.Path = "/"
		}
		if h.StatusMin == 0 {
			h.StatusMin = 200
		}
		if h.StatusMax == 0 {
			h.StatusMax = 399
		}
		p.HTTP = &h
	}
	return p
}

// Validate reports the first thing wrong with p, naming the field.
func (p Probe) Validate() error {
	kinds := 0
	if p.HTTP != nil {
		kinds++
	}
	if p.TCP {
		kinds++
	}
	if p.GRPC != nil {
		kinds++
	}
	switch {
	case kinds != 1:
		return errors.New("exactly one of http, tcp and grpc must be set")
	case p.Port < 0 || p.Port > 65535:
		return fmt.Errorf("port: %d is not in 0..65535", p.Port)
	case p.InitialDelay < 0 || p.Interval < 0 || p.Timeout < 0:
		return errors.New("initialDelay, interval and timeout must not be negative")
	case p.SuccessThreshold < 0 || p.FailureThreshold < 0:
		return errors.New("successThreshold and failureThreshold must not be negative")
	}
	if h := p.HTTP; h != nil {
		if h.Path != "" && !strings.HasPrefix(h.Path, "/") {
			return fmt.Errorf("http.path: %q must start with /", h.Path)
		}
		if d := p.WithDefaults().HTTP; d.StatusMin < 100 || d.StatusMax > 599 || d.StatusMin > d.StatusMax {
			return fmt.Errorf("http status range: %d-%d is not a range within 100-599", d.StatusMin, d.StatusMax)
		}
		for k, vv := range h.Headers {
			if !httpguts.ValidHeaderFieldName(k) {
				return fmt.Errorf("http.headers: invalid name %q", k)
			}
			for _, v := range vv {
				if !httpguts.ValidHeaderFieldValue(v) {
					return fmt.Errorf("http.headers: invalid value for %q", k)
				}
			}
		}
	}
	return nil
}

// ProberConfig configures a Prober. The zero value of a field means its
// default, except Probe and AppAddr, which are required.
type ProberConfig struct {
	// Name says which probe this is ("readiness", "liveness", "startup"),
	// for logs and errors.
	Name string
	// Probe is what to run.
	Probe Probe
	// AppAddr is the app's host:port, normally 127.0.0.1:appPort.
	AppAddr string
	// InitiallyOK is the state before the probe has decided: false for
	// readiness and startup, true for liveness (as the kubelet has it).
	InitiallyOK bool
	// OnChange is called with the new state at each transition, once per
	// transition, on the prober's goroutine. It must not block. Nil: none.
	OnChange func(ok bool)
	// OnResult is called after every probe with its error (nil: passed),
	// after OnChange, on the prober's goroutine. It must not block. Nil: none.
	OnResult func(err error)
	// DialContext, when set, replaces the TCP dialer of every kind of probe
	// (tests connect probes to an app in memory with it); the probe's
	// timeout still bounds it. Nil: a net.Dialer.
	DialContext func(ctx context.Context, network, addr string) (net.Conn, error)
	// Logger receives transitions; nil discards them.
	Logger *slog.Logger
}

// ProbeState is a Prober's view of the app, a copy the caller owns. The
// zero value is a failing probe that has not run.
type ProbeState struct {
	// OK is the state after thresholds: passing or failing.
	OK bool `json:"ok"`
	// Probes counts the probes run so far.
	Probes int64 `json:"probes"`
	// ConsecutiveSuccesses and ConsecutiveFailures count the latest run of
	// equal results; one of them is zero.
	ConsecutiveSuccesses int `json:"consecutiveSuccesses"`
	ConsecutiveFailures  int `json:"consecutiveFailures"`
	// LastError is the latest probe's error; empty when it passed.
	LastError string `json:"lastError,omitempty"`
	// LastProbe is when the latest probe ended; zero before the first.
	LastProbe time.Time `json:"lastProbe,omitzero"`
}

// Prober runs one probe of the app on its own goroutine and keeps its state
// with the success and failure thresholds. Safe for concurrent use; the
// zero value is not usable, call NewProber. A nil *Prober stands for a probe
// that is not configured: OK reports true, Err nil and State passing.
type Prober struct {
	name     string
	probe    Probe
	desc     string // what is probed, for errors
	check    func(ctx context.Context) error
	release  func()
	log      *slog.Logger
	onChange func(bool)
	onResult func(error)

	ok atomic.Bool // state.OK, for lock-free reads

	mu    sync.Mutex // guards state
	state ProbeState

	life    sync.Mutex // guards started, stopped and cancel
	started bool
	stopped bool
	cancel  context.CancelFunc
	done    chan struct{} // closed when the goroutine returns
}

// NewProber validates cfg and returns a Prober, not yet running.
func NewProber(cfg ProberConfig) (*Prober, error) {
	name := cfg.Name
	if name == "" {
		name = "app"
	}
	if err := cfg.Probe.Validate(); err != nil {
		return nil, fmt.Errorf("%s probe: %w", name, err)
	}
	host, port, err := net.SplitHostPort(cfg.AppAddr)
	if err != nil {
		return nil, fmt.Errorf("%s probe: AppAddr %q is not the app's host:port", name, cfg.AppAddr)
	}
	probe := cfg.Probe.WithDefaults()
	if probe.Port != 0 {
		port = strconv.Itoa(probe.Port)
	}
	addr := net.JoinHostPort(host, port)
	p := &Prober{
		name:     name,
		probe:    probe,
		log:      componentLogger(cfg.Logger, "inbound.probe").With("probe", name),
		onChange: cfg.OnChange,
		onResult: cfg.OnResult,
		done:     make(chan struct{}),
		release:  func() {},
	}
	switch {
	case probe.HTTP != nil:
		p.check, p.release, p.desc = httpCheck(addr, probe, cfg.DialContext)
	case probe.TCP:
		p.check, p.desc = tcpCheck(addr, cfg.DialContext), "TCP connect "+addr
	default:
		p.check = grpcCheck(addr, probe.GRPC.Service, cfg.DialContext)
		p.desc = "gRPC health " + addr + " service " + strconv.Quote(probe.GRPC.Service)
	}
	p.state.OK = cfg.InitiallyOK
	p.ok.Store(cfg.InitiallyOK)
	return p, nil
}

// Start runs the probe on a goroutine until Stop. Calls after the first,
// or after Stop, do nothing.
func (p *Prober) Start() {
	p.life.Lock()
	defer p.life.Unlock()
	if p.started || p.stopped {
		return
	}
	p.started = true
	ctx, cancel := context.WithCancel(context.Background())
	p.cancel = cancel
	go func() {
		defer close(p.done)
		panics.Run(ctx, "inbound.probe", p.run)
	}()
}

// Stop ends the probing goroutine, waits for it, and releases its
// connections. The state stays as it was. Safe to call more than once.
func (p *Prober) Stop() {
	p.life.Lock()
	if p.stopped {
		p.life.Unlock()
		return
	}
	p.stopped = true
	started := p.started
	p.life.Unlock()
	if started {
		p.cancel()
		<-p.done
	}
	p.release()
}

// OK reports whether the probe is passing. Nil: true.
func (p *Prober) OK() bool { return p == nil || p.ok.Load() }

// Err is nil while the probe is passing, and otherwise says why not. Nil
// *Prober: nil.
func (p *Prober) Err() error {
	if p == nil {
		return nil
	}
	s := p.State()
	switch {
	case s.OK:
		return nil
	case s.Probes == 0:
		return fmt.Errorf("%s probe: no result yet", p.name)
	case s.ConsecutiveFailures > 0:
		return fmt.Errorf("%s probe failing (%d in a row): %s", p.name, s.ConsecutiveFailures, s.LastError)
	default:
		return fmt.Errorf("%s probe: %d of %d successes in a row needed", p.name, s.ConsecutiveSuccesses, p.probe.SuccessThreshold)
	}
}

// State returns the probe's current state. Nil: passing, never probed.
func (p *Prober) State() ProbeState {
	if p == nil {
		return ProbeState{OK: true}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.state
}

// run probes until ctx ends.
func (p *Prober) run(ctx context.Context) {
	if d := p.probe.InitialDelay; d > 0 {
		t := time.NewTimer(d)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
	for {
		next := time.NewTimer(p.probe.Interval)
		err := p.probeOnce(ctx)
		if ctx.Err() != nil {
			next.Stop()
			return // stopped mid-probe: that is no verdict on the app
		}
		p.record(err)
		select {
		case <-ctx.Done():
			next.Stop()
			return
		case <-next.C:
		}
	}
}

// probeOnce runs the check under its timeout.
func (p *Prober) probeOnce(ctx context.Context) error {
	cctx, cancel := context.WithTimeout(ctx, p.probe.Timeout)
	defer cancel()
	err := p.check(cctx)
	switch {
	case err == nil:
		return nil
	case errors.Is(cctx.Err(), context.DeadlineExceeded):
		return fmt.Errorf("%s: no answer within %v", p.desc, p.probe.Timeout)
	default:
		return fmt.Errorf("%s: %w", p.desc, err)
	}
}

// record applies one result to the state and the thresholds.
func (p *Prober) record(err error) {
	p.mu.Lock()
	s := &p.state
	s.Probes++
	s.LastProbe = time.Now()
	if err == nil {
		s.ConsecutiveSuccesses++
		s.ConsecutiveFailures = 0
		s.LastError = ""
	} else {
		s.ConsecutiveFailures++
		s.ConsecutiveSuccesses = 0
		s.LastError = err.Error()
	}
	changed := false
	switch {
	case !s.OK && s.ConsecutiveSuccesses >= p.probe.SuccessThreshold:
		s.OK, changed = true, true
	case s.OK && s.ConsecutiveFailures >= p.probe.FailureThreshold:
		s.OK, changed = false, true
	}
	ok, failures := s.OK, s.ConsecutiveFailures
	p.ok.Store(ok)
	p.mu.Unlock()

	if changed {
		if ok {
			p.log.Info("app probe passing")
		} else {
			p.log.Warn("app probe failing", "failures", failures, "err", err)
		}
		if p.onChange != nil {
			p.onChange(ok)
		}
	}
	if p.onResult != nil {
		p.onResult(err)
	}
}

// dialFunc connects to the app; nil means a net.Dialer.
type dialFunc = func(ctx context.Context, network, addr string) (net.Conn, error)

// httpCheck is an HTTP GET on a new connection each time (as the kubelet
// does), so that an app that stopped accepting connections fails it.
func httpCheck(addr string, probe Probe, dial dialFunc) (check func(context.Context) error, release func(), desc string) {
	h := probe.HTTP
	url := "http://" + addr + h.Path
	header := http.Header{"User-Agent": {"sidecar-probe/1"}, "Accept": {"*/*"}}
	host := ""
	for k, vv := range h.Headers {
		if http.CanonicalHeaderKey(k) == "Host" {
			if len(vv) > 0 {
				host = vv[0]
			}
			continue
		}
		header[http.CanonicalHeaderKey(k)] = vv
	}
	// The probe's context bounds it; the transport's own limits lie past
	// that, so that a timeout reads as one.
	limit := probe.Timeout + time.Second
	t := upstream.NewTransport(upstream.TransportConfig{DialTimeout: limit, ResponseHeaderTimeout: limit, DialContext: dial})
	check = func(ctx context.Context) error {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return err
		}
		req.Header = header // only read by the transport
		req.Host = host
		req.Close = true
		resp, err := t.RoundTrip(req)
		if err != nil {
			return err
		}
		_ = resp.Body.Close()
		if resp.StatusCode < h.StatusMin || resp.StatusCode > h.StatusMax {
			return fmt.Errorf("status %d, want %d-%d", resp.StatusCode, h.StatusMin, h.StatusMax)
		}
		return nil
	}
	// The description goes into errors, logs and health answers: without
	// the values of secret query parameters.
	return check, t.Close, "HTTP GET " + redact.URL(url).Redacted()
}

func tcpCheck(addr string, dial dialFunc) func(context.Context) error {
	if dial == nil {
		dial = new(net.Dialer).DialContext
	}
	return func(ctx context.Context) error {
		c, err := dial(ctx, "tcp", addr)
		if err != nil {
			return err
		}
		return c.Close()
	}
}

// grpcCheck asks grpc.health.v1.Health/Check on a new connection each
// time (as the kubelet does), so no reconnect backoff of a long-lived
// connection delays noticing that the app is back.
func grpcCheck(addr, service string, dial dialFunc) func(context.Context) error {
	req := &healthpb.HealthCheckRequest{Service: service}
	opts := []grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithUserAgent("sidecar-probe/1"),
	}
	if dial != nil {
		opts = append(opts, grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return dial(ctx, "tcp", addr)
		}))
	}
	return func(ctx context.Context) error {
		conn, err := grpc.NewClient("passthrough:///"+addr, opts...)
		if err != nil {
			return err
		}
		defer conn.Close()
		resp, err := healthpb.NewHealthClient(conn).Check(ctx, req)
		switch status.Code(err) {
		case codes.OK:
		case codes.Unimplemented:
			return errors.New("the app does not serve grpc.health.v1.Health")
		case codes.NotFound:
			return errors.New("the app's health service does not know this service")
		default:
			return err
		}
		if s := resp.GetStatus(); s != healthpb.HealthCheckResponse_SERVING {
			return fmt.Errorf("status %s", s)
		}
		return nil
	}
}
