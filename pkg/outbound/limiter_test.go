package outbound

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// Waiters get slots in the order they came, as slots free up; one that
// waited its limit out gets none; a full line refuses at once.
func TestLimiterQueue(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var l limiter
		ctx := context.Background()
		if ok1, _ := l.acquire(ctx, 2, 2, time.Second); !ok1 {
			t.Fatal("the first request did not get a slot")
		}
		if ok2, _ := l.acquire(ctx, 2, 2, time.Second); !ok2 {
			t.Fatal("the second request did not get the second slot")
		}
		var order []int
		var mu sync.Mutex
		got := make(chan bool, 3)
		for i := range 2 {
			go func() {
				ok, _ := l.acquire(ctx, 2, 2, 10*time.Second)
				mu.Lock()
				order = append(order, i)
				mu.Unlock()
				got <- ok
			}()
			synctest.Wait() // i is in line before the next comes
		}
		if l.waiting() != 2 {
			t.Fatalf("%d waiting, want 2", l.waiting())
		}
		if ok, _ := l.acquire(ctx, 2, 2, time.Second); ok {
			t.Fatal("a third waiter got a slot with the line full (maxQueued 2)")
		}
		l.release(2)
		if !<-got {
			t.Fatal("the first waiter got no slot on a release")
		}
		l.release(2)
		if !<-got {
			t.Fatal("the second waiter got no slot on a release")
		}
		if order[0] != 0 || order[1] != 1 {
			t.Errorf("slots went to waiters %v, want [0 1] (first come first served)", order)
		}
		if n := l.inFlight.Load(); n != 2 {
			t.Errorf("%d in flight after two hand-overs, want 2", n)
		}

		// Nobody releases: the wait runs out, exactly at its limit.
		start := time.Now()
		ok, reported := l.acquire(ctx, 2, 2, 250*time.Millisecond)
		if ok {
			t.Fatal("got a slot that nobody released")
		}
		if waited := time.Since(start); waited != 250*time.Millisecond || reported != waited {
			t.Errorf("gave up after %v (reported %v), want 250ms", waited, reported)
		}
		// The caller going away ends the wait too.
		cctx, cancel := context.WithCancel(ctx)
		go func() { time.Sleep(100 * time.Millisecond); cancel() }()
		if ok, _ := l.acquire(cctx, 2, 2, time.Hour); ok {
			t.Fatal("got a slot after the caller went away")
		}
		if l.waiting() != 0 {
			t.Errorf("%d still waiting, want 0", l.waiting())
		}
		// No line at all: refused at once.
		if ok, _ := l.acquire(ctx, 2, 0, time.Hour); ok {
			t.Fatal("got a slot over the limit without a line")
		}
	})
}

// Under contention from many goroutines the limit holds, and no waiter
// misses a slot that freed up: with waits far longer than the work, every
// request gets one.
func TestLimiterNoLostWakeups(t *testing.T) {
	const max, workers, rounds = 3, 16, 300
	var l limiter
	var now, peak, refused atomic.Int64
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for range rounds {
				if ok, _ := l.acquire(context.Background(), max, workers, time.Minute); !ok {
					refused.Add(1)
					continue
				}
				n := now.Add(1)
				for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
				}
				now.Add(-1)
				l.release(max)
			}
		})
	}
	wg.Wait()
	if refused.Load() != 0 {
		t.Errorf("%d of %d requests refused; want 0 (the line has room for every worker)", refused.Load(), workers*rounds)
	}
	if peak.Load() > max {
		t.Errorf("%d in flight at once, want at most %d", peak.Load(), max)
	}
	if l.inFlight.Load() != 0 || l.waiting() != 0 {
		t.Errorf("after the run: %d in flight, %d waiting; want 0 and 0", l.inFlight.Load(), l.waiting())
	}
}
