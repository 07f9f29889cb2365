package discovery

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
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
	// IdleTimeout stops the watch of a service nobody asked for this long,
	// once Consul answers it: a watch whose queries fail, or have not been
	// answered for twice WaitTime, is kept, since its set is the last known
	// good one. Default 10m.
	IdleTimeout time.Duration
	// MaxWatches bounds the services watched at once. Only services in
	// Consul's catalog are watched; when the bound is reached, a watch of a
	// service Consul said it does not know goes first, else the least
	// recently used one. Default 1024.
	MaxWatches int
	// Settle is the least time between two answers of one blocking query
	// that changed something (a watch, the catalog): a service whose
	// instances change many times a second is applied at most once per
	// Settle, the latest state winning; the first change after a quiet
	// spell applies at once. Default 50ms.
	Settle time.Duration
	// AllowLoopbackEndpoints keeps instances whose address is loopback
	// (127.0.0.0/8, ::1, localhost), link-local (169.254.0.0/16,
	// fe80::/10) or unspecified (0.0.0.0, ::), or a host name that resolves
	// to one of them. By default they are dropped: such an address names
	// the sidecar's own host, so a catalog entry could point the sidecar at
	// itself or at the pod's private ports. (A host name is checked by what
	// it resolves to when Consul's answer comes; the dialer has to check
	// what it resolves to when called.)
	AllowLoopbackEndpoints bool
	// LookupNetIP resolves the instances' addresses that are host names,
	// for AllowLoopbackEndpoints. Nil: net.DefaultResolver's (the hosts
	// file, then DNS).
	LookupNetIP func(ctx context.Context, host string) ([]netip.Addr, error)
	// Mesh, on in the service mesh, also follows each service's mesh
	// instances (/v1/health/connect/<service>: its sidecar proxies, or
	// instances that speak mutual TLS themselves). While a service has
	// any, they are its endpoints, marked Mesh; else its plain instances.
	Mesh bool
	// CacheFile, when set, persists the last known good sets, so a sidecar
	// restarted during a Consul outage still routes. They are kept in
	// memory all the same, for a watch stopped while idle and started again
	// during an outage.
	CacheFile string
	// CacheMaxAge drops the last known good sets that Consul has not
	// confirmed for this long. Default 1h.
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
// the current set is published as an immutable EndpointSet. Only names in
// Consul's catalog (followed with one blocking query per datacenter in use)
// are watched: any other name is unknown at once. When Consul errs, the
// last known good set stays in force: a set never becomes empty because
// Consul could not be asked. Safe for concurrent use; Close stops every
// watch.
type Consul struct {
	cfg   ConsulConfig
	log   *slog.Logger
	cache *setCache

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu       sync.Mutex // guards watches and catalogs
	watches  map[string]*watch
	catalogs map[string]*catalog // by datacenter

	dropped droppedCounts // endpoints Consul answered that were not used

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

	// dropped holds the endpoints of the last answer that were not used,
	// so that each is logged and counted once, not at every answer. Only
	// the watch's goroutine uses it; the mesh follower keeps its own.
	dropped, meshDropped map[string]bool

	// With ConsulConfig.Mesh, the last answers of both queries: the set
	// is the mesh instances while there are any, else the plain ones.
	mu         sync.Mutex // guards plain and mesh
	plain      []Endpoint
	mesh       []Endpoint
	plainKnown bool // plain holds an answer
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
	if cfg.Settle <= 0 {
		cfg.Settle = 50 * time.Millisecond
	}
	if cfg.CacheMaxAge <= 0 {
		cfg.CacheMaxAge = time.Hour
	}
	if cfg.LookupNetIP == nil {
		cfg.LookupNetIP = func(ctx context.Context, host string) ([]netip.Addr, error) {
			return net.DefaultResolver.LookupNetIP(ctx, "ip", host)
		}
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	c := &Consul{cfg: cfg, log: log.With("component", "discovery.consul"), watches: map[string]*watch{},
		catalogs: map[string]*catalog{}}
	c.cache = newSetCache(cfg.CacheFile, cfg.CacheMaxAge, c.log)
	c.ctx, c.cancel = context.WithCancel(context.Background())
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		supervise(c.ctx, "discovery.reap", c.reapIdle)
	}()
	return c, nil
}

// Close stops every watch and waits for them.
func (c *Consul) Close() {
	c.cancel()
	c.wg.Wait()
}

