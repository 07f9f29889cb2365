package discovery

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"
)

// RegistrationConfig describes the app as Consul should see it. Zero fields
// take the defaults named.
type RegistrationConfig struct {
	// Client is the Consul API client. Required.
	Client *api.Client
	// Service is the app's service name. Required.
	Service string
	// ID is the instance ID, stable for the pod. Default Service-Address-Port.
	ID string
	// Address and Port are where peers reach the app: the pod IP and the
	// sidecar's inbound port. Required.
	Address string
	Port    int
	Tags    []string
	Meta    map[string]string
	// TTL is the check's TTL; the sidecar reports every TTL/3. Default 10s.
	TTL time.Duration
	// DeregisterCriticalAfter lets Consul drop an instance whose sidecar
	// vanished without deregistering. Default 1m.
	DeregisterCriticalAfter time.Duration
	// Ready reports whether peers should route to the app now. Nil: always.
	Ready func() bool
	// SidecarProxy, when set, is the app's sidecar proxy in Consul's
	// mesh, registered after the app and removed with it. Nil: none.
	SidecarProxy *SidecarProxy
	// Logger receives state transitions; nil discards them.
	Logger *slog.Logger
}

// SidecarProxy is this sidecar as Consul's mesh sees it: the
// connect-proxy in front of the app, which Consul's catalog
// (/v1/health/connect/<service>) and Consul's own proxies find when they
// call the app over mutual TLS. It is registered as
// `<ID>-sidecar-proxy`, named `<Service>-sidecar-proxy`, at the app's
// Address, with the app's DeregisterCriticalAfter.
type SidecarProxy struct {
	// Port is where peers reach the inbound TLS listener (mesh.inboundTLS)
	// at the app's Address. Required.
	Port int
	// AppPort is the app's port on loopback, where inbound calls go.
	// Required.
	AppPort int
}

// sidecarSuffix ends the name and ID of a sidecar proxy service, as
// Consul's own sidecar_service registrations name them.
const sidecarSuffix = "-sidecar-proxy"

// Registration keeps the app registered in Consul with a TTL check fed by
// Ready, re-registering when the agent forgets it (agent restart). Safe for
// concurrent use.
type Registration struct {
	cfg     RegistrationConfig
	checkID string
	proxy   *api.AgentServiceRegistration // the sidecar proxy's; nil without one
	log     *slog.Logger
	kick    chan struct{}
	cancel  context.CancelFunc
	done    chan struct{}
	once    sync.Once
}

// Register starts keeping the app registered. It does not wait for Consul:
// an unreachable agent is retried, and the app is registered when it answers.
func Register(cfg RegistrationConfig) (*Registration, error) {
	if cfg.Client == nil || cfg.Service == "" || cfg.Address == "" || cfg.Port <= 0 {
		return nil, errors.New("consul registration: client, service, address and port are required")
	}
	if p := cfg.SidecarProxy; p != nil && (p.Port <= 0 || p.AppPort <= 0) {
		return nil, errors.New("consul registration: the sidecar proxy's port and app port are required")
	}
	cfg = withDefaults(cfg)
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &Registration{
		cfg:     cfg,
		checkID: "service:" + cfg.ID,
		log:     log.With("component", "discovery.registration", "id", cfg.ID),
		kick:    make(chan struct{}, 1),
		cancel:  cancel,
		done:    make(chan struct{}),
	}
	if cfg.SidecarProxy != nil {
		r.proxy = proxyRegistration(cfg)
	}
	go r.run(ctx)
	return r, nil
}

// withDefaults is cfg with the defaults of its zero fields.
func withDefaults(cfg RegistrationConfig) RegistrationConfig {
	if cfg.TTL <= 0 {
		cfg.TTL = 10 * time.Second
	}
	if cfg.DeregisterCriticalAfter <= 0 {
		cfg.DeregisterCriticalAfter = time.Minute
	}
	if cfg.ID == "" {
		cfg.ID = cfg.Service + "-" + cfg.Address + "-" + strconv.Itoa(cfg.Port)
	}
	if cfg.Ready == nil {
		cfg.Ready = func() bool { return true }
	}
	return cfg
}

// ID is the instance ID registered.
func (r *Registration) ID() string { return r.cfg.ID }

// Refresh reports readiness to Consul now instead of at the next tick, for
// a readiness change that peers should see at once.
func (r *Registration) Refresh() {
	select {
	case r.kick <- struct{}{}:
	default:
	}
}

// Deregister stops the refresh loop, marks the check critical (peers stop
// routing at once) and removes the instance. ctx bounds the calls to the
// agent, and the client has no timeout of its own: without a deadline, an
// agent that accepts connections and answers nothing (stopped, swapping)
// holds Deregister for ever. Safe to call more than once; a call while
// another is under way waits for it.
func (r *Registration) Deregister(ctx context.Context) error {
	var err error
	r.once.Do(func() {
		r.cancel()
		<-r.done
		q := (&api.QueryOptions{}).WithContext(ctx)
		_ = r.cfg.Client.Agent().UpdateTTLOpts(r.checkID, "sidecar shutting down", api.HealthCritical, q)
		if r.proxy != nil {
			err = errors.Join(err, r.cfg.Client.Agent().ServiceDeregisterOpts(r.proxy.ID, q))
		}
		err = errors.Join(err, r.cfg.Client.Agent().ServiceDeregisterOpts(r.cfg.ID, q))
		if err == nil {
			r.log.Info("deregistered from Consul")
		}
	})
	return err
}

