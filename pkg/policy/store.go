package policy

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"go.yaml.in/yaml/v3"
)

// The sources of policy documents, lowest precedence first. They are also
// the (bounded) label values of the reload and rejection metrics.
const (
	SourceInline = "inline"
	SourceFile   = "file"
	SourceConsul = "consul"
)

// source indexes Store.layers, in precedence order.
type source int

const (
	inline source = iota
	file
	consul
	numSources
)

var sourceNames = [numSources]string{SourceInline, SourceFile, SourceConsul}

// KVDocument is the raw value of one Consul KV key under KVPrefix.
type KVDocument struct {
	Key         string
	Value       []byte
	ModifyIndex uint64
}

// SourceStats counts the updates of one source since the store began.
type SourceStats struct {
	// Source is SourceInline, SourceFile or SourceConsul.
	Source string
	// Reloads are accepted documents (a whole file counts once; each
	// Consul key once, a deleted key too).
	Reloads uint64
	// Rejections are documents that failed to parse or validate.
	Rejections uint64
}

// StoreOptions configures a Store. The zero value is usable.
type StoreOptions struct {
	// Logger receives accepted and rejected updates; nil discards them.
	Logger *slog.Logger
	// Now stamps rejections; nil means time.Now.
	Now func() time.Time
}

// Store holds the policy documents of three sources, inline (the config
// file), file (policyFile) and Consul KV, and serves the effective policy of
// every service from an immutable snapshot.
//
// Precedence is per service and per document: a service's own document is
// its Consul KV document if there is one, else its policyFile document,
// else its inline one; the "*" document is chosen the same way. The
// effective policy is Defaults, under the "*" document, under the service's
// own (see Effective); documents of different sources are never merged
// field by field.
//
// Each update of a source is parsed and validated before anything changes;
// the new effective policies are then computed and swapped in at once. A
// bad document is rejected: the last good one of that source stays in
// force and the rejection is recorded on the services it names (Status).
// A policy file is one unit (one bad document rejects the whole file
// update); Consul keys are judged one by one.
//
// The zero Store is not usable; use NewStore. Safe for concurrent use: For
// never blocks and does not allocate once a service has been asked for;
// the updates of each source are serialized, and an update being parsed
// holds up neither Statuses, Status and Stats nor the other sources. The
// *Policy values handed out are shared and must never be modified; a
// caller keeps the one it started a request with.
type Store struct {
	log *slog.Logger
	now func() time.Time

	snap atomic.Pointer[snapshot]
	// called holds every service For was asked about (service -> struct{}),
	// so that new snapshots compute them ahead of the request path, and
	// Statuses lists them.
	called sync.Map

	// fileMu and kvMu serialize the updates of the policy file and of
	// Consul KV, each taken for a whole update: documents are parsed under
	// them, not under mu, so that however long a parse takes it holds up
	// only the next update of its own source, never Statuses, Status,
	// Stats or the other sources. An update of a source that began later
	// is applied later. Taken before mu, never after.
	fileMu   sync.Mutex
	fileSeen string // guarded by fileMu: version of the newest policy file content seen, good or bad
	kvMu     sync.Mutex
	kvSeen   map[string]kvSeen // guarded by kvMu: service -> newest value seen, good or bad

	mu         sync.Mutex // guards everything below; held only to record an update and swap
	layers     [numSources]map[string]document
	rejections map[string]Rejection
	stats      [numSources]SourceStats
}

// testHookParse, when set, runs as an update of the policy file or Consul
// KV starts parsing.
var testHookParse func()

// document is one service's Policy document from one source.
type document struct {
	policy  Policy
	source  string // as Status.Source
	version string
}

type kvSeen struct {
	index uint64
	sum   [sha256.Size]byte
}

// snapshot is the immutable result of one update.
type snapshot struct {
	generation uint64
	own        map[string]document // the winning document of each service
	policies   map[string]Policy   // own, as Effective takes it
	// effective is computed ahead for "*", every service with a document
	// and every service called before the snapshot was made.
	effective map[string]*Policy
	// lazy holds services first called under this snapshot: service ->
	// *Policy.
	lazy sync.Map
}

// NewStore returns a store with no documents: every service has Defaults.
func NewStore(opts StoreOptions) *Store {
	s := &Store{log: opts.Logger, now: opts.Now, kvSeen: map[string]kvSeen{}, rejections: map[string]Rejection{}}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	s.log = s.log.With("component", "policy")
	if s.now == nil {
		s.now = time.Now
	}
	for i := range s.layers {
		s.layers[i] = map[string]document{}
		s.stats[i].Source = sourceNames[i]
	}
	s.mu.Lock()
	s.swap()
	s.mu.Unlock()
	return s
}

