package discovery

import (
	"context"
	"errors"
	"log/slog"
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
	// Companions, when set, gives the services registered with the app,
	// after it, and removed with it (the mesh's sidecar proxy), from the
	// app's instance ID.
	Companions func(id string) []*api.AgentServiceRegistration
	// Logger receives state transitions; nil discards them.
	Logger *slog.Logger
}

// Registration keeps the app registered in Consul with a TTL check fed by
// Ready, re-registering when the agent forgets it (agent restart). Safe for
// concurrent use.
type Registration struct {
	cfg     RegistrationConfig
	checkID string
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
	go r.run(ctx)
	return r, nil
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
// routing at once) and removes the instance. Safe to call more than once.
func (r *Registration) Deregister(ctx context.Context) error {
	var err error
	r.once.Do(func() {
		r.cancel()
		<-r.done
		q := (&api.QueryOptions{}).WithContext(ctx)
		_ = r.cfg.Client.Agent().UpdateTTLOpts(r.checkID, "sidecar shutting down", api.HealthCritical, q)
		for _, c := range r.companions() {
			err = errors.Join(err, r.cfg.Client.Agent().ServiceDeregisterOpts(c.ID, q))
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
	for _, c := range r.companions() {
		if err == nil {
			err = r.cfg.Client.Agent().ServiceRegisterOpts(c, api.ServiceRegisterOpts{}.WithContext(ctx))
		}
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

// companions are the services registered with the app.
func (r *Registration) companions() []*api.AgentServiceRegistration {
	if r.cfg.Companions == nil {
		return nil
	}
	return r.cfg.Companions(r.cfg.ID)
}

func (r *Registration) report(ctx context.Context) error {
	status, note := r.status()
	return r.cfg.Client.Agent().UpdateTTLOpts(r.checkID, note, status, (&api.QueryOptions{}).WithContext(ctx))
}
