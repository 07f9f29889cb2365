package discovery

import (
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"
)

// setCache keeps the last known good endpoint set of each service, with
// the last time Consul confirmed it, so that a set can stand in while
// Consul does not answer: in memory for a watch started again (an idle
// service asked for anew during an outage), and in a small JSON file, when
// it has a path, for a sidecar restarted during an outage. A set Consul
// has not confirmed for maxAge is not used, and is forgotten. Safe for
// concurrent use.
type setCache struct {
	path   string
	maxAge time.Duration
	log    *slog.Logger

	mu   sync.Mutex              // guards sets, written and file writes
	sets map[string]*EndpointSet // UpdatedAt: the last confirmation
	// written is, by service, the UpdatedAt of its set in the file.
	written map[string]time.Time
}

func newSetCache(path string, maxAge time.Duration, log *slog.Logger) *setCache {
	c := &setCache{path: path, maxAge: maxAge, log: log, sets: map[string]*EndpointSet{}, written: map[string]time.Time{}}
	if path == "" {
		return c
	}
	b, err := os.ReadFile(path)
	if err != nil {
		if !os.IsNotExist(err) {
			log.Warn("cannot read the persisted endpoints", "file", path, "err", err)
		}
		return c
	}
	var sets map[string]*EndpointSet
	if err := json.Unmarshal(b, &sets); err != nil {
		log.Warn("ignoring an unreadable endpoints file", "file", path, "err", err)
		return c
	}
	for name, s := range sets {
		if s != nil && s.Service == name && time.Since(s.UpdatedAt) <= maxAge {
			c.sets[name] = s
			c.written[name] = s.UpdatedAt
		}
	}
	log.Info("loaded persisted endpoints", "file", path, "services", len(c.sets))
	return c
}

// get returns a kept set young enough to use, marked as persisted.
func (c *setCache) get(service string) *EndpointSet {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.sets[service]
	if s == nil || time.Since(s.UpdatedAt) > c.maxAge {
		return nil
	}
	cp := *s
	cp.Source = "consul-persisted"
	return &cp
}

// put records s as Consul's answer for its service at time at: a new set,
// or the same one confirmed. A new set is written to the file at once; a
// confirmation only once a tenth of maxAge has passed since the one in the
// file, so that a stable service, which Consul confirms at every blocking
// query's wait, costs a rewrite of the file now and then rather than at
// each answer, and its set in the file is never older than a tenth of
// maxAge more than its last confirmation.
func (c *setCache) put(s *EndpointSet, at time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	prev := c.sets[s.Service]
	cp := *s
	cp.UpdatedAt = at
	c.sets[s.Service] = &cp
	unchanged := prev != nil && slices.Equal(prev.Endpoints, s.Endpoints)
	if unchanged && (c.path == "" || at.Sub(c.written[s.Service]) < c.maxAge/10) {
		return
	}
	for name, set := range c.sets {
		if at.Sub(set.UpdatedAt) > c.maxAge {
			delete(c.sets, name) // no longer usable: not kept, not written
			delete(c.written, name)
		}
	}
	if c.path == "" {
		return
	}
	b, err := json.Marshal(c.sets)
	if err == nil {
		err = writeFileAtomic(c.path, b)
	}
	if err != nil {
		c.log.Warn("cannot persist endpoints", "file", c.path, "err", err)
		return
	}
	for name, set := range c.sets {
		c.written[name] = set.UpdatedAt
	}
}

func writeFileAtomic(path string, b []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".endpoints-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}