// For returns the effective policy of service. The result is shared and
// immutable; it stays valid (and unchanged) after later updates.
func (s *Store) For(service string) *Policy {
	snap := s.snap.Load()
	if p, ok := snap.effective[service]; ok {
		return p
	}
	if p, ok := snap.lazy.Load(service); ok {
		return p.(*Policy)
	}
	s.called.LoadOrStore(service, struct{}{})
	e := Effective(service, snap.policies)
	p, _ := snap.lazy.LoadOrStore(service, &e)
	return p.(*Policy)
}

// Generation counts the changes of the effective policies: it grows by one
// with each accepted update.
func (s *Store) Generation() uint64 { return s.snap.Load().generation }

// SetInline replaces the inline documents. All are validated first; if any
// is invalid, or two name the same service, nothing changes.
func (s *Store) SetInline(ps []Policy) error {
	layer := map[string]document{}
	var errs []error
	for i, p := range ps {
		err := p.Validate()
		switch {
		case p.Service == "":
			err = errors.New("service: missing")
		case layer[p.Service].source != "":
			err = fmt.Errorf("service %s has more than one policy", Quote(p.Service))
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("policies[%d]: %w", i, err))
			continue
		}
		layer[p.Service] = document{policy: p, source: SourceInline}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := errors.Join(errs...); err != nil {
		s.reject(inline, SourceInline, "", slices.Collect(maps.Keys(layer)), err)
		return err
	}
	s.layers[inline] = layer
	s.accepted(inline, SourceInline, "", len(layer))
	s.swap()
	return nil
}

// SetFile replaces the policy file's documents with the file's whole new
// content, data. If any document is invalid the update is rejected and the
// file's previous documents stay in force; the rejection is recorded on
// every service named in the old or the new content (on "*" if none is).
// The same content again changes nothing.
func (s *Store) SetFile(path string, data []byte) error {
	version := ContentVersion(data)
	src := "file:" + path
	s.fileMu.Lock()
	defer s.fileMu.Unlock()
	if version == s.fileSeen {
		return nil
	}
	s.fileSeen = version
	if testHookParse != nil {
		testHookParse()
	}
	ps, err := Parse(data, path)
	var named []string
	if err != nil {
		named = documentServices(data)
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		for name := range s.layers[file] {
			named = append(named, name)
		}
		s.reject(file, src, version, named, err)
		return err
	}
	layer := make(map[string]document, len(ps))
	for _, p := range ps {
		layer[p.Service] = document{policy: p, source: src, version: version}
	}
	s.layers[file] = layer
	s.clearRejections(func(r Rejection) bool { return r.Source == src })
	s.accepted(file, src, version, len(layer))
	s.swap()
	return nil
}

// ContentVersion is the version of a policy file's content: the first 12
// hex digits of its SHA-256.
func ContentVersion(data []byte) string {
	sum := sha256.Sum256(data)
	return hex.EncodeToString(sum[:6])
}