// Resolve implements Resolver. A name that is not a valid service name, or
// that Consul's catalog does not have, is ErrUnknownService at once. The
// first call for a service starts its watch and waits up to FirstWait (and
// ctx) for Consul's answer; after that it never blocks.
func (c *Consul) Resolve(ctx context.Context, service string) (*EndpointSet, error) {
	if !ValidServiceName(service) {
		return nil, ErrUnknownService // nothing from the wire reaches a Consul URL unchecked
	}
	w, err := c.watchFor(ctx, service)
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
	if set := c.persisted(w); set != nil {
		return set, nil
	}
	return nil, noAnswer(service, &w.lastErr)
}

// persisted puts the persisted set of w's service, if any, in force until
// Consul answers, and returns the set in force.
func (c *Consul) persisted(w *watch) *EndpointSet {
	set := c.cache.get(w.service)
	if set == nil {
		return nil
	}
	if w.set.CompareAndSwap(nil, set) {
		c.log.Warn("serving persisted endpoints while Consul does not answer", "service", w.service,
			"endpoints", len(set.Endpoints), "age", time.Since(set.UpdatedAt).Round(time.Second))
	}
	return w.set.Load()
}

// watchFor returns the watch of service, starting one if the catalog of
// its datacenter has the service. Before the catalog's first answer (Consul
// down since the start) only a service with a persisted set is watched.
func (c *Consul) watchFor(ctx context.Context, service string) (*watch, error) {
	c.mu.Lock()
	if w, ok := c.watches[service]; ok {
		c.mu.Unlock()
		return w, nil
	}
	if c.ctx.Err() != nil {
		c.mu.Unlock()
		return nil, ErrUnknownService
	}
	cat := c.catalogFor(c.cfg.Services[service].Datacenter)
	c.mu.Unlock()

	known, ok, err := cat.knows(ctx, service, c.cfg.FirstWait)
	switch {
	case err != nil:
		return nil, err
	case ok && !known:
		return nil, ErrUnknownService
	case !ok && c.cache.get(service) == nil:
		return nil, noAnswer(service, &cat.lastErr)
	}

	c.mu.Lock()
	defer c.mu.Unlock()
	if w, ok := c.watches[service]; ok {
		return w, nil
	}
	if c.ctx.Err() != nil {
		return nil, ErrUnknownService
	}
	if len(c.watches) >= c.cfg.MaxWatches {
		c.evictLocked()
	}
	wctx, cancel := context.WithCancel(c.ctx)
	w := &watch{service: service, opts: c.cfg.Services[service], cancel: cancel, answered: make(chan struct{})}
	w.lastUsed.Store(time.Now().UnixNano())
	c.watches[service] = w
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		supervise(wctx, "discovery.watch", func(ctx context.Context) { c.run(ctx, w) })
	}()
	if c.cfg.Mesh {
		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			supervise(wctx, "discovery.watch.mesh", func(ctx context.Context) { c.runMesh(ctx, w) })
		}()
	}
	c.log.Info("watching service", "service", service)
	if !ok {
		c.persisted(w) // the catalog did not answer: the persisted set stands in
	}
	return w, nil
}

// evictLocked stops one watch to make room for another: one of a service
// Consul said it does not know if there is one, else the least recently
// used. Callers hold c.mu.
func (c *Consul) evictLocked() {
	var victim *watch
	for _, w := range c.watches {
		switch {
		case victim == nil:
			victim = w
		case w.unknown.Load() != victim.unknown.Load():
			if w.unknown.Load() {
				victim = w
			}
		case w.lastUsed.Load() < victim.lastUsed.Load():
			victim = w
		}
	}
	if victim == nil {
		return
	}
	c.stopLocked(victim)
	c.log.Warn("too many watched services; stopped watching one", "service", victim.service,
		"unknown", victim.unknown.Load(), "max", c.cfg.MaxWatches)
}

// stopLocked stops w's watch. Callers hold c.mu.
func (c *Consul) stopLocked(w *watch) {
	w.cancel()
	delete(c.watches, w.service)
}

// follower is the blocking-query loop of what, named in logs by attrs.
func (c *Consul) follower(what string, attrs ...any) follower {
	return follower{log: c.log, attrs: attrs, wait: c.cfg.WaitTime, settle: c.cfg.Settle,
		failed: "Consul " + what + " query failed; keeping the last known answer", again: "Consul " + what + " answers again"}
}

// run is the blocking-query loop of one service.
func (c *Consul) run(ctx context.Context, w *watch) {
	name, _ := pathName(w.service) // Resolve let only valid names in
	var entries []*api.ServiceEntry
	f := c.follower("health", "service", w.service)
	f.lastErr = &w.lastErr
	f.run(ctx, func(q *api.QueryOptions) (meta *api.QueryMeta, err error) {
		q.Datacenter = w.opts.Datacenter
		// Passing and warning instances, as Consul's DNS and its service
		// mesh use them: a warning one gets its Weights.Warning.
		entries, meta, err = c.cfg.Client.Health().ServiceMultipleTags(name, w.opts.Tags, false, q)
		return meta, err
	}, func(changed bool) {
		if changed {
			c.update(ctx, w, entries)
		}
		now := time.Now()
		w.lastOK.Store(now.UnixNano())
		if set := w.set.Load(); set != nil && set.Source == "consul" {
			c.cache.put(set, now) // confirmed: its age starts over
		}
		w.once.Do(func() { close(w.answered) })
	})
}

