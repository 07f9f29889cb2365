//go:build linux

package engine

import (
	"container/heap"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sidecar-mesh/sidecar/pkg/panics"
)

// Engine serves a listener on event loops. Safe for concurrent use.
type Engine struct {
	cfg   Config
	lfd   int // the listening socket, shared by the loops (EPOLLEXCLUSIVE)
	ln    net.Listener
	loops []*loop

	state       atomic.Int32 // engineNew, then engineServing or engineClosed
	inShutdown  atomic.Bool
	noKeepAlive atomic.Bool  // every answer closes its connection (draining)
	active      atomic.Int64 // exchanges in progress, over every loop
	conns       atomic.Int64 // client connections the loops own
	closeOnce   sync.Once
	done        chan struct{} // closed once every loop has returned
	served      sync.WaitGroup
}

// An engine's states: Serve or Close, whichever comes first, moves it on.
const (
	engineNew int32 = iota
	engineServing
	engineClosed
)

// New prepares an engine for ln, a TCP listener it takes over: Serve
// accepts on its socket, and closing the engine closes it.
func New(ln net.Listener, cfg Config) (*Engine, error) {
	if cfg.Handler == nil || cfg.Handoff == nil {
		return nil, errors.New("engine: a Handler and a Handoff are required")
	}
	tl, ok := ln.(*net.TCPListener)
	if !ok {
		return nil, fmt.Errorf("engine: %T is not a TCP listener", ln)
	}
	cfg = cfg.withDefaults()
	// A duplicate of the socket, ours to close (File would also make the
	// shared socket blocking).
	rc, err := tl.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("engine: %w", err)
	}
	nfd, derr := -1, error(nil)
	if err := rc.Control(func(fd uintptr) { nfd, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) }); err != nil || derr != nil {
		return nil, fmt.Errorf("engine: dup listener: %w", errors.Join(err, derr))
	}
	e := &Engine{cfg: cfg, lfd: nfd, ln: ln, done: make(chan struct{})}
	for range cfg.Loops {
		l, err := newLoop(e)
		if err != nil {
			e.closeLoops()
			_ = unix.Close(nfd)
			return nil, err
		}
		e.loops = append(e.loops, l)
	}
	return e, nil
}

// Addr is the listener's address.
func (e *Engine) Addr() net.Addr { return e.ln.Addr() }

// Serve runs the loops until Shutdown or Close; it returns nil after
// those, or the error that stopped a loop.
func (e *Engine) Serve() error {
	if !e.state.CompareAndSwap(engineNew, engineServing) {
		return nil // closed before it served
	}
	errc := make(chan error, len(e.loops))
	for _, l := range e.loops {
		e.served.Add(1)
		go func() {
			defer e.served.Done()
			runtime.LockOSThread() // the loop is this thread's: epoll_wait blocks it, not a P's worth of goroutines
			errc <- l.run()
		}()
	}
	e.served.Wait()
	_ = unix.Close(e.lfd)
	close(e.done)
	for range e.loops {
		if err := <-errc; err != nil {
			return err
		}
	}
	return nil
}

// Shutdown stops accepting, closes idle connections and waits for the
// exchanges in progress to end (each connection closes after its answer),
// until ctx ends: then it closes everything and returns ctx's error.
func (e *Engine) Shutdown(ctx context.Context) error {
	if e.inShutdown.Swap(true) {
		return e.wait(ctx)
	}
	_ = e.ln.Close()
	for _, l := range e.loops {
		l.post(l.stopAccepting)
	}
	return e.wait(ctx)
}

func (e *Engine) wait(ctx context.Context) error {
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	for e.conns.Load() > 0 {
		select {
		case <-ctx.Done():
			_ = e.Close()
			return ctx.Err()
		case <-t.C:
		}
		for _, l := range e.loops {
			l.post(l.closeIdle)
		}
	}
	return e.Close()
}