// SetConsul replaces the Consul KV documents with docs, the whole set of
// keys under KVPrefix by service. Each key is judged alone: a bad value is
// rejected and the key's last good document stays in force, while the
// other keys' updates are accepted. A key absent from docs is deleted. Keys
// whose ModifyIndex and value were seen before are skipped. The returned
// error joins the rejections of this update.
func (s *Store) SetConsul(docs map[string]KVDocument) error {
	s.kvMu.Lock()
	defer s.kvMu.Unlock()
	type parsed struct {
		service, src, version string
		policy                Policy
		err                   error
	}
	var updates []parsed
	for _, service := range slices.Sorted(maps.Keys(docs)) {
		d := docs[service]
		seen := kvSeen{index: d.ModifyIndex, sum: sha256.Sum256(d.Value)}
		if prev, ok := s.kvSeen[service]; ok && prev == seen {
			continue
		}
		s.kvSeen[service] = seen
		if testHookParse != nil {
			testHookParse()
		}
		u := parsed{service: service, src: "consul:" + d.Key, version: strconv.FormatUint(d.ModifyIndex, 10)}
		u.policy, u.err = ParseDocument(d.Value, u.src, service)
		updates = append(updates, u)
	}
	var deleted []string
	for service := range s.kvSeen {
		if _, ok := docs[service]; !ok {
			delete(s.kvSeen, service)
			deleted = append(deleted, service)
		}
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	layer := s.layers[consul]
	changed := false
	var errs []error
	for _, u := range updates {
		if u.err != nil {
			s.reject(consul, u.src, u.version, []string{u.service}, u.err)
			errs = append(errs, u.err)
			continue
		}
		layer[u.service] = document{policy: u.policy, source: u.src, version: u.version}
		s.clearRejections(func(r Rejection) bool { return r.Source == u.src })
		s.accepted(consul, u.src, u.version, 1)
		changed = true
	}
	for _, service := range deleted {
		src := "consul:" + KVKey(service)
		s.clearRejections(func(r Rejection) bool { return r.Source == src })
		if _, ok := layer[service]; ok {
			delete(layer, service)
			s.stats[consul].Reloads++
			s.log.Info("policy deleted", "source", src)
			changed = true
		}
	}
	if changed {
		s.swap()
	}
	return errors.Join(errs...)
}

// accepted counts and logs an accepted update. Callers hold s.mu.
func (s *Store) accepted(src source, name, version string, documents int) {
	s.stats[src].Reloads++
	s.log.Info("policy update accepted", "source", name, "version", version, "documents", documents)
}

// reject records a rejected update on services (on "*" if none). Callers
// hold s.mu.
func (s *Store) reject(src source, name, version string, services []string, err error) {
	s.stats[src].Rejections++
	s.log.Warn("policy update rejected; the last good policy stays in force", "source", name, "version", version, "err", err.Error())
	if len(services) == 0 {
		services = []string{Default}
	}
	r := Rejection{Source: name, Version: version, Error: err.Error(), At: s.now()}
	for _, service := range services {
		s.rejections[service] = r
	}
}

// clearRejections forgets the rejections that a newer good update of the
// same source made obsolete. Callers hold s.mu.
func (s *Store) clearRejections(obsolete func(Rejection) bool) {
	maps.DeleteFunc(s.rejections, func(_ string, r Rejection) bool { return obsolete(r) })
}

// swap computes the effective policies from the layers and publishes them.
// Callers hold s.mu.
func (s *Store) swap() {
	next := &snapshot{own: map[string]document{}, policies: map[string]Policy{}}
	if cur := s.snap.Load(); cur != nil {
		next.generation = cur.generation + 1
	}
	for _, layer := range s.layers {
		for service, d := range layer {
			next.own[service] = d
			next.policies[service] = d.policy
		}
	}
	next.effective = make(map[string]*Policy, len(next.own)+1)
	compute := func(service string) {
		if _, ok := next.effective[service]; !ok {
			e := Effective(service, next.policies)
			next.effective[service] = &e
		}
	}
	compute(Default)
	for service := range next.own {
		compute(service)
	}
	s.called.Range(func(k, _ any) bool {
		compute(k.(string))
		return true
	})
	s.snap.Store(next)
}

// Stats returns the counts of each source, in precedence order (inline,
// file, consul).
func (s *Store) Stats() []SourceStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.stats[:])
}

// Statuses reports the policy in force of "*", of every service with a
// document or a rejection, and of every service asked for, sorted by
// service ("*" first).
func (s *Store) Statuses() []Status {
	s.mu.Lock()
	snap := s.snap.Load()
	rejections := maps.Clone(s.rejections)
	s.mu.Unlock()
	names := map[string]bool{Default: true}
	for service := range snap.own {
		names[service] = true
	}
	for service := range rejections {
		names[service] = true
	}
	s.called.Range(func(k, _ any) bool {
		names[k.(string)] = true
		return true
	})
	out := make([]Status, 0, len(names))
	for _, service := range slices.Sorted(maps.Keys(names)) {
		out = append(out, status(snap, service, rejections))
	}
	return out
}

// Status reports the policy in force for service, which need not have been
// asked for, and whether service is a valid name ("*" or a service name).
func (s *Store) Status(service string) (Status, bool) {
	if service != Default && !ValidServiceName(service) {
		return Status{}, false
	}
	s.mu.Lock()
	snap := s.snap.Load()
	rejections := map[string]Rejection{}
	if r, ok := s.rejections[service]; ok {
		rejections[service] = r
	}
	s.mu.Unlock()
	return status(snap, service, rejections), true
}

func status(snap *snapshot, service string, rejections map[string]Rejection) Status {
	st := Status{Service: service, Source: "default"}
	if d, ok := snap.own[service]; ok {
		st.Source, st.Version = d.source, d.version
	}
	if p, ok := snap.effective[service]; ok {
		st.Effective = *p
	} else if p, ok := snap.lazy.Load(service); ok {
		st.Effective = *p.(*Policy)
	} else {
		st.Effective = Effective(service, snap.policies)
	}
	if r, ok := rejections[service]; ok {
		st.LastRejection = &r
	}
	return st
}

// documentServices lists, as best it can, the services named by the
// documents of a policy file that did not parse, so that the rejection can
// be shown on them. A file too large to parse names none.
func documentServices(data []byte) []string {
	if len(data) > MaxDocumentBytes {
		return nil
	}
	var out []string
	dec := yaml.NewDecoder(bytes.NewReader(data))
	for {
		var doc yaml.Node
		if dec.Decode(&doc) != nil {
			return out
		}
		if len(doc.Content) == 0 || doc.Content[0].Kind != yaml.MappingNode {
			continue
		}
		m := doc.Content[0].Content
		for i := 0; i+1 < len(m); i += 2 {
			if v := m[i+1].Value; m[i].Value == "service" && (v == Default || ValidServiceName(v)) {
				out = append(out, v)
			}
		}
	}
}
