package discovery

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"
)

// ErrNoAnswer is returned when a service is being watched but no answer has
// come from Consul yet (or Consul is unreachable) and no persisted set can
// stand in.
var ErrNoAnswer = errors.New("no answer from discovery yet")

// ConsulConfig configures the Consul source. Zero fields take the defaults
// named.
type ConsulConfig struct {
	// Client is the Consul API client (address, ACL token and TLS, usually
	// from the standard CONSUL_* environment variables). Required.
	Client *api.Client
	// Services holds per-service options: tag filter and datacenter.
	Services map[string]ServiceOptions
	// WaitTime is the blocking query's wait; each query adds up to 1/16 of
	// jitter so a fleet doesn't return in step. Default 5m.
	WaitTime time.Duration
	// FirstWait bounds how long the first request for a service waits for
	// Consul's first answer. Default 1s.
	FirstWait time.Duration
	// IdleTimeout stops the watch of a service nobody asked for this long.
	// Default 10m.
	IdleTimeout time.Duration
	// MaxWatches bounds the services watched at once, so an app naming
	// random hosts can't make the sidecar open unbounded queries. Default 1024.
	MaxWatches int
	// CacheFile, when set, persists the last known good sets, so a sidecar
	// restarted during a Consul outage still routes.
	CacheFile string
	// CacheMaxAge drops persisted sets older than this. Default 1h.
	CacheMaxAge time.Duration
	// Logger receives state transitions; nil discards them.
	Logger *slog.Logger
}

// ServiceOptions narrow which instances of a service are used.
type ServiceOptions struct {
	// Tags, when set, keeps only instances carrying every tag.
	Tags []string `yaml:"tags,omitempty" json:"tags,omitempty"`
	// Datacenter, when set, queries that datacenter instead of the agent's.
	Datacenter string `yaml:"datacenter,omitempty" json:"datacenter,omitempty"`
}

// Consul is a Resolver backed by Consul's health API. Each service is watched
// from its first request on, with a blocking query on its passing instances;
// the current set is published as an immutable EndpointSet. When Consul
// errs, the last known good set stays in force: a set never becomes empty
// because Consul could not be asked. Safe for concurrent use; Close stops
// every watch.
type Consul struct {
	cfg   ConsulConfig
	log   *slog.Logger
	cache *setCache

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu      sync.Mutex // guards watches
	watches map[string]*watch

	rev reverseCache // ServiceAt's answers from the catalog
}

var _ Resolver = (*Consul)(nil)

// watch is the state of one watched service.
type watch struct {
	service string
	opts    ServiceOptions
	cancel  context.CancelFunc

	set      atomic.Pointer[EndpointSet] // nil until an answer (or a persisted set)
	unknown  atomic.Bool                 // Consul's catalog has no such service
	answered chan struct{}               // closed at the first answer
	once     sync.Once
	lastUsed atomic.Int64 // unix nanos
	lastOK   atomic.Int64 // unix nanos of the last successful answer
	lastErr  atomic.Pointer[string]
}

// NewConsul starts the Consul source. Persisted sets, if any, are loaded now.
func NewConsul(cfg ConsulConfig) (*Consul, error) {
	if cfg.Client == nil {
		return nil, errors.New("consul discovery: a client is required")
	}
	if cfg.WaitTime <= 0 {
		cfg.WaitTime = 5 * time.Minute
	}
	if cfg.FirstWait <= 0 {
		cfg.FirstWait = time.Second
	}
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = 10 * time.Minute
	}
	if cfg.MaxWatches <= 0 {
		cfg.MaxWatches = 1024
	}
	if cfg.CacheMaxAge <= 0 {
		cfg.CacheMaxAge = time.Hour
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	c := &Consul{cfg: cfg, log: log.With("component", "discovery.consul"), watches: map[string]*watch{}}
	c.cache = newSetCache(cfg.CacheFile, cfg.CacheMaxAge, c.log)
	c.ctx, c.cancel = context.WithCancel(context.Background())
	c.wg.Add(1)
	go c.reapIdle()
	return c, nil
}