// Close closes the listener and every connection at once, and stops the
// loops.
func (e *Engine) Close() error {
	e.closeOnce.Do(func() {
		e.inShutdown.Store(true)
		_ = e.ln.Close()
		if e.state.CompareAndSwap(engineNew, engineClosed) {
			// Never served: no loop runs to close what it holds.
			e.closeLoops()
			_ = unix.Close(e.lfd)
			close(e.done)
			return
		}
		for _, l := range e.loops {
			l.post(l.stop)
		}
	})
	return nil
}

// SetKeepAlivesEnabled(false) makes every answer from now on close its
// connection (Connection: close), and closes the idle ones: the drain.
func (e *Engine) SetKeepAlivesEnabled(v bool) {
	e.noKeepAlive.Store(!v)
	if !v {
		for _, l := range e.loops {
			l.post(l.closeIdleClients)
		}
	}
}

func (l *loop) closeIdleClients() {
	for c := range l.clients {
		c.closeIfIdle()
	}
}

// Conns is the number of client connections the loops own (not those
// handed off).
func (e *Engine) Conns() int64 { return e.conns.Load() }

func (e *Engine) closeLoops() {
	for _, l := range e.loops {
		_ = unix.Close(l.ep)
		_ = unix.Close(l.wake)
	}
}

// fdOwner is what an epoll event is delivered to.
type fdOwner interface {
	event(ev uint32)
}

// loop is one event loop and what it owns: its epoll set, its client and
// upstream connections, its timers and its pool of idle upstream
// connections. Everything in it runs on its thread, but post.
type loop struct {
	e       *Engine
	ep      int
	wake    int     // eventfd: post's nudge
	byFD    []owned // by file descriptor
	gen     int32   // the last generation given to a descriptor's owner
	timers  timerHeap
	now     time.Time
	scratch []byte
	headBuf []byte // an answer's head, written at once
	pool    pool

	accepting    bool
	acceptPaused bool          // after an accept failed, for acceptDelay
	acceptDelay  time.Duration // the last pause; 0 after an accept
	stopped      bool
	clients      map[*clientConn]struct{}

	soon []func() // run once the current event is handled

	mu    sync.Mutex // guards posted
	posts []func()
}

func newLoop(e *Engine) (*loop, error) {
	l := &loop{e: e, scratch: make([]byte, 64<<10), headBuf: make([]byte, 0, 1024), clients: make(map[*clientConn]struct{}), accepting: true}
	l.pool.init(l)
	var err error
	if l.ep, err = unix.EpollCreate1(unix.EPOLL_CLOEXEC); err != nil {
		return nil, fmt.Errorf("engine: epoll: %w", err)
	}
	if l.wake, err = unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC); err != nil {
		_ = unix.Close(l.ep)
		return nil, fmt.Errorf("engine: eventfd: %w", err)
	}
	if err := l.watch(unix.EPOLL_CTL_ADD, l.wake, unix.EPOLLIN); err != nil {
		return nil, err
	}
	if err := l.watchListener(); err != nil {
		return nil, err
	}
	return l, nil
}

// watchListener has the loop hear of connections to accept; EPOLLEXCLUSIVE:
// a connection wakes one loop, not every loop.
func (l *loop) watchListener() error {
	return l.watch(unix.EPOLL_CTL_ADD, l.e.lfd, unix.EPOLLIN|unix.EPOLLEXCLUSIVE)
}

// unwatchListener stops it.
func (l *loop) unwatchListener() { _ = unix.EpollCtl(l.ep, unix.EPOLL_CTL_DEL, l.e.lfd, nil) }

// owned is a descriptor's owner, and the generation of the descriptor's
// use by it: every event is registered with its generation, so that an
// event reported for a descriptor that was closed, its number given to a
// new socket in the same batch of events, is not delivered to the new
// owner.
type owned struct {
	o   fdOwner
	gen int32
}

