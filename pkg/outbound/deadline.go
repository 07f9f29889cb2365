package outbound

import (
	"context"
	"errors"
	"io"
	"sync"
	"sync/atomic"
	"time"
)

// deadlineError is the cause a deadline of the chain cancels with. It is a
// context.DeadlineExceeded (errors.Is), and says which deadline it was.
type deadlineError string

func (e deadlineError) Error() string        { return string(e) }
func (e deadlineError) Is(target error) bool { return target == context.DeadlineExceeded }

// The deadlines of the chain, as causes.
var (
	// errTimeout: the policy's timeout, over the wait for response headers
	// and, for an answer that is not a stream, its body.
	errTimeout error = deadlineError("timeout")
	// errPerTryTimeout: an attempt's retry.perTryTimeout.
	errPerTryTimeout error = deadlineError("per-try timeout")
	// errStreamIdle: a stream sent nothing for streamIdleTimeout.
	errStreamIdle error = deadlineError("stream idle")
	// errCallerDeadline: the caller's own deadline (grpc-timeout) passed.
	errCallerDeadline error = deadlineError("the caller's deadline (grpc-timeout)")
)

// deadlineCtx is the context of a request, or of one attempt, under a
// deadline of the policy's that is lifted when the answer turns out to be
// a stream. The deadline bounds the wait for the response headers and,
// unless lifted, the rest of the exchange: the transport ties the answer's
// body to the request's context. A lifted request deadline watches the
// stream's silence instead: from then on the timer ends the context only
// once nothing was read for the idle time. The parent's deadline and
// cancellation (the caller's own) are never lifted.
//
// It is a context.WithCancelCause of the parent, whose Done, Value and
// cause it shows, so that the context package wires children (the
// transport's, an attempt's) to it without a goroutine; Deadline and Err
// are its own: Err says context.DeadlineExceeded when one of the chain's
// deadlines ended it, as a context.WithTimeout would. Safe for concurrent
// use.
type deadlineCtx struct {
	context.Context
	cancel context.CancelCauseFunc
	cause  error       // what the deadline cancels with
	timer  *time.Timer // nil when the deadline had passed at the start
	start  time.Time
	// lastRead is when the stream last moved, as time since start.
	lastRead atomic.Int64

	mu       sync.Mutex    // guards deadline, idle, pending and d
	deadline time.Time     // zero once lifted, and while pending
	idle     time.Duration // once lifted for a stream, or while pending, the silence it may keep; 0: none
	// pending: the deadline waits for the request's body to end (begin);
	// meanwhile only silence (idle) ends the context.
	pending bool
	d       time.Duration // the deadline's duration, for begin
}

// newDeadlineCtx returns a context of parent that ends with cause after d.
func newDeadlineCtx(parent context.Context, d time.Duration, cause error) *deadlineCtx {
	c := &deadlineCtx{cause: cause, start: time.Now()}
	c.Context, c.cancel = context.WithCancelCause(parent)
	c.deadline = c.start.Add(d)
	if d <= 0 {
		c.cancel(cause)
		return c
	}
	c.timer = time.AfterFunc(d, c.expire)
	return c
}

// newDeadlineCtxOnEnd is newDeadlineCtx for a request whose body still
// streams: d counts from the body's end (body), as Envoy counts its route
// timeout from the end of the request, so that a slow upload or a client
// stream is not cut while it is still sending. Until then the exchange may
// only be silent (no body read, no answer) for idle. A body that ended
// already starts d now.
func newDeadlineCtxOnEnd(parent context.Context, d, idle time.Duration, cause error, body *bodyEnd) *deadlineCtx {
	if body == nil || body.ended() || idle <= 0 {
		return newDeadlineCtx(parent, d, cause)
	}
	c := &deadlineCtx{cause: cause, start: time.Now(), pending: true, idle: idle, d: d}
	c.Context, c.cancel = context.WithCancelCause(parent)
	c.timer = time.AfterFunc(idle, c.expire)
	body.watch(c)
	return c
}

// begin starts a pending deadline: the request's body ended.
func (c *deadlineCtx) begin() {
	c.mu.Lock()
	if !c.pending {
		c.mu.Unlock()
		return
	}
	c.pending, c.idle = false, 0
	c.deadline = time.Now().Add(c.d)
	// Under the lock: a lift that follows must find the timer set, to stop.
	c.timer.Reset(c.d)
	c.mu.Unlock()
}