// runMesh is the blocking-query loop of one service's mesh instances.
func (c *Consul) runMesh(ctx context.Context, w *watch) {
	name, _ := pathName(w.service)
	var entries []*api.ServiceEntry
	f := c.follower("mesh health", "service", w.service)
	f.run(ctx, func(q *api.QueryOptions) (meta *api.QueryMeta, err error) {
		q.Datacenter = w.opts.Datacenter
		entries, meta, err = c.cfg.Client.Health().Connect(name, "", false, q)
		return meta, err
	}, func(changed bool) {
		if changed {
			eps := c.endpoints(ctx, w, entries, true, &w.meshDropped)
			// Chosen and published under w.mu, as the plain follower
			// publishes: the set published last reflects both answers.
			w.mu.Lock()
			defer w.mu.Unlock()
			w.mesh = eps
			if w.plainKnown {
				c.publish(w, chooseEndpoints(eps, w.plain))
			}
		}
	})
}

// chooseEndpoints is a service's endpoints in the mesh: its mesh
// instances while there are any, else its plain ones.
func chooseEndpoints(mesh, plain []Endpoint) []Endpoint {
	if len(mesh) > 0 {
		return mesh
	}
	return plain
}

// update publishes a new set when the answer differs from the current one.
// Any entry may lack its Service or Node (an answer is data, not a promise):
// such an entry is skipped.
func (c *Consul) update(ctx context.Context, w *watch, entries []*api.ServiceEntry) {
	eps := c.endpoints(ctx, w, entries, false, &w.dropped)
	if c.cfg.Mesh {
		w.mu.Lock()
		w.plain, w.plainKnown = eps, true
		mesh := w.mesh
		w.mu.Unlock()
		eps = chooseEndpoints(mesh, eps)
	}
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
	if c.cfg.Mesh {
		// Chosen again under w.mu, with the mesh follower's latest
		// answer: a mesh answer that came since must not be overwritten
		// by these plain endpoints.
		w.mu.Lock()
		defer w.mu.Unlock()
		eps = chooseEndpoints(w.mesh, w.plain)
	}
	c.publish(w, eps)
}

// publish makes eps the service's set, unless they are the set already.
func (c *Consul) publish(w *watch, eps []Endpoint) {
	if cur := w.set.Load(); cur != nil && cur.Source == "consul" && slices.Equal(cur.Endpoints, eps) {
		return // unchanged
	}
	set := &EndpointSet{Service: w.service, Endpoints: eps, Source: "consul", UpdatedAt: time.Now()}
	w.set.Store(set)
	c.cache.put(set, set.UpdatedAt)
	c.log.Info("endpoints changed", "service", w.service, "endpoints", len(eps))
}

// endpoints are the usable instances of an answer, sorted, marked mesh or
// not. Instances whose address is neither an IP address nor a host name
// are dropped, and so are, unless allowed, those on the sidecar's own host;
// each is logged and counted once, by the addresses in *droppedBefore.
func (c *Consul) endpoints(ctx context.Context, w *watch, entries []*api.ServiceEntry, mesh bool, droppedBefore *map[string]bool) []Endpoint {
	eps := make([]Endpoint, 0, len(entries))
	var dropped map[string]bool
	names := hostNames{lookup: c.cfg.LookupNetIP}
	defer names.close()
	for _, e := range entries {
		host, port, ok := entryAddr(e)
		if !ok {
			continue
		}
		weight, ok := entryWeight(e)
		if !ok {
			continue // critical, in maintenance, or warning with no weight for it
		}
		addr := net.JoinHostPort(host, strconv.Itoa(port))
		h, name, valid := endpointHost(host)
		var reason string
		var resolved netip.Addr // what a name that is dropped resolves to
		switch {
		case !valid:
			reason = DropMalformed
		case c.cfg.AllowLoopbackEndpoints:
		case name:
			reason, resolved = names.ownHost(ctx, h)
		default:
			reason = ownHostAddr(h)
		}
		if reason == "" {
			eps = append(eps, Endpoint{Addr: net.JoinHostPort(h, strconv.Itoa(port)), Weight: weight, Mesh: mesh})
			continue
		}
		if dropped == nil {
			dropped = map[string]bool{}
		}
		dropped[addr] = true
		if (*droppedBefore)[addr] {
			continue
		}
		c.dropped.add(reason)
		switch {
		case reason == DropMalformed:
			c.log.Warn("dropped an endpoint from Consul whose address is neither an IP address nor a host name",
				"service", w.service, "endpoint", addr)
		case resolved.IsValid():
			c.log.Warn("dropped an endpoint from Consul whose host name resolves to this host (discovery.consul.allowLoopbackEndpoints is off)",
				"service", w.service, "endpoint", addr, "resolved", resolved.String(), "reason", reason)
		default:
			c.log.Warn("dropped an endpoint from Consul that points at this host (discovery.consul.allowLoopbackEndpoints is off)",
				"service", w.service, "endpoint", addr, "reason", reason)
		}
	}
	*droppedBefore = dropped
	slices.SortFunc(eps, func(a, b Endpoint) int { return strings.Compare(a.Addr, b.Addr) })
	return eps
}