// watch registers fd's events with epoll (the listener and the eventfd:
// generation 0).
func (l *loop) watch(op, fd int, events uint32) error {
	var gen int32
	if fd < len(l.byFD) {
		gen = l.byFD[fd].gen
	}
	ev := unix.EpollEvent{Events: events, Fd: int32(fd), Pad: gen}
	if err := unix.EpollCtl(l.ep, op, fd, &ev); err != nil {
		return fmt.Errorf("engine: epoll_ctl: %w", err)
	}
	return nil
}

func (l *loop) track(fd int, o fdOwner) {
	for fd >= len(l.byFD) {
		l.byFD = append(l.byFD, owned{})
	}
	l.gen++
	if l.gen <= 0 {
		l.gen = 1
	}
	l.byFD[fd] = owned{o: o, gen: l.gen}
}

// owner is the owner of fd's event ev, nil if none or ev was of a
// descriptor the number had before.
func (l *loop) owner(ev *unix.EpollEvent) fdOwner {
	if fd := int(ev.Fd); fd < len(l.byFD) && l.byFD[fd].gen == ev.Pad {
		return l.byFD[fd].o
	}
	return nil
}

// forget removes fd from the loop and closes it.
func (l *loop) forget(fd int) {
	if fd < len(l.byFD) {
		l.byFD[fd] = owned{}
	}
	_ = unix.Close(fd) // also leaves the epoll set
}

// post runs f on the loop; safe from any goroutine.
func (l *loop) post(f func()) {
	l.mu.Lock()
	l.posts = append(l.posts, f)
	l.mu.Unlock()
	var one = [8]byte{1}
	_, _ = unix.Write(l.wake, one[:])
}

func (l *loop) run() (err error) {
	defer func() {
		l.closeAll()
		_ = unix.Close(l.ep)
		_ = unix.Close(l.wake)
	}()
	events := make([]unix.EpollEvent, 128)
	l.now = time.Now()
	for !l.stopped {
		wait := -1
		if t := l.timers.next(); t != nil {
			wait = int(t.when.Sub(l.now)/time.Millisecond) + 1
			if t.when.Before(l.now) {
				wait = 0
			}
		}
		n, err := unix.EpollWait(l.ep, events, wait)
		l.now = time.Now()
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return fmt.Errorf("engine: epoll_wait: %w", err)
		}
		for _, ev := range events[:n] {
			fd := int(ev.Fd)
			switch {
			case fd == l.wake:
				l.runPosted()
			case fd == l.e.lfd:
				l.accept()
			default:
				if o := l.owner(&ev); o != nil {
					l.deliver(o, ev.Events)
				}
			}
			l.runSoon()
		}
		l.runTimers()
	}
	return nil
}

// deliver hands an event to its owner; a panic there ends the owner's
// connections, never the loop.
func (l *loop) deliver(o fdOwner, ev uint32) {
	defer l.recoverFor(o)
	o.event(ev)
}

func (l *loop) recoverFor(o any) {
	if v := recover(); v != nil {
		panics.Report("engine", v)
		switch c := o.(type) {
		case *clientConn:
			c.abort()
		case *upConn:
			c.failed("read response", true, errPanicked)
		case *Timer:
			if c.x != nil {
				c.x.c.abort()
			}
		}
	}
}

var errPanicked = errors.New("engine: a panic ended the exchange (see sidecar_panics_total)")

func (l *loop) runPosted() {
	var b [8]byte
	_, _ = unix.Read(l.wake, b[:])
	l.mu.Lock()
	posts := l.posts
	l.posts = nil
	l.mu.Unlock()
	for _, f := range posts {
		f()
	}
}

func (l *loop) runTimers() {
	for {
		t := l.timers.next()
		if t == nil || t.when.After(l.now) {
			return
		}
		heap.Pop(&l.timers)
		t.index = -1
		l.fire(t)
		l.runSoon()
	}
}

func (l *loop) fire(t *Timer) {
	defer l.recoverFor(t)
	t.f()
}

