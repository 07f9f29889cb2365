package outbound

// Unit tests of the adaptive concurrency limit in a testing/synctest
// bubble: a modelled service (workers that each serve one request at a
// time, the rest waiting first come first served, as a server's thread
// pool) under an open-loop load, all in virtual time. The limiter and the
// controller are the real ones; the chain is left out.

import (
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/policy"
)

// model is a service of workers; each request takes service time of one.
type model struct {
	workers atomic.Pointer[chan struct{}]
	service atomic.Int64 // time.Duration
}

func newModel(workers int, service time.Duration) *model {
	m := &model{}
	m.setWorkers(workers)
	m.service.Store(int64(service))
	return m
}

// setWorkers gives the service n workers from now on (those at work
// finish as they were).
func (m *model) setWorkers(n int) {
	w := make(chan struct{}, n)
	m.workers.Store(&w)
}

func (m *model) serve() {
	w := *m.workers.Load()
	w <- struct{}{}
	time.Sleep(time.Duration(m.service.Load()))
	<-w
}

// openLoad drives a limiter with an adaptive limit over a model.
type openLoad struct {
	m        *model
	lim      limiter
	a        adaptive
	cc       policy.Concurrency
	wg       sync.WaitGroup
	served   atomic.Int64
	shed     atomic.Int64
	slowest  atomic.Int64 // the longest a served request took, this phase
	lo, hi   atomic.Int64 // the lowest and highest limit seen, this phase
	watching atomic.Bool
}

func newLoad(m *model, maxInFlight int) *openLoad {
	return &openLoad{m: m, cc: policy.Concurrency{MaxInFlight: &maxInFlight, Adaptive: new(true)}}
}

func (l *openLoad) bounds() (int64, int64) { return int64(l.cc.Floor()), int64(*l.cc.MaxInFlight) }

// run offers rate requests per second for d, open loop: each goes out on
// schedule whatever happened to those before it.
func (l *openLoad) run(rate int, d time.Duration) {
	l.served.Store(0)
	l.shed.Store(0)
	l.slowest.Store(0)
	l.lo.Store(1 << 40)
	l.hi.Store(0)
	every := time.Second / time.Duration(rate)
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(every) {
		l.wg.Go(l.request)
	}
	l.wg.Wait()
}

func (l *openLoad) request() {
	floor, ceiling := l.bounds()
	n := l.a.current(floor, ceiling, time.Now())
	l.seen(n)
	if !l.lim.tryAcquire(n) {
		l.shed.Add(1)
		return
	}
	start := time.Now()
	l.m.serve()
	took := time.Since(start)
	l.a.observe(start, time.Now(), took, l.lim.inFlight.Load(), floor, ceiling)
	l.lim.release(n)
	l.served.Add(1)
	for s := l.slowest.Load(); int64(took) > s && !l.slowest.CompareAndSwap(s, int64(took)); s = l.slowest.Load() {
	}
}

func (l *openLoad) seen(n int64) {
	for v := l.lo.Load(); n < v && !l.lo.CompareAndSwap(v, n); v = l.lo.Load() {
	}
	for v := l.hi.Load(); n > v && !l.hi.CompareAndSwap(v, n); v = l.hi.Load() {
	}
}

func (l *openLoad) limit() int64 { return l.a.cur.Load() }

// Latency that rises because the service queues (it lost most of its
// workers) makes the limit fall, keeping the queue short and the service
// busy; when latency recovers (the workers are back) the limit rises again
// to what the load needs. Latency that rises with no queue (the service got
// slower) drives the limit down to the floor, never under it; held there,
// the limit takes the latency at the floor as the service's new minRTT and
// rises to what the load needs at it.
func TestAdaptiveFollowsLatency(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		m := newModel(1000, 10*time.Millisecond) // no queue: latency is the service's own
		l := newLoad(m, 1000)
		// 2000 req/s of 10ms: 20 in flight.
		l.run(2000, 3*time.Second)
		before := l.limit()
		if before < 20 || l.shed.Load() > 200 {
			t.Fatalf("at 10ms and 20 in flight: limit %d, %d of %d shed; want the limit at 20 or more and few shed (the first probe's)",
				before, l.shed.Load(), l.served.Load()+l.shed.Load())
		}
		if st := l.a.minRTT; st != 10*time.Millisecond {
			t.Errorf("minRTT %v, want 10ms", st)
		}

		m.setWorkers(10) // capacity 1000 req/s: half the load queues
		l.run(2000, 3*time.Second)
		if after := l.limit(); after >= before || after > 20 {
			t.Errorf("the service queueing: limit %d -> %d, want it lower, at most 20 (10 workers and a little queue)", before, after)
		}
		if served := l.served.Load(); served < 2700 {
			t.Errorf("the service queueing: %d served in 3s, want at least 2700 (90%% of its capacity)", served)
		}
		if slow := time.Duration(l.slowest.Load()); slow > 200*time.Millisecond {
			t.Errorf("the service queueing: the slowest request took %v, want at most 200ms", slow)
		}
		low := l.limit()
		t.Logf("10ms, 1000 workers: limit %d; 10 workers: limit %d, served %d, shed %d, slowest %v", before, low, l.served.Load(), l.shed.Load(), time.Duration(l.slowest.Load()))

		m.setWorkers(1000)
		l.run(2000, 3*time.Second)
		if got := l.limit(); got < 20 || got <= low {
			t.Errorf("the workers back for 3s: limit %d -> %d, want it to rise to 20 or more (the load's 20 in flight)", low, got)
		}
		if l.shed.Load() > l.served.Load()/10 {
			t.Errorf("the workers back: %d shed, %d served; want under a tenth shed", l.shed.Load(), l.served.Load())
		}

		t.Logf("workers back: limit %d, served %d, shed %d", l.limit(), l.served.Load(), l.shed.Load())
		m.service.Store(int64(40 * time.Millisecond)) // 4x slower, no queue
		l.run(2000, 5*time.Second)
		if lo := l.lo.Load(); lo != policy.AdaptiveFloor {
			t.Errorf("latency 10ms -> 40ms: lowest limit %d, want the floor %d", lo, policy.AdaptiveFloor)
		}
		if l.a.minRTT != 40*time.Millisecond {
			t.Errorf("after 5s at 40ms: minRTT %v, want 40ms (taken at the floor)", l.a.minRTT)
		}
		t.Logf("40ms: limit %d (lowest %d), served %d, shed %d", l.limit(), l.lo.Load(), l.served.Load(), l.shed.Load())
		if got := l.limit(); got < 80 {
			t.Errorf("after minRTT was taken at 40ms: limit %d, want 80 or more (2000 req/s of 40ms)", got)
		}
	})
}

