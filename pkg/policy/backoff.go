package policy

import (
	"math/rand/v2"
	"time"
)

// Longest is the longest backoff before retry n (1 for the first retry,
// after the first try): Base doubled n-1 times, capped at Max. Full
// jitter waits anything from 0 to it. Base and Max must be set, as they
// are in an effective policy.
func (b *Backoff) Longest(n int) time.Duration {
	d := b.Base.D() << min(n-1, 16)
	if d <= 0 || d > b.Max.D() {
		d = b.Max.D()
	}
	return d
}

// RetryAfterMax is the longest an answer's Retry-After stretches one
// backoff to: Max, or 1s when Max is shorter.
func (b *Backoff) RetryAfterMax() time.Duration { return max(b.Max.D(), time.Second) }

// Delay is the backoff before retry n: anything from 0 to Longest(n)
// (full jitter, drawn from r, or the global source when r is nil), raised
// to retryAfter (an answer's Retry-After, 0 for none) up to RetryAfterMax.
// Safe for concurrent use if r is.
func (b *Backoff) Delay(n int, retryAfter time.Duration, r *rand.Rand) time.Duration {
	var d time.Duration
	if r == nil {
		d = rand.N(b.Longest(n) + 1)
	} else {
		d = time.Duration(r.Int64N(int64(b.Longest(n) + 1)))
	}
	if retryAfter > 0 {
		d = max(d, min(retryAfter, b.RetryAfterMax()))
	}
	return d
}