// Close stops every watch and waits for them.
func (c *Consul) Close() {
	c.cancel()
	c.wg.Wait()
}

// Resolve implements Resolver. The first call for a service starts its
// watch and waits up to FirstWait (and ctx) for Consul's answer; after
// that it never blocks.
func (c *Consul) Resolve(ctx context.Context, service string) (*EndpointSet, error) {
	w, err := c.watchFor(service)
	if err != nil {
		return nil, err
	}
	w.lastUsed.Store(time.Now().UnixNano())
	if set := w.set.Load(); set != nil {
		return set, nil
	}
	if w.unknown.Load() {
		return nil, ErrUnknownService
	}
	timer := time.NewTimer(c.cfg.FirstWait)
	defer timer.Stop()
	select {
	case <-w.answered:
	case <-timer.C:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	if set := w.set.Load(); set != nil {
		return set, nil
	}
	if w.unknown.Load() {
		return nil, ErrUnknownService
	}
	// No answer in time: a persisted set stands in until Consul answers.
	if set := c.cache.get(service); set != nil {
		w.set.CompareAndSwap(nil, set)
		c.log.Warn("serving persisted endpoints while Consul does not answer", "service", service,
			"endpoints", len(set.Endpoints), "age", time.Since(set.UpdatedAt).Round(time.Second))
		return w.set.Load(), nil
	}
	detail := "Consul has not answered"
	if e := w.lastErr.Load(); e != nil {
		detail += ": " + *e
	}
	return nil, fmt.Errorf("%w for %s: %s", ErrNoAnswer, service, detail)
}

func (c *Consul) watchFor(service string) (*watch, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if w, ok := c.watches[service]; ok {
		return w, nil
	}
	if c.ctx.Err() != nil {
		return nil, ErrUnknownService
	}
	if len(c.watches) >= c.cfg.MaxWatches {
		c.log.Warn("too many watched services; not watching another", "service", service, "max", c.cfg.MaxWatches)
		return nil, ErrUnknownService
	}
	ctx, cancel := context.WithCancel(c.ctx)
	w := &watch{service: service, opts: c.cfg.Services[service], cancel: cancel, answered: make(chan struct{})}
	w.lastUsed.Store(time.Now().UnixNano())
	c.watches[service] = w
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		c.run(ctx, w)
	}()
	c.log.Info("watching service", "service", service)
	return w, nil
}

// run is the blocking-query loop of one service.
func (c *Consul) run(ctx context.Context, w *watch) {
	var index uint64
	failures := 0
	for ctx.Err() == nil {
		q := (&api.QueryOptions{
			WaitIndex:  index,
			WaitTime:   c.cfg.WaitTime + rand.N(c.cfg.WaitTime/16+1),
			Datacenter: w.opts.Datacenter,
		}).WithContext(ctx)
		entries, meta, err := c.cfg.Client.Health().ServiceMultipleTags(w.service, w.opts.Tags, true, q)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			failures++
			// The agent may come back restarted, its index far below ours: a
			// query waiting on our old index would block for the whole wait.
			index = 0
			msg := err.Error()
			w.lastErr.Store(&msg)
			if failures == 1 {
				c.log.Warn("Consul query failed; keeping the last known endpoints", "service", w.service, "err", err)
			}
			if !sleepCtx(ctx, backoff(failures)) {
				return
			}
			continue
		}
		if failures > 0 {
			c.log.Info("Consul answers again", "service", w.service, "after_failures", failures)
			failures = 0
		}
		w.lastErr.Store(nil)
		// Consul's index can go backwards (snapshot restore, agent
		// restart): start over rather than wait on an index never reached.
		index = nextIndex(index, meta.LastIndex)
		c.update(ctx, w, entries)
		w.lastOK.Store(time.Now().UnixNano())
		w.once.Do(func() { close(w.answered) })
	}
}

