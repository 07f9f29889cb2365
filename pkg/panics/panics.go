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
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"runtime"
	"sort"
	"sync"
	"sync/atomic"
	"time"
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

// Run calls fn and returns when it returns. A panic in fn is reported
// under where, and fn is called again after a pause that grows from 100 ms
// to 30 s with each panic, so that a loop that owns a job (a watcher, a
// prober) goes on doing it; Run returns when ctx ends.
func Run(ctx context.Context, where string, fn func(context.Context)) {
	delay := 100 * time.Millisecond
	for runOnce(ctx, where, fn) {
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		delay = min(2*delay, 30*time.Second)
	}
}

// runOnce calls fn and reports whether it panicked.
func runOnce(ctx context.Context, where string, fn func(context.Context)) (panicked bool) {
	defer func() {
		if v := recover(); v != nil {
			Report(where, v)
			panicked = true
		}
	}()
	fn(ctx)
	return false
}

// Handler returns h with panics reported under where: the request is
// aborted as net/http aborts it (the connection is closed, or the HTTP/2
// stream reset), and the process goes on. http.ErrAbortHandler, the way a
// handler ends a request on purpose, is not a bug and is not reported.
func Handler(where string, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer func() {
			if v := recover(); v != nil {
				if v != http.ErrAbortHandler {
					Report(where, v)
				}
				panic(http.ErrAbortHandler)
			}
		}()
		h.ServeHTTP(w, r)
	})
}
