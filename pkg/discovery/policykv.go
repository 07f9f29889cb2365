package discovery

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/sidecar-mesh/sidecar/pkg/policy"
	"github.com/sidecar-mesh/sidecar/pkg/redact"
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
		docs := policyDocuments(pairs)
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

// policyDocuments are the policy keys among pairs, by service; keys below
// a deeper '/' are not policies and are left out.
func policyDocuments(pairs api.KVPairs) map[string]policy.KVDocument {
	docs := make(map[string]policy.KVDocument, len(pairs))
	for _, p := range pairs {
		if p == nil {
			continue
		}
		if service, ok := policy.ServiceFromKVKey(p.Key); ok {
			docs[service] = policy.KVDocument{Key: p.Key, Value: p.Value, ModifyIndex: p.ModifyIndex}
		}
	}
	return docs
}

// PolicyKVConfig configures NewPolicyKV.
type PolicyKVConfig struct {
	// Address is the Consul agent's HTTP API, host:port or URL; TLS
	// settings come from the standard CONSUL_* environment. Required.
	Address string
	// Token is the ACL token. Empty: CONSUL_HTTP_TOKEN.
	Token string
	// Timeout bounds each call to Consul. Required.
	Timeout time.Duration
}

// PolicyKV reads and writes the policy keys in Consul KV (one per service,
// policy.KVKey), one call at a time, for the policy commands; sidecars only
// watch them (WatchPolicies). Values are raw, neither parsed nor checked.
// It holds no state between calls and is safe for concurrent use.
type PolicyKV struct {
	client  *api.Client
	addr    string        // for messages: without userinfo or token
	timeout time.Duration // of each call
}

// NewPolicyKV is a client of the policy keys at the agent cfg.Address. It
// leaves no idle connection behind, and does not contact the agent.
func NewPolicyKV(cfg PolicyKVConfig) (*PolicyKV, error) {
	if cfg.Address == "" || cfg.Timeout <= 0 {
		return nil, errors.New("consul policy keys: an address and a timeout are required")
	}
	shown := redact.URL(cfg.Address).Redacted()
	c, err := NewClient(ClientConfig{Address: cfg.Address, Token: cfg.Token, NonPooled: true})
	if err != nil {
		return nil, fmt.Errorf("consul client for %s: %w", shown, err)
	}
	return &PolicyKV{client: c, addr: shown, timeout: cfg.Timeout}, nil
}

// Addr is the agent's address as messages show it: without credentials.
func (kv *PolicyKV) Addr() string { return kv.addr }

// KVCallError is a call to Consul KV that failed: no answer within the
// timeout, or an error from the client or the agent.
type KVCallError struct {
	// Op says what was asked, e.g. "reading sidecar/policies/users".
	Op string
	// Addr is the agent's, without credentials.
	Addr string
	// Timeout is set when no answer came within it.
	Timeout time.Duration
	Err     error
}

func (e *KVCallError) Error() string {
	if e.Timeout > 0 {
		return fmt.Sprintf("%s in Consul KV at %s: no answer within %s", e.Op, e.Addr, e.Timeout)
	}
	return fmt.Sprintf("%s in Consul KV at %s: %v", e.Op, e.Addr, e.Err)
}

func (e *KVCallError) Unwrap() error { return e.Err }

// CASConflictError is a check-and-set that found its key changed: nothing
// was written or deleted.
type CASConflictError struct {
	Key string
	// Expected is the ModifyIndex the call was made against; 0: the key was
	// to be absent.
	Expected uint64
	// Current is the key's ModifyIndex found afterwards; 0: absent, or not
	// read.
	Current uint64
	// Deleting says the call was a delete.
	Deleting bool
}

func (e *CASConflictError) Error() string {
	what := "write"
	if e.Deleting {
		what = "delete"
	}
	return fmt.Sprintf("%s: check-and-set conflict: %s against index %d, found index %d (0: absent)", e.Key, what, e.Expected, e.Current)
}

// call bounds one call to Consul by the timeout.
func (kv *PolicyKV) call(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, kv.timeout)
}

// failed is a *KVCallError for err, from a call made with ctx (see call).
func (kv *PolicyKV) failed(ctx context.Context, op string, err error) error {
	e := &KVCallError{Op: op, Addr: kv.addr, Err: err}
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		e.Timeout = kv.timeout
	}
	return e
}

