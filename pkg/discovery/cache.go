package discovery

import (
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// setCache persists the last known good endpoint sets to a small JSON file,
// so that a sidecar restarted while Consul is down still routes. Sets older
// than maxAge are not used. Safe for concurrent use; a zero path disables it.
type setCache struct {
	path   string
	maxAge time.Duration
	log    *slog.Logger

	mu   sync.Mutex // guards sets and file writes
	sets map[string]*EndpointSet
}

func newSetCache(path string, maxAge time.Duration, log *slog.Logger) *setCache {
	c := &setCache{path: path, maxAge: maxAge, log: log, sets: map[string]*EndpointSet{}}
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
		}
	}
	log.Info("loaded persisted endpoints", "file", path, "services", len(c.sets))
	return c
}

// get returns a persisted set young enough to use, marked as persisted.
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

// put records a set from Consul and rewrites the file atomically.
func (c *setCache) put(s *EndpointSet) {
	if c.path == "" {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.sets[s.Service] = s
	b, err := json.Marshal(c.sets)
	if err == nil {
		err = writeFileAtomic(c.path, b)
	}
	if err != nil {
		c.log.Warn("cannot persist endpoints", "file", c.path, "err", err)
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