// Overload at twice a service's capacity: the limit settles a little over
// the service's workers, so that nearly all of its capacity is used while
// what it cannot serve is shed at once, and a served request waits little
// at the service (latency stays within a few times the service's own).
// minRTT goes unconfirmed under a standing queue: probes measure it again
// and it stays right.
func TestAdaptiveOverload(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const workers, service = 4, 20 * time.Millisecond // capacity 200 req/s
		m := newModel(workers, service)
		l := newLoad(m, 1024)
		l.run(400, 70*time.Second) // two probes or more
		served, shed := l.served.Load(), l.shed.Load()
		capacity := int64(70 * 200)
		if served < capacity*9/10 {
			t.Errorf("served %d of %d offered (capacity %d), want at least 90%% of capacity", served, served+shed, capacity)
		}
		if l.a.minRTT != service {
			t.Errorf("minRTT %v, want %v", l.a.minRTT, service)
		}
		// The standing queue never confirms minRTT: probes measure it.
		if since := time.Since(l.a.confirmed); since > policy.AdaptiveProbeInterval*3/2 {
			t.Errorf("minRTT last measured %v ago, want a probe within %v", since, policy.AdaptiveProbeInterval*3/2)
		}
		if lim := l.limit(); lim < workers || lim > 3*workers {
			t.Errorf("limit %d, want it between %d and %d (the service's %d workers, and a little queue)", lim, workers, 3*workers, workers)
		}
		if hi := l.hi.Load(); hi > 64 {
			t.Errorf("the limit rose to %d, want it kept near the workers (64 at most)", hi)
		}
		if slow := time.Duration(l.slowest.Load()); slow > 8*service {
			t.Errorf("the slowest served request took %v, want at most %v", slow, 8*service)
		}
		t.Logf("served %d (%.0f%% of capacity), shed %d, limit %d (%d to %d), slowest %v",
			served, 100*float64(served)/float64(capacity), shed, l.limit(), l.lo.Load(), l.hi.Load(), time.Duration(l.slowest.Load()))
	})
}

// The ceiling is concurrency.maxInFlight, however fast the service; the
// floor is concurrency.maxInFlight too when that is lower than
// AdaptiveFloor.
func TestAdaptiveBounds(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l := newLoad(newModel(1000, 10*time.Millisecond), 16)
		l.run(5000, 2*time.Second) // 50 in flight wanted
		if hi := l.hi.Load(); hi != 16 {
			t.Errorf("highest limit %d, want the ceiling 16", hi)
		}
		if peak := l.limit(); peak != 16 {
			t.Errorf("limit %d, want 16", peak)
		}

		l = newLoad(newModel(1000, 10*time.Millisecond), 2)
		if f := l.cc.Floor(); f != 2 {
			t.Fatalf("floor %d with maxInFlight 2, want 2", f)
		}
		l.run(1000, time.Second)
		if lo, hi := l.lo.Load(), l.hi.Load(); lo != 2 || hi != 2 {
			t.Errorf("limit between %d and %d, want 2 (floor and ceiling both)", lo, hi)
		}

		// A reload that lowers the ceiling takes effect at once.
		l = newLoad(newModel(1000, 10*time.Millisecond), 64)
		l.run(5000, 2*time.Second)
		*l.cc.MaxInFlight = 8
		floor, ceiling := l.bounds()
		if got := l.a.current(floor, ceiling, time.Now()); got != 8 {
			t.Errorf("ceiling lowered to 8: limit %d, want 8", got)
		}
	})
}
