package outbound

import (
	"context"
	"sync"
	"sync/atomic"
	"time"
)

// limiter is one service's concurrency limit: at most max requests in
// flight, and up to maxQueued more waiting, first come first served, for a
// slot to free up, each for at most its wait limit. Written here rather
// than taken from x/sync/semaphore because the limit is the policy's,
// read on every request: a reload changes it under the requests in
// flight, where a semaphore's size is fixed when it is made. A request
// that finds a slot and nobody waiting costs one atomic add; the lock is
// taken only when requests wait.
type limiter struct {
	inFlight atomic.Int64
	queued   atomic.Int64 // len(waiters), read without the lock

	mu      sync.Mutex // guards waiters and their granted flags
	waiters []*waiter
}

type waiter struct {
	ready   chan struct{} // closed when granted
	granted bool
}

// tryAcquire takes a slot if one is free.
func (l *limiter) tryAcquire(max int64) bool {
	if l.inFlight.Add(1) <= max {
		return true
	}
	l.inFlight.Add(-1)
	return false
}

// tryFast takes a slot if one is free and nobody waits for one: the
// common case, one atomic add (two when full).
func (l *limiter) tryFast(max int64) bool {
	return l.queued.Load() == 0 && l.tryAcquire(max)
}

// acquire takes a slot: at once when one is free and nobody waits, else
// after waiting in line for at most wait (maxQueued waiting at most). It
// reports whether the request got a slot (false: the line was full, the
// wait ran out or ctx ended) and how long it waited for it.
func (l *limiter) acquire(ctx context.Context, max int64, maxQueued int, wait time.Duration) (bool, time.Duration) {
	if l.tryFast(max) {
		return true, 0
	}
	start := time.Now()
	ok := l.wait(ctx, max, maxQueued, wait)
	return ok, time.Since(start)
}

// wait is acquire's slow path: the line.
func (l *limiter) wait(ctx context.Context, max int64, maxQueued int, wait time.Duration) bool {
	if maxQueued <= 0 || wait <= 0 {
		return false
	}
	l.mu.Lock()
	if len(l.waiters) >= maxQueued {
		l.mu.Unlock()
		return false
	}
	w := &waiter{ready: make(chan struct{})}
	l.waiters = append(l.waiters, w)
	l.queued.Add(1)
	// A slot may have freed up before this waiter was in line, when release
	// found nobody to hand it to.
	if l.waiters[0] == w && l.tryAcquire(max) {
		l.remove(w)
		l.mu.Unlock()
		return true
	}
	l.mu.Unlock()

	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-w.ready:
		return true
	case <-t.C:
	case <-ctx.Done():
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if w.granted {
		return true // granted as it gave up: the slot is its own
	}
	l.remove(w)
	return false
}

// release gives a slot back, to the first waiter if there is one.
func (l *limiter) release(max int64) {
	l.inFlight.Add(-1)
	if l.queued.Load() == 0 {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	for len(l.waiters) > 0 && l.tryAcquire(max) {
		w := l.waiters[0]
		l.remove(w)
		w.granted = true
		close(w.ready)
	}
}

// remove takes w out of the line; l.mu held.
func (l *limiter) remove(w *waiter) {
	for i, x := range l.waiters {
		if x == w {
			n := len(l.waiters) - 1
			copy(l.waiters[i:], l.waiters[i+1:])
			l.waiters[n] = nil
			l.waiters = l.waiters[:n]
			l.queued.Add(-1)
			return
		}
	}
}

// waiting reports how many requests wait in line.
func (l *limiter) waiting() int64 { return l.queued.Load() }