// entryAddr is where an instance is reached: its service address, else its
// node's, as Consul has it (endpointHost says whether it can be used), and
// its port. ok is false for an entry that lacks them.
func entryAddr(e *api.ServiceEntry) (host string, port int, ok bool) {
	if e == nil || e.Service == nil || e.Service.Port <= 0 || e.Service.Port > 65535 {
		return "", 0, false
	}
	host = e.Service.Address
	if host == "" && e.Node != nil {
		host = e.Node.Address
	}
	if host == "" {
		return "", 0, false
	}
	return host, e.Service.Port, true
}

// entryWeight is an instance's weight by the state of its checks:
// Weights.Passing when they pass, Weights.Warning when one warns (Consul's
// defaults, 1 and 1, when the instance has none); ok is false for an
// instance that must get no traffic: a check critical or in maintenance, or
// warning with a Warning weight of 0.
func entryWeight(e *api.ServiceEntry) (weight int, ok bool) {
	passing, warning := e.Service.Weights.Passing, e.Service.Weights.Warning
	if passing <= 0 && warning <= 0 {
		passing, warning = 1, 1 // no weights registered
	}
	switch checksStatus(e.Checks) {
	case api.HealthPassing:
		return max(passing, 1), true
	case api.HealthWarning:
		return warning, warning > 0
	}
	return 0, false
}

// checksStatus is api.HealthChecks.AggregatedStatus without trusting the
// answer's shape: a null check is skipped where AggregatedStatus
// dereferences it. Maintenance wins over critical, critical over warning,
// warning over passing; no checks is passing, and a status Consul does not
// define is "" (no traffic).
func checksStatus(checks api.HealthChecks) string {
	var warning, critical, maintenance bool
	for _, c := range checks {
		if c == nil {
			continue
		}
		if c.CheckID == api.NodeMaint || strings.HasPrefix(c.CheckID, api.ServiceMaintPrefix) {
			maintenance = true
			continue
		}
		switch c.Status {
		case api.HealthPassing:
		case api.HealthWarning:
			warning = true
		case api.HealthCritical:
			critical = true
		default:
			return ""
		}
	}
	switch {
	case maintenance:
		return api.HealthMaint
	case critical:
		return api.HealthCritical
	case warning:
		return api.HealthWarning
	}
	return api.HealthPassing
}

func (c *Consul) known(ctx context.Context, w *watch) (bool, error) {
	name, _ := pathName(w.service)
	q := (&api.QueryOptions{Datacenter: w.opts.Datacenter}).WithContext(ctx)
	svcs, _, err := c.cfg.Client.Catalog().Service(name, "", q)
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

// reapIdle stops watches nobody used for IdleTimeout, among those Consul
// answers.
func (c *Consul) reapIdle(ctx context.Context) {
	tick := time.NewTicker(min(c.cfg.IdleTimeout/4, time.Minute))
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		now := time.Now()
		cutoff := now.Add(-c.cfg.IdleTimeout).UnixNano()
		c.mu.Lock()
		for name, w := range c.watches {
			if w.lastUsed.Load() < cutoff && c.answering(w, now) {
				c.stopLocked(w)
				c.log.Info("stopped watching idle service", "service", name)
			}
		}
		c.mu.Unlock()
	}
}

// answering reports whether Consul answers w's queries: the last one did
// not fail, and an answer came within twice the blocking query's wait (an
// agent that is stopped or cut off fails nothing: its queries hang). A
// watch Consul does not answer is not stopped for being idle: its set is
// the last known good one, which a new watch would not have until Consul
// answers.
func (c *Consul) answering(w *watch, now time.Time) bool {
	last := w.lastOK.Load()
	return w.lastErr.Load() == nil && last != 0 && now.Sub(time.Unix(0, last)) <= 2*c.cfg.WaitTime
}
