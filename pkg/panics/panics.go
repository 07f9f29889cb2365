// Package panics keeps a panic in one request or one background loop from
// stopping the process: Recover logs it with its stack and counts it by
// where it happened, so that it shows in the metrics
// (sidecar_panics_total{where}) instead of in a restarted pod.
//
// A panic is a bug; recovering is what keeps one bad request or one bad
// answer from Consul from taking every other request down with it. Code that
// recovers goes on in a state it can trust: a request is aborted, a watcher
// starts over.
package panics

import (
	"fmt"
	"log/slog"
	"runtime"
	"sort"
	"sync"
	"sync/atomic"
)

var (
	logger atomic.Pointer[slog.Logger]

	mu     sync.Mutex // guards counts' keys; values are atomics
	counts = map[string]*atomic.Uint64{}
)

// SetLogger sets where recovered panics are logged (slog.Default until set).
// Safe for concurrent use.
func SetLogger(l *slog.Logger) { logger.Store(l) }

// Recover, deferred directly (`defer panics.Recover("discovery.watch")`),
// stops a panic of the calling goroutine, logs it with its stack and counts
// it under where. where must come from a small fixed set: it is a metric
// label. It reports nothing when there is no panic.
func Recover(where string) {
	if v := recover(); v != nil {
		Report(where, v)
	}
}

// Report logs and counts a panic value already recovered by the caller
// (which then decides how to go on: abort a request, restart a loop).
func Report(where string, v any) {
	buf := make([]byte, 64<<10)
	buf = buf[:runtime.Stack(buf, false)]
	counter(where).Add(1)
	l := logger.Load()
	if l == nil {
		l = slog.Default()
	}
	l.Error("recovered from a panic", "where", where, "panic", fmt.Sprint(v), "stack", string(buf))
}

func counter(where string) *atomic.Uint64 {
	mu.Lock()
	defer mu.Unlock()
	c := counts[where]
	if c == nil {
		c = new(atomic.Uint64)
		counts[where] = c
	}
	return c
}

// Count is one where and the panics recovered there.
type Count struct {
	Where string
	N     uint64
}

// Counts returns the panics recovered so far by where, sorted by where.
func Counts() []Count {
	mu.Lock()
	defer mu.Unlock()
	out := make([]Count, 0, len(counts))
	for w, c := range counts {
		out = append(out, Count{Where: w, N: c.Load()})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Where < out[j].Where })
	return out
}
