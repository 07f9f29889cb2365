package outbound

import (
	"context"
	"errors"
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

	mu       sync.Mutex    // guards deadline and idle
	deadline time.Time     // zero once lifted
	idle     time.Duration // once lifted for a stream, the silence it may keep; 0: none
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
	idle := c.idle
	c.mu.Unlock()
	if idle == 0 {
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
