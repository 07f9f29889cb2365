package discovery

import (
	"context"
	"fmt"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"
)

// catalog is the set of service names one datacenter's catalog knows,
// followed with one blocking query on /v1/catalog/services. It decides,
// without a request of its own, whether a name is worth a watch: a name
// the catalog does not know costs no watch, no goroutine and no query, so
// an app that sends random Host names cannot use up the watches or load
// the agent. A newly registered service is in the set as soon as that
// query returns.
type catalog struct {
	dc      string
	names   atomic.Pointer[map[string]struct{}] // lower-cased; nil until the first answer
	lastErr atomic.Pointer[string]
	synced  chan struct{} // closed at the first answer
	once    sync.Once
}

// catalogPacePerName lengthens the catalog's settle window with its size:
// each answer lists every service (10,000 names cost the sidecar about
// 14 ms of CPU to decode, and the agent more to encode), and it comes with
// every registration anywhere. 50 µs a name keeps following a catalog
// under churn near 3% of a core however big it is: 50 ms up to 1,000
// names, 500 ms for 10,000, at most a second. A service registered after
// a quiet spell is still seen at once.
const (
	catalogPacePerName = 50 * time.Microsecond
	catalogMaxPace     = time.Second
)

// catalogFor returns the catalog of datacenter dc ("": the agent's),
// following it from the first call on. Callers hold c.mu.
func (c *Consul) catalogFor(dc string) *catalog {
	if cat, ok := c.catalogs[dc]; ok {
		return cat
	}
	cat := &catalog{dc: dc, synced: make(chan struct{})}
	c.catalogs[dc] = cat
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		supervise(c.ctx, "discovery.catalog", func(ctx context.Context) { c.followCatalog(ctx, cat) })
	}()
	return cat
}

// followCatalog keeps cat's names current, and stops the watches of the
// services that left it.
func (c *Consul) followCatalog(ctx context.Context, cat *catalog) {
	var svcs map[string][]string
	f := c.follower("catalog", "datacenter", cat.dc)
	f.pace = func() time.Duration {
		names := cat.names.Load()
		if names == nil {
			return 0
		}
		return min(time.Duration(len(*names))*catalogPacePerName, catalogMaxPace)
	}
	f.lastErr = &cat.lastErr
	f.run(ctx, func(q *api.QueryOptions) (meta *api.QueryMeta, err error) {
		q.Datacenter = cat.dc
		svcs, meta, err = c.cfg.Client.Catalog().Services(q)
		return meta, err
	}, func(changed bool) {
		if !changed && cat.names.Load() != nil {
			return
		}
		names := make(map[string]struct{}, len(svcs))
		for name := range svcs { // a nil map (a null answer) is an empty catalog
			names[strings.ToLower(name)] = struct{}{}
		}
		cat.names.Store(&names)
		cat.once.Do(func() { close(cat.synced) })
		c.forgetGone(cat.dc, names)
	})
}

// knows reports whether the catalog has service. It waits up to wait (and
// ctx) for the catalog's first answer; without one, ok is false.
func (cat *catalog) knows(ctx context.Context, service string, wait time.Duration) (known, ok bool, err error) {
	if names := cat.names.Load(); names != nil {
		_, known = (*names)[service]
		return known, true, nil
	}
	timer := time.NewTimer(wait)
	defer timer.Stop()
	select {
	case <-cat.synced:
	case <-timer.C:
		return false, false, nil
	case <-ctx.Done():
		return false, false, ctx.Err()
	}
	_, known = (*cat.names.Load())[service]
	return known, true, nil
}

// noAnswer is the error of a service Consul could not be asked about, with
// the last error of the query that would have answered, if any.
func noAnswer(service string, lastErr *atomic.Pointer[string]) error {
	detail := "Consul has not answered"
	if e := lastErr.Load(); e != nil {
		detail += ": " + *e
	}
	return fmt.Errorf("%w for %s: %s", ErrNoAnswer, service, detail)
}

// forgetGone stops the watches of the services of datacenter dc that its
// catalog no longer has: a deregistered service costs nothing from then
// on, and is watched again if it comes back and is asked for.
func (c *Consul) forgetGone(dc string, names map[string]struct{}) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for name, w := range c.watches {
		if _, ok := names[name]; !ok && w.opts.Datacenter == dc {
			c.stopLocked(w)
			c.log.Info("service is gone from Consul's catalog; stopped watching it", "service", name)
		}
	}
}

// pathName is service as it may go into the path of a Consul API request.
// consul/api puts a name into the path as it is given ("/v1/health/service/"
// + name): a '/' or ".." would address another endpoint of the agent, whose
// router cleans the path and redirects there (a KV key answered where
// service entries were expected). Only valid names (lower-cased) are
// accepted, and they are escaped all the same, so that a wider rule for
// names can never reopen that door.
func pathName(service string) (string, bool) {
	if !ValidServiceName(strings.ToLower(service)) {
		return "", false
	}
	return url.PathEscape(service), true
}
