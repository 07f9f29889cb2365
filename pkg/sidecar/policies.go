package sidecar

import (
	"fmt"
	"log/slog"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/config"
	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/filewatch"
	"github.com/sidecar-mesh/sidecar/pkg/policy"
	"github.com/sidecar-mesh/sidecar/pkg/readlimit"
)

// policySources is the policy store and what feeds it: the config file's
// inline policies (fixed), the policy file (watched) and, with Consul
// configured, the policy keys in Consul KV (watched). Per service, KV beats
// the file, which beats inline (see policy.Store).
type policySources struct {
	store   *policy.Store
	log     *slog.Logger
	path    string // policyFile; empty: none
	initial []byte // the policy file's content at startup

	file *filewatch.Watcher       // nil until watch, and without policyFile
	kv   *discovery.PolicyWatcher // nil until watch, and without Consul
}

// loadPolicies builds the store from the inline policies and the policy
// file. Either being invalid fails startup; after startup a bad update is
// rejected and the last good policy stays in force.
func loadPolicies(cfg *config.Config, log *slog.Logger) (*policySources, error) {
	inline, err := cfg.InlinePolicies()
	if err != nil {
		return nil, err
	}
	ps := &policySources{store: policy.NewStore(policy.StoreOptions{Logger: log}), log: log, path: cfg.PolicyFile}
	if err := ps.store.SetInline(inline); err != nil {
		return nil, err
	}
	if ps.path != "" {
		if ps.initial, err = readlimit.ReadFile(ps.path); err != nil {
			return nil, fmt.Errorf("policyFile: %w", err)
		}
		if err := ps.store.SetFile(ps.path, ps.initial); err != nil {
			return nil, fmt.Errorf("policyFile:\n%w", err)
		}
	}
	return ps, nil
}

// watch starts following the policy file and, given a Consul client in
// kv, the policy keys in Consul KV. It waits up to co.FirstWait (default
// 1s) for Consul's first answer, so that the first requests already have
// KV's policies; without an answer it goes on with the file and inline
// ones.
func (ps *policySources) watch(kv discovery.PolicyWatchConfig, co *config.Consul) error {
	if ps.path != "" {
		w, err := filewatch.Start(filewatch.Config{Path: ps.path, Initial: ps.initial, Logger: ps.log}, func(data []byte) {
			// A rejection is logged, counted and shown by the store.
			_ = ps.store.SetFile(ps.path, data)
		})
		if err != nil {
			return fmt.Errorf("policyFile: watching %s: %w", ps.path, err)
		}
		ps.file = w
	}
	if kv.Client == nil {
		return nil
	}
	w, err := discovery.WatchPolicies(kv, func(docs map[string]policy.KVDocument) { _ = ps.store.SetConsul(docs) })
	if err != nil {
		return err
	}
	ps.kv = w
	wait := co.FirstWait.D()
	if wait <= 0 {
		wait = time.Second
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-w.Synced():
	case <-t.C:
		ps.log.Warn("no answer from Consul KV yet; starting with the inline and file policies", "waited", wait.String())
	}
	return nil
}

// close stops the watchers; the store keeps serving the last policies.
func (ps *policySources) close() {
	if ps == nil {
		return
	}
	if ps.file != nil {
		ps.file.Close()
	}
	if ps.kv != nil {
		ps.kv.Close()
	}
}
