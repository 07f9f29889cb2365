package discovery

import (
	"context"
	"errors"
	"log/slog"
	"math/rand/v2"
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
	var index, pushed uint64
	failures := 0
	for ctx.Err() == nil {
		q := (&api.QueryOptions{
			WaitIndex: index,
			WaitTime:  w.cfg.WaitTime + rand.N(w.cfg.WaitTime/16+1),
		}).WithContext(ctx)
		pairs, meta, err := w.cfg.Client.KV().List(policy.KVPrefix, q)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			failures++
			index = 0 // the agent may come back restarted, its index far below ours
			if failures == 1 {
				w.log.Warn("Consul KV query failed; keeping the last policies", "prefix", policy.KVPrefix, "err", err.Error())
			}
			if !sleepCtx(ctx, backoff(failures)) {
				return
			}
			continue
		}
		w.lastOK.Store(time.Now().UnixNano())
		recovered := failures > 0
		if recovered {
			w.log.Info("Consul KV answers again", "prefix", policy.KVPrefix, "after_failures", failures)
			failures = 0
		}
		index = nextIndex(index, meta.LastIndex)
		// A blocking query also returns when its wait ends with nothing
		// new: push only what may have changed.
		if pushed != 0 && meta.LastIndex == pushed && !recovered {
			continue
		}
		pushed = meta.LastIndex
		docs := make(map[string]policy.KVDocument, len(pairs))
		for _, p := range pairs {
			if service, ok := policy.ServiceFromKVKey(p.Key); ok {
				docs[service] = policy.KVDocument{Key: p.Key, Value: p.Value, ModifyIndex: p.ModifyIndex}
			}
		}
		w.push(docs)
		w.syncOnce.Do(func() { close(w.synced) })
	}
}

// nextIndex is the WaitIndex of the next blocking query after an answer
// with index last to a query that waited on prev, by Consul's rules: start
// over (0) when the index went backwards (a snapshot restore, a restarted
// agent), and never wait on 0, which would return at once forever.
func nextIndex(prev, last uint64) uint64 {
	switch {
	case last < prev:
		return 0
	case last == 0:
		return 1
	}
	return last
}
