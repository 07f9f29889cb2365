package main

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/policy"
)

// kvStore is the policy commands' view of the policy keys in Consul KV
// (discovery.PolicyKV): each key parsed as a policy document, each error
// worded for the command line.
type kvStore struct {
	kv   *discovery.PolicyKV
	addr string // for messages: without userinfo or token
}

// newKVStore is a client of the Consul agent at addr (host:port or URL)
// with token; TLS settings come from the standard CONSUL_* environment.
// Each call waits at most timeout for Consul's answer.
func newKVStore(addr, token string, timeout time.Duration) (*kvStore, error) {
	kv, err := discovery.NewPolicyKV(discovery.PolicyKVConfig{Address: addr, Token: token, Timeout: timeout})
	if err != nil {
		return nil, err
	}
	return &kvStore{kv: kv, addr: kv.Addr()}, nil
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

func newKVEntry(service string, d policy.KVDocument) kvEntry {
	e := kvEntry{service: service, key: d.Key, index: d.ModifyIndex, raw: d.Value}
	p, err := policy.ParseDocument(d.Value, e.source(), service)
	if err != nil {
		e.err = err
	} else {
		e.doc = &p
	}
	return e
}

// list returns every policy key, sorted by service ("*" first).
func (s *kvStore) list(ctx context.Context) ([]kvEntry, error) {
	docs, err := s.kv.List(ctx)
	if err != nil {
		return nil, cliError(err)
	}
	out := make([]kvEntry, 0, len(docs))
	for service, d := range docs {
		out = append(out, newKVEntry(service, d))
	}
	slices.SortFunc(out, func(a, b kvEntry) int { return strings.Compare(a.service, b.service) })
	return out, nil
}

// get returns service's key, or nil when there is none.
func (s *kvStore) get(ctx context.Context, service string) (*kvEntry, error) {
	d, err := s.kv.Get(ctx, service)
	if err != nil || d == nil {
		return nil, cliError(err)
	}
	e := newKVEntry(service, *d)
	return &e, nil
}

// write sets every key in one Consul transaction: all are written or none.
// It returns each key's new ModifyIndex.
func (s *kvStore) write(ctx context.Context, ws []discovery.PolicyWrite) ([]uint64, error) {
	indexes, err := s.kv.Write(ctx, ws)
	return indexes, cliError(err)
}

// delete removes key; with cas only if it is still at index.
func (s *kvStore) delete(ctx context.Context, key string, cas bool, index uint64) error {
	return cliError(s.kv.Delete(ctx, key, cas, index))
}

// cliError words an error of discovery.PolicyKV for the command line: a
// conflict says what to do next, a failed call names the flag or variable
// that changes it.
func cliError(err error) error {
	if joined, ok := err.(interface{ Unwrap() []error }); ok {
		var errs []error
		for _, e := range joined.Unwrap() {
			errs = append(errs, cliError(e))
		}
		return errors.Join(errs...)
	}
	var conflict *discovery.CASConflictError
	if errors.As(err, &conflict) {
		return &casConflictError{key: conflict.Key, expected: conflict.Expected, current: conflict.Current, deleting: conflict.Deleting}
	}
	var call *discovery.KVCallError
	switch {
	case !errors.As(err, &call):
		return err
	case call.Timeout > 0:
		return fmt.Errorf("%w (--timeout)", err)
	default:
		return fmt.Errorf("%w (set --consul-addr or CONSUL_HTTP_ADDR)", err)
	}
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
