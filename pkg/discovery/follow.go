package discovery

import (
	"context"
	"log/slog"
	"math/rand/v2"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/sidecar-mesh/sidecar/pkg/panics"
)

// follower runs one Consul blocking query in a loop, by Consul's rules: the
// answer's index is the next query's WaitIndex (0 when it went backwards,
// which a snapshot restore or a restarted agent does, and 0 after an error,
// since the agent may come back restarted with its index far below ours);
// each wait has up to 1/16 of jitter so that a fleet does not return in
// step; errors back off, capped; only the first failure and the recovery
// are logged.
//
// After an answer with a new index (a change since the previous answer)
// the next query waits until settle has passed since that answer: a burst
// of changes costs one answer per settle window and the latest state wins
// (the next query returns at once with whatever changed meanwhile, so
// nothing is lost), while the first change after a quiet spell, or after
// the first answer, is seen at once, its query being already under way.
type follower struct {
	log    *slog.Logger
	attrs  []any  // log attributes that name what is followed
	failed string // logged at the first failure of a run of them
	again  string // logged when an answer comes after failures
	wait   time.Duration
	settle time.Duration
	// pace, when set, may lengthen the settle window after an answer: for
	// an answer whose cost grows with its size.
	pace func() time.Duration
	// lastErr, when set, holds the error of the last query until an answer
	// comes, for callers to say why there is none.
	lastErr *atomic.Pointer[string]
}

// run queries until ctx ends. ask sends one query with q and keeps what it
// got; answered is called after each successful ask, with changed false
// when the wait ended with the index of the previous answer (nothing new)
// and no error came between.
func (f follower) run(ctx context.Context, ask func(q *api.QueryOptions) (*api.QueryMeta, error), answered func(changed bool)) {
	var index uint64
	failures := 0
	for ctx.Err() == nil {
		q := (&api.QueryOptions{WaitIndex: index, WaitTime: f.wait + rand.N(f.wait/16+1)}).WithContext(ctx)
		meta, err := ask(q)
		if f.lastErr != nil {
			f.keepErr(err)
		}
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			failures++
			index = 0
			if failures == 1 {
				f.log.Warn(f.failed, append(f.attrs, "err", err.Error())...)
			}
			if !sleepCtx(ctx, backoff(failures)) {
				return
			}
			continue
		}
		recovered := failures > 0
		if recovered {
			f.log.Info(f.again, append(f.attrs, "after_failures", failures)...)
			failures = 0
		}
		var last uint64
		if meta != nil {
			last = meta.LastIndex
		}
		next := nextIndex(index, last)
		changed := next != index || recovered
		burst := changed && index != 0 // a change since an earlier answer, not the first answer
		index = next
		answered(changed)
		if !burst {
			continue
		}
		settle := f.settle
		if f.pace != nil {
			settle = max(settle, f.pace())
		}
		if !sleepCtx(ctx, settle) {
			return
		}
	}
}

func (f follower) keepErr(err error) {
	if err == nil {
		f.lastErr.Store(nil)
		return
	}
	msg := err.Error()
	f.lastErr.Store(&msg)
}

// nextIndex is the WaitIndex of the next blocking query after an answer
// with index last to a query that waited on prev, by Consul's rules: start
// over (0) when the index went backwards (a snapshot restore, a restarted
// agent), and never wait on 0, which would return at once forever.
func nextIndex(prev, last uint64) uint64 {
	switch {
	case last < prev:
		return 0
	case last == 0:
		return 1
	}
	return last
}

// supervise runs loop until ctx ends. A panic in loop is a bug: it is
// reported (package panics: logged with its stack, counted under where)
// and loop starts over after a backoff, so that one bad answer from Consul
// never stops the process nor, for good, the loop. loop must start from a
// state it can trust (a blocking query from index 0).
func supervise(ctx context.Context, where string, loop func(context.Context)) {
	panicked := 0
	for ctx.Err() == nil {
		start := time.Now()
		if !recovered(ctx, where, loop) {
			return // loop returned: ctx ended
		}
		if time.Since(start) > time.Minute {
			panicked = 0 // an old panic; start the backoff over
		}
		panicked++
		if !sleepCtx(ctx, backoff(panicked)) {
			return
		}
	}
}

// recovered runs loop and reports whether it panicked.
func recovered(ctx context.Context, where string, loop func(context.Context)) (panicked bool) {
	defer func() {
		if v := recover(); v != nil {
			panics.Report(where, v)
			panicked = true
		}
	}()
	loop(ctx)
	return false
}

// backoff is exponential from 250ms, capped at 5s (the agent is local and
// its queries are cheap; a short cap means routing catches up soon after
// Consul returns), with jitter over the upper half.
func backoff(failures int) time.Duration {
	d := 250 * time.Millisecond << min(failures-1, 5)
	d = min(d, 5*time.Second)
	return d/2 + rand.N(d/2+1)
}

func sleepCtx(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