// Deadline is the policy's deadline, or the parent's when sooner or when
// the policy's was lifted.
func (c *deadlineCtx) Deadline() (time.Time, bool) {
	c.mu.Lock()
	dl := c.deadline
	c.mu.Unlock()
	pd, ok := c.Context.Deadline()
	if dl.IsZero() || (ok && pd.Before(dl)) {
		return pd, ok
	}
	return dl, true
}

// Err is context.DeadlineExceeded when a deadline ended the context,
// context.Canceled when the caller went away or the exchange ended.
func (c *deadlineCtx) Err() error {
	err := c.Context.Err()
	if err != nil && errors.Is(context.Cause(c.Context), context.DeadlineExceeded) {
		return context.DeadlineExceeded
	}
	return err
}

// callerDeadline is the parent's deadline: the caller's own, which a lift
// keeps.
func (c *deadlineCtx) callerDeadline() (time.Time, bool) { return c.Context.Deadline() }

// expire is the timer's: the deadline passed, or a stream may have been
// silent for its idle time.
func (c *deadlineCtx) expire() {
	c.mu.Lock()
	idle, dl := c.idle, c.deadline
	c.mu.Unlock()
	if idle == 0 {
		if dl.IsZero() {
			return // lifted, with no silence to watch: a late firing
		}
		if left := time.Until(dl); left > 0 {
			c.timer.Reset(left) // begun while the idle timer fired
			return
		}
		c.cancel(c.cause)
		return
	}
	if c.Context.Err() != nil {
		return // ended meanwhile: the timer is not wanted again
	}
	if silent := time.Since(c.start) - time.Duration(c.lastRead.Load()); silent < idle {
		c.timer.Reset(idle - silent)
		return
	}
	c.cancel(errStreamIdle)
}

// lift removes the deadline, for an answer that is a stream; with idle > 0
// the timer then ends the context after idle without a touch. It reports
// false when the deadline had passed already (the context is ending).
func (c *deadlineCtx) lift(idle time.Duration) bool {
	c.mu.Lock()
	if c.pending {
		// Not begun: it never will, the answer being a stream.
		c.pending, c.idle, c.deadline = false, idle, time.Time{}
		c.mu.Unlock()
		if idle > 0 {
			c.touch()
			c.timer.Reset(idle)
		} else {
			c.timer.Stop()
		}
		return c.Context.Err() == nil
	}
	c.mu.Unlock()
	if c.timer == nil || !c.timer.Stop() {
		return false
	}
	c.mu.Lock()
	c.deadline, c.idle = time.Time{}, idle
	c.mu.Unlock()
	if idle > 0 {
		c.touch()
		c.timer.Reset(idle)
	}
	return true
}

// idleTime is the silence a lifted stream may keep; 0: none.
func (c *deadlineCtx) idleTime() time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.idle
}

// touch records that the stream moved now.
func (c *deadlineCtx) touch() { c.lastRead.Store(int64(time.Since(c.start))) }

// end stops the timer and cancels the context: the exchange is over.
func (c *deadlineCtx) end() {
	if c.timer != nil {
		c.timer.Stop()
	}
	c.cancel(nil)
}

// bodyEnd tells the deadlines that wait for a request body's end (and are
// touched while it moves) when it ends. Safe for concurrent use.
type bodyEnd struct {
	mu       sync.Mutex // guards done and watchers
	done     bool
	watchers []*deadlineCtx
}

func (b *bodyEnd) ended() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.done
}

// watch has c begun at the body's end, and touched as it moves.
func (b *bodyEnd) watch(c *deadlineCtx) {
	b.mu.Lock()
	done := b.done
	if !done {
		b.watchers = append(b.watchers, c)
	}
	b.mu.Unlock()
	if done {
		c.begin()
	}
}

// read is a read of the body: n bytes, ending it with io.EOF.
func (b *bodyEnd) read(n int, err error) {
	if n == 0 && err == nil {
		return
	}
	b.mu.Lock()
	ws := b.watchers
	if err == io.EOF {
		b.done, b.watchers = true, nil
	}
	b.mu.Unlock()
	for _, c := range ws {
		if err == io.EOF {
			c.begin()
		} else {
			c.touch()
		}
	}
}

// endWatched is a request body whose reads bodyEnd hears of.
type endWatched struct {
	io.ReadCloser
	end *bodyEnd
}

func (b *endWatched) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	b.end.read(n, err)
	return n, err
}