func (l *loop) accept() {
	for l.accepting && !l.acceptPaused {
		fd, sa, err := unix.Accept4(l.e.lfd, unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC)
		if err != nil {
			switch {
			case errors.Is(err, unix.EAGAIN), errors.Is(err, unix.EINTR), errors.Is(err, unix.ECONNABORTED):
				// Another loop took it, or all are taken; or the client
				// left before it was taken.
			default:
				l.backOffAccept(err)
			}
			return
		}
		l.acceptDelay = 0
		_ = unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
		l.newClient(fd, sa)
	}
}

// backOffAccept stops accepting for a while after err (EMFILE, ENFILE,
// ENOBUFS: out of descriptors or memory), as net/http's server sleeps:
// 5 ms, doubling to at most 1 s while it lasts. The listener stays
// readable meanwhile; watched, it would wake the loop again and again.
func (l *loop) backOffAccept(err error) {
	l.acceptDelay = min(max(2*l.acceptDelay, 5*time.Millisecond), time.Second)
	l.e.cfg.Logger.Warn("accept failed; retrying", "error", err, "in", l.acceptDelay)
	l.acceptPaused = true
	l.unwatchListener()
	l.after(l.acceptDelay, nil, func() {
		l.acceptPaused = false
		if l.accepting {
			_ = l.watchListener()
			l.accept()
		}
	})
}

// stopAccepting leaves the listener to nobody and closes the idle
// connections; the others close after their answer.
func (l *loop) stopAccepting() {
	if l.accepting {
		l.accepting = false
		if !l.acceptPaused {
			l.unwatchListener()
		}
	}
	l.closeIdle()
}

func (l *loop) closeIdle() {
	for c := range l.clients {
		c.closeIfIdle()
	}
	l.pool.closeAll()
}

func (l *loop) stop() {
	l.stopAccepting()
	l.stopped = true
}

// closeAll closes every connection the loop owns.
func (l *loop) closeAll() {
	for c := range l.clients {
		c.abort()
	}
	l.pool.closeAll()
	for fd, o := range l.byFD {
		if o.o != nil {
			l.forget(fd)
		}
	}
}

// Timer is a function the loop runs at a time, unless stopped first.
type Timer struct {
	when  time.Time
	f     func()
	index int       // in the heap; -1: not in it
	x     *Exchange // whose exchange ends if f panics; nil: none
	l     *loop
}

// Stop keeps the timer from running; false if it ran or was stopped.
func (t *Timer) Stop() bool {
	if t == nil || t.index < 0 {
		return false
	}
	heap.Remove(&t.l.timers, t.index)
	t.index = -1
	return true
}

// after runs f on the loop after d.
func (l *loop) after(d time.Duration, x *Exchange, f func()) *Timer {
	t := &Timer{when: l.now.Add(d), f: f, x: x, l: l, index: -1}
	heap.Push(&l.timers, t)
	return t
}

// reset moves t (running or not) to d from now.
func (l *loop) reset(t *Timer, d time.Duration) {
	t.when = l.now.Add(d)
	if t.index >= 0 {
		heap.Fix(&l.timers, t.index)
		return
	}
	heap.Push(&l.timers, t)
}

type timerHeap []*Timer

func (h timerHeap) Len() int           { return len(h) }
func (h timerHeap) Less(i, j int) bool { return h[i].when.Before(h[j].when) }
func (h timerHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].index, h[j].index = i, j
}
func (h *timerHeap) Push(x any) {
	t := x.(*Timer)
	t.index = len(*h)
	*h = append(*h, t)
}
func (h *timerHeap) Pop() any {
	old := *h
	t := old[len(old)-1]
	old[len(old)-1] = nil
	*h = old[:len(old)-1]
	return t
}

func (h timerHeap) next() *Timer {
	if len(h) == 0 {
		return nil
	}
	return h[0]
}

// fileConn makes fd, a connected socket, a net.Conn of Go's netpoller; fd
// itself is closed (the net.Conn has a duplicate).
func fileConn(fd int) (net.Conn, error) {
	f := os.NewFile(uintptr(fd), "")
	defer f.Close()
	return net.FileConn(f)
}