// update publishes a new set when the answer differs from the current one.
func (c *Consul) update(ctx context.Context, w *watch, entries []*api.ServiceEntry) {
	eps := make([]Endpoint, 0, len(entries))
	for _, e := range entries {
		addr := e.Service.Address
		if addr == "" {
			addr = e.Node.Address
		}
		if addr == "" || e.Service.Port <= 0 {
			continue
		}
		eps = append(eps, Endpoint{Addr: net.JoinHostPort(addr, strconv.Itoa(e.Service.Port))})
	}
	slices.SortFunc(eps, func(a, b Endpoint) int { return strings.Compare(a.Addr, b.Addr) })
	if len(eps) == 0 {
		// Tell "no such service" from "no healthy instance".
		known, err := c.known(ctx, w)
		if err == nil {
			w.unknown.Store(!known)
			if !known {
				if w.set.Swap(nil) != nil {
					c.log.Info("service is gone from Consul", "service", w.service)
				}
				return
			}
		}
	} else {
		w.unknown.Store(false)
	}
	if cur := w.set.Load(); cur != nil && cur.Source == "consul" && slices.Equal(cur.Endpoints, eps) {
		return // unchanged
	}
	set := &EndpointSet{Service: w.service, Endpoints: eps, Source: "consul", UpdatedAt: time.Now()}
	w.set.Store(set)
	c.cache.put(set)
	c.log.Info("endpoints changed", "service", w.service, "endpoints", len(eps))
}

func (c *Consul) known(ctx context.Context, w *watch) (bool, error) {
	q := (&api.QueryOptions{Datacenter: w.opts.Datacenter}).WithContext(ctx)
	svcs, _, err := c.cfg.Client.Catalog().Service(w.service, "", q)
	return len(svcs) > 0, err
}

// Services implements Resolver: every watched service with an answer. The
// UpdatedAt of each is the last time Consul confirmed it, so its age is the
// staleness of what is being served.
func (c *Consul) Services() []*EndpointSet {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]*EndpointSet, 0, len(c.watches))
	for _, w := range c.watches {
		set := w.set.Load()
		if set == nil {
			continue
		}
		cp := *set
		if ok := w.lastOK.Load(); ok != 0 && set.Source == "consul" {
			cp.UpdatedAt = time.Unix(0, ok)
		}
		out = append(out, &cp)
	}
	slices.SortFunc(out, func(a, b *EndpointSet) int { return strings.Compare(a.Service, b.Service) })
	return out
}

// Staleness returns, per watched service, how long ago Consul last confirmed
// its endpoints.
func (c *Consul) Staleness() map[string]time.Duration {
	out := map[string]time.Duration{}
	for _, s := range c.Services() {
		out[s.Service] = time.Since(s.UpdatedAt)
	}
	return out
}

// reapIdle stops watches nobody used for IdleTimeout.
func (c *Consul) reapIdle() {
	defer c.wg.Done()
	tick := time.NewTicker(min(c.cfg.IdleTimeout/4, time.Minute))
	defer tick.Stop()
	for {
		select {
		case <-c.ctx.Done():
			return
		case <-tick.C:
		}
		cutoff := time.Now().Add(-c.cfg.IdleTimeout).UnixNano()
		c.mu.Lock()
		for name, w := range c.watches {
			if w.lastUsed.Load() < cutoff {
				w.cancel()
				delete(c.watches, name)
				c.log.Info("stopped watching idle service", "service", name)
			}
		}
		c.mu.Unlock()
	}
}

// backoff is exponential from 250ms, capped at 5s (the agent is local and
// its queries are cheap; a short cap means routing catches up soon after
// Consul returns), with jitter over the upper half.
func backoff(failures int) time.Duration {
	d := 250 * time.Millisecond << min(failures-1, 5)
	d = min(d, 5*time.Second)
	return d/2 + rand.N(d/2+1)
}

func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
