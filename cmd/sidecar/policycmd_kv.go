package main

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/sidecar-mesh/sidecar/pkg/policy"
	"github.com/sidecar-mesh/sidecar/pkg/redact"
)

// kvStore reads and writes Policy documents in Consul KV, one key per
// service (policy.KVKey). It holds no state between calls.
type kvStore struct {
	client  *api.Client
	addr    string        // for messages: without userinfo or token
	timeout time.Duration // of each call
}

// newKVStore is a client of the Consul agent at addr (host:port or URL)
// with token; TLS settings come from the standard CONSUL_* environment.
// Each call waits at most timeout for Consul's answer.
func newKVStore(addr, token string, timeout time.Duration) (*kvStore, error) {
	shown := redact.URL(addr).Redacted()
	cc := api.DefaultNonPooledConfig() // no idle connections left behind by a CLI run
	cc.Address = addr
	cc.Token = token
	c, err := api.NewClient(cc)
	if err != nil {
		return nil, fmt.Errorf("consul client for %s: %w", shown, err)
	}
	return &kvStore{client: c, addr: shown, timeout: timeout}, nil
}

// call bounds one call to Consul by the store's timeout.
func (s *kvStore) call(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, s.timeout)
}

// kvEntry is one policy key as read from Consul KV.
type kvEntry struct {
	service string
	key     string
	index   uint64 // ModifyIndex: the version
	raw     []byte
	doc     *policy.Policy // nil when the value is not a valid policy
	err     error          // why it is not
}

// modifyIndex is the entry's version; 0 for no entry (an absent key).
func (e *kvEntry) modifyIndex() uint64 {
	if e == nil {
		return 0
	}
	return e.index
}

// source names the entry in messages and in the Status shape.
func (e *kvEntry) source() string { return "consul:" + e.key }

func newKVEntry(service string, pair *api.KVPair) kvEntry {
	e := kvEntry{service: service, key: pair.Key, index: pair.ModifyIndex, raw: pair.Value}
	p, err := policy.ParseDocument(pair.Value, e.source(), service)
	if err != nil {
		e.err = err
	} else {
		e.doc = &p
	}
	return e
}

// unreachable wraps an error talking to Consul with where it was sent;
// ctx is the call's (see call).
func (s *kvStore) unreachable(ctx context.Context, op string, err error) error {
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return fmt.Errorf("%s in Consul KV at %s: no answer within %s (--timeout)", op, s.addr, s.timeout)
	}
	return fmt.Errorf("%s in Consul KV at %s: %w (set --consul-addr or CONSUL_HTTP_ADDR)", op, s.addr, err)
}

// list returns every policy key, sorted by service ("*" first).
func (s *kvStore) list(ctx context.Context) ([]kvEntry, error) {
	ctx, cancel := s.call(ctx)
	defer cancel()
	pairs, _, err := s.client.KV().List(policy.KVPrefix, (&api.QueryOptions{}).WithContext(ctx))
	if err != nil {
		return nil, s.unreachable(ctx, "listing "+policy.KVPrefix, err)
	}
	var out []kvEntry
	for _, pair := range pairs {
		if service, ok := policy.ServiceFromKVKey(pair.Key); ok {
			out = append(out, newKVEntry(service, pair))
		}
	}
	slices.SortFunc(out, func(a, b kvEntry) int { return strings.Compare(a.service, b.service) })
	return out, nil
}

// get returns service's key, or nil when there is none.
func (s *kvStore) get(ctx context.Context, service string) (*kvEntry, error) {
	key := policy.KVKey(service)
	ctx, cancel := s.call(ctx)
	defer cancel()
	pair, _, err := s.client.KV().Get(key, (&api.QueryOptions{}).WithContext(ctx))
	if err != nil {
		return nil, s.unreachable(ctx, "reading "+key, err)
	}
	if pair == nil {
		return nil, nil
	}
	e := newKVEntry(service, pair)
	return &e, nil
}

// kvWrite is one key to set. With cas, the write happens only if the key
// is still at index (0: only if it does not exist).
type kvWrite struct {
	key   string
	value []byte
	cas   bool
	index uint64
}

// casConflictError is a check-and-set that found the key changed.
type casConflictError struct {
	key      string
	expected uint64 // 0: expected absent
	current  uint64 // 0: absent now
	deleting bool
}

func (e *casConflictError) Error() string {
	expected := fmt.Sprintf("index %d", e.expected)
	if e.expected == 0 {
		expected = "no key (--cas-index 0: create only)"
	}
	now := fmt.Sprintf("it is at index %d", e.current)
	if e.current == 0 {
		now = "it does not exist"
	}
	what := "nothing was written"
	if e.deleting {
		what = "nothing was deleted"
	}
	return fmt.Sprintf("%s: check-and-set conflict: expected %s, but %s (changed since that version was read); %s. "+
		"Look at the change (sidecar policy diff, get), then try again", e.key, expected, now, what)
}

// write sets every key in one Consul transaction: all are written or none.
// It returns each key's new ModifyIndex.
func (s *kvStore) write(ctx context.Context, ws []kvWrite) ([]uint64, error) {
	const maxOps = 64 // Consul's limit on operations per transaction
	if len(ws) > maxOps {
		return nil, fmt.Errorf("%d documents to write; one apply writes at most %d (a Consul transaction): split the file", len(ws), maxOps)
	}
	ops := make(api.TxnOps, 0, len(ws))
	for _, w := range ws {
		op := &api.KVTxnOp{Verb: api.KVSet, Key: w.key, Value: w.value}
		if w.cas {
			op.Verb, op.Index = api.KVCAS, w.index
		}
		ops = append(ops, &api.TxnOp{KV: op})
	}
	tctx, cancel := s.call(ctx)
	defer cancel()
	ok, resp, _, err := s.client.Txn().Txn(ops, (&api.QueryOptions{}).WithContext(tctx))
	if err != nil {
		return nil, s.unreachable(tctx, "writing "+fmt.Sprint(len(ws))+" keys", err)
	}
	if !ok {
		var errs []error
		for _, te := range resp.Errors {
			if te.OpIndex < 0 || te.OpIndex >= len(ws) {
				errs = append(errs, errors.New(te.What))
				continue
			}
			w := ws[te.OpIndex]
			if w.cas {
				current, err := s.get(ctx, strings.TrimPrefix(w.key, policy.KVPrefix))
				if err == nil {
					c := &casConflictError{key: w.key, expected: w.index}
					if current != nil {
						c.current = current.index
					}
					errs = append(errs, c)
					continue
				}
			}
			errs = append(errs, fmt.Errorf("%s: %s", w.key, te.What))
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

// delete removes key; with cas only if it is still at index.
func (s *kvStore) delete(ctx context.Context, key string, cas bool, index uint64) error {
	dctx, cancel := s.call(ctx)
	defer cancel()
	w := (&api.WriteOptions{}).WithContext(dctx)
	if !cas {
		if _, err := s.client.KV().Delete(key, w); err != nil {
			return s.unreachable(dctx, "deleting "+key, err)
		}
		return nil
	}
	ok, _, err := s.client.KV().DeleteCAS(&api.KVPair{Key: key, ModifyIndex: index}, w)
	if err != nil {
		return s.unreachable(dctx, "deleting "+key, err)
	}
	if !ok {
		c := &casConflictError{key: key, expected: index, deleting: true}
		if current, err := s.get(ctx, strings.TrimPrefix(key, policy.KVPrefix)); err == nil && current != nil {
			c.current = current.index
		}
		return c
	}
	return nil
}
