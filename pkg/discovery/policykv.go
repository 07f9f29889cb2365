package discovery

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/sidecar-mesh/sidecar/pkg/policy"
)

// PolicyWatchConfig configures WatchPolicies. Zero fields take the defaults
// named.
type PolicyWatchConfig struct {
	// Client is the Consul API client. Required.
	Client *api.Client
	// WaitTime is the blocking query's wait, plus up to 1/16 of jitter.
	// Default 5m.
	WaitTime time.Duration
	// Settle is the least time between two pushes: a key written many
	// times a second is pushed at most once per Settle, its latest value
	// winning; the first write after a quiet spell is pushed at once.
	// Default 100ms.
	Settle time.Duration
	// Logger receives state transitions; nil discards them.
	Logger *slog.Logger
}

// PolicyWatcher follows the policy documents in Consul KV (one key per
// service under policy.KVPrefix) with a blocking query on the prefix, and
// pushes the whole set of keys whenever it changes. When Consul errs
// nothing is pushed: the last set pushed stays in force, however long the
// outage. Close stops it.
type PolicyWatcher struct {
	cfg    PolicyWatchConfig
	log    *slog.Logger
	push   func(map[string]policy.KVDocument)
	cancel context.CancelFunc
	done   chan struct{}

	synced   chan struct{} // closed after the first push
	syncOnce sync.Once
	lastOK   atomic.Int64 // unix nanos of the last answer from Consul
}

// WatchPolicies starts watching. push is called from the watcher's own
// goroutine, one call at a time, with every policy key under
// policy.KVPrefix by service (keys below a deeper '/' are not policies and
// are left out); the values are raw, neither parsed nor checked. The first
// push comes with Consul's first answer, even if there are no keys.
func WatchPolicies(cfg PolicyWatchConfig, push func(map[string]policy.KVDocument)) (*PolicyWatcher, error) {
	if cfg.Client == nil {
		return nil, errors.New("consul policies: a client is required")
	}
	if cfg.WaitTime <= 0 {
		cfg.WaitTime = 5 * time.Minute
	}
	if cfg.Settle <= 0 {
		cfg.Settle = 100 * time.Millisecond
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	w := &PolicyWatcher{cfg: cfg, log: log.With("component", "policy.consul"), push: push,
		done: make(chan struct{}), synced: make(chan struct{})}
	var ctx context.Context
	ctx, w.cancel = context.WithCancel(context.Background())
	go w.run(ctx)
	return w, nil
}

// Synced is closed once Consul's first answer has been pushed.
func (w *PolicyWatcher) Synced() <-chan struct{} { return w.synced }

// LastAnswer is when Consul last answered; zero before its first answer.
func (w *PolicyWatcher) LastAnswer() time.Time {
	if n := w.lastOK.Load(); n != 0 {
		return time.Unix(0, n)
	}
	return time.Time{}
}

// Close stops the watch and waits for it; push is not called after Close
// returns.
func (w *PolicyWatcher) Close() {
	w.cancel()
	<-w.done
}

// run is the blocking-query loop.
func (w *PolicyWatcher) run(ctx context.Context) {
	defer close(w.done)
	supervise(ctx, "discovery.policykv", w.follow)
}

// follow lists the prefix at each change, at most once per Settle, and
// pushes when a policy key was added, removed or written since the last
// push (or Consul answers again after failures).
func (w *PolicyWatcher) follow(ctx context.Context) {
	var pairs api.KVPairs
	var pushed map[string]uint64 // ModifyIndex by service, as last pushed; nil before the first push
	f := follower{log: w.log, attrs: []any{"prefix", policy.KVPrefix}, wait: w.cfg.WaitTime, settle: w.cfg.Settle,
		failed: "Consul KV query failed; keeping the last policies", again: "Consul KV answers again"}
	f.run(ctx, func(q *api.QueryOptions) (meta *api.QueryMeta, err error) {
		pairs, meta, err = w.cfg.Client.KV().List(policy.KVPrefix, q)
		return meta, err
	}, func(changed bool) {
		w.lastOK.Store(time.Now().UnixNano())
		if !changed && pushed != nil {
			return
		}
		docs := make(map[string]policy.KVDocument, len(pairs))
		for _, p := range pairs {
			if p == nil {
				continue
			}
			if service, ok := policy.ServiceFromKVKey(p.Key); ok {
				docs[service] = policy.KVDocument{Key: p.Key, Value: p.Value, ModifyIndex: p.ModifyIndex}
			}
		}
		if pushed != nil && sameIndexes(pushed, docs) {
			return // the prefix's index moved for a key that is not a policy
		}
		pushed = make(map[string]uint64, len(docs))
		for service, d := range docs {
			pushed[service] = d.ModifyIndex
		}
		w.push(docs)
		w.syncOnce.Do(func() { close(w.synced) })
	})
}

// sameIndexes reports whether docs has the keys of pushed, each at the
// ModifyIndex pushed.
func sameIndexes(pushed map[string]uint64, docs map[string]policy.KVDocument) bool {
	if len(pushed) != len(docs) {
		return false
	}
	for service, d := range docs {
		if i, ok := pushed[service]; !ok || i != d.ModifyIndex {
			return false
		}
	}
	return true
}