func (r *Registration) run(ctx context.Context) {
	defer close(r.done)
	supervise(ctx, "discovery.register", r.keep)
}

// keep registers the app and reports its readiness every TTL/3, or at
// once when kicked.
func (r *Registration) keep(ctx context.Context) {
	registered := false
	failures := 0
	for {
		if !registered {
			registered = r.register(ctx)
		}
		if registered {
			if err := r.report(ctx); err != nil {
				if ctx.Err() != nil {
					return
				}
				// The agent forgot us (restart, or our check expired and
				// the instance was reaped): register again.
				r.log.Warn("Consul check update failed; registering again", "err", err)
				registered = r.register(ctx)
			}
		}
		wait := r.cfg.TTL / 3
		if !registered {
			failures++
			wait = min(wait, backoff(failures))
		} else {
			failures = 0
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-r.kick:
			t.Stop()
		case <-t.C:
		}
	}
}

func (r *Registration) status() (string, string) {
	if r.cfg.Ready() {
		return api.HealthPassing, "app ready"
	}
	return api.HealthCritical, "app not ready"
}

func (r *Registration) register(ctx context.Context) bool {
	status, _ := r.status()
	reg := &api.AgentServiceRegistration{
		ID:      r.cfg.ID,
		Name:    r.cfg.Service,
		Address: r.cfg.Address,
		Port:    r.cfg.Port,
		Tags:    r.cfg.Tags,
		Meta:    r.cfg.Meta,
		Check: &api.AgentServiceCheck{
			CheckID:                        r.checkID,
			Name:                           "sidecar: app readiness",
			TTL:                            r.cfg.TTL.String(),
			Status:                         status,
			DeregisterCriticalServiceAfter: r.cfg.DeregisterCriticalAfter.String(),
		},
	}
	err := r.cfg.Client.Agent().ServiceRegisterOpts(reg, api.ServiceRegisterOpts{}.WithContext(ctx))
	if err == nil && r.proxy != nil {
		err = r.cfg.Client.Agent().ServiceRegisterOpts(r.proxy, api.ServiceRegisterOpts{}.WithContext(ctx))
	}
	if err != nil {
		if ctx.Err() == nil {
			r.log.Warn("Consul registration failed; retrying", "err", err)
		}
		return false
	}
	r.log.Info("registered in Consul", "service", r.cfg.Service, "address", r.cfg.Address, "port", r.cfg.Port, "status", status)
	return true
}

// proxyRegistration is the registration of cfg's sidecar proxy, which
// cfg has (with its defaults): `<ID>-sidecar-proxy`, named
// `<Service>-sidecar-proxy`, of Kind connect-proxy, on Address and the
// proxy's Port, with destination the app's service and instance and local
// service 127.0.0.1:AppPort. Its checks are those Consul gives a
// sidecar_service by default: a TCP check of the proxy's address every 10s
// (the agent connects and closes, without a TLS handshake) and an alias of
// the app's own checks, so that the proxy is healthy when the app is. The
// TCP check starts passing (Consul would hold it critical for up to 10s,
// until its first run): register once the listener accepts.
func proxyRegistration(cfg RegistrationConfig) *api.AgentServiceRegistration {
	p := cfg.SidecarProxy
	id := cfg.ID + sidecarSuffix
	return &api.AgentServiceRegistration{
		Kind:    api.ServiceKindConnectProxy,
		ID:      id,
		Name:    cfg.Service + sidecarSuffix,
		Address: cfg.Address,
		Port:    p.Port,
		Proxy: &api.AgentServiceConnectProxyConfig{
			DestinationServiceName: cfg.Service,
			DestinationServiceID:   cfg.ID,
			LocalServiceAddress:    "127.0.0.1",
			LocalServicePort:       p.AppPort,
		},
		Checks: api.AgentServiceChecks{
			{
				CheckID:                        "service:" + id + ":1",
				Name:                           "Connect Sidecar Listening",
				TCP:                            net.JoinHostPort(cfg.Address, strconv.Itoa(p.Port)),
				Interval:                       "10s",
				Status:                         api.HealthPassing,
				DeregisterCriticalServiceAfter: cfg.DeregisterCriticalAfter.String(),
			},
			{
				CheckID:      "service:" + id + ":2",
				Name:         "Connect Sidecar Aliasing " + cfg.ID,
				AliasService: cfg.ID,
			},
		},
	}
}

func (r *Registration) report(ctx context.Context) error {
	status, note := r.status()
	return r.cfg.Client.Agent().UpdateTTLOpts(r.checkID, note, status, (&api.QueryOptions{}).WithContext(ctx))
}