// List returns every policy key by service, as WatchPolicies pushes them.
func (kv *PolicyKV) List(ctx context.Context) (map[string]policy.KVDocument, error) {
	ctx, cancel := kv.call(ctx)
	defer cancel()
	pairs, _, err := kv.client.KV().List(policy.KVPrefix, (&api.QueryOptions{}).WithContext(ctx))
	if err != nil {
		return nil, kv.failed(ctx, "listing "+policy.KVPrefix, err)
	}
	return policyDocuments(pairs), nil
}

// Get returns service's key, or nil when there is none.
func (kv *PolicyKV) Get(ctx context.Context, service string) (*policy.KVDocument, error) {
	key := policy.KVKey(service)
	ctx, cancel := kv.call(ctx)
	defer cancel()
	pair, _, err := kv.client.KV().Get(key, (&api.QueryOptions{}).WithContext(ctx))
	if err != nil {
		return nil, kv.failed(ctx, "reading "+key, err)
	}
	if pair == nil {
		return nil, nil
	}
	return &policy.KVDocument{Key: pair.Key, Value: pair.Value, ModifyIndex: pair.ModifyIndex}, nil
}

// PolicyWrite is one key to set. With CAS, it is set only if it is still at
// Index (0: only if it does not exist).
type PolicyWrite struct {
	Key   string
	Value []byte
	CAS   bool
	Index uint64
}

// maxTxnOps is Consul's limit on the operations of one transaction.
const maxTxnOps = 64

// Write sets every key in one Consul transaction: all are written or none.
// It returns each key's new ModifyIndex. A check-and-set that fails is a
// *CASConflictError among the errors joined.
func (kv *PolicyKV) Write(ctx context.Context, ws []PolicyWrite) ([]uint64, error) {
	if len(ws) > maxTxnOps {
		return nil, fmt.Errorf("%d documents to write; one apply writes at most %d (a Consul transaction): split the file", len(ws), maxTxnOps)
	}
	ops := make(api.TxnOps, 0, len(ws))
	for _, w := range ws {
		op := &api.KVTxnOp{Verb: api.KVSet, Key: w.Key, Value: w.Value}
		if w.CAS {
			op.Verb, op.Index = api.KVCAS, w.Index
		}
		ops = append(ops, &api.TxnOp{KV: op})
	}
	tctx, cancel := kv.call(ctx)
	defer cancel()
	ok, resp, _, err := kv.client.Txn().Txn(ops, (&api.QueryOptions{}).WithContext(tctx))
	if err != nil {
		return nil, kv.failed(tctx, "writing "+fmt.Sprint(len(ws))+" keys", err)
	}
	if !ok {
		var errs []error
		for _, te := range resp.Errors {
			if te.OpIndex < 0 || te.OpIndex >= len(ws) {
				errs = append(errs, errors.New(te.What))
				continue
			}
			w := ws[te.OpIndex]
			if w.CAS {
				if current, err := kv.modifyIndex(ctx, w.Key); err == nil {
					errs = append(errs, &CASConflictError{Key: w.Key, Expected: w.Index, Current: current})
					continue
				}
			}
			errs = append(errs, fmt.Errorf("%s: %s", w.Key, te.What))
		}
		return nil, errors.Join(errs...)
	}
	out := make([]uint64, len(ws))
	for i, r := range resp.Results {
		if i < len(out) && r.KV != nil {
			out[i] = r.KV.ModifyIndex
		}
	}
	return out, nil
}

// Delete removes key; with cas only if it is still at index, else the
// error is a *CASConflictError.
func (kv *PolicyKV) Delete(ctx context.Context, key string, cas bool, index uint64) error {
	dctx, cancel := kv.call(ctx)
	defer cancel()
	w := (&api.WriteOptions{}).WithContext(dctx)
	if !cas {
		if _, err := kv.client.KV().Delete(key, w); err != nil {
			return kv.failed(dctx, "deleting "+key, err)
		}
		return nil
	}
	ok, _, err := kv.client.KV().DeleteCAS(&api.KVPair{Key: key, ModifyIndex: index}, w)
	if err != nil {
		return kv.failed(dctx, "deleting "+key, err)
	}
	if !ok {
		current, _ := kv.modifyIndex(ctx, key)
		return &CASConflictError{Key: key, Expected: index, Current: current, Deleting: true}
	}
	return nil
}

// modifyIndex is key's ModifyIndex now; 0 when it does not exist.
func (kv *PolicyKV) modifyIndex(ctx context.Context, key string) (uint64, error) {
	ctx, cancel := kv.call(ctx)
	defer cancel()
	pair, _, err := kv.client.KV().Get(key, (&api.QueryOptions{}).WithContext(ctx))
	if err != nil || pair == nil {
		return 0, err
	}
	return pair.ModifyIndex, nil
}
