package policy

import (
	"testing"
	"time"
)

func TestBackoff(t *testing.T) {
	ms := func(n int) *Duration { d := Duration(time.Duration(n) * time.Millisecond); return &d }
	b := &Backoff{Base: ms(25), Max: ms(250)}
	for n, want := range map[int]time.Duration{
		1: 25 * time.Millisecond, 2: 50 * time.Millisecond, 4: 200 * time.Millisecond,
		5: 250 * time.Millisecond, 17: 250 * time.Millisecond, 1000: 250 * time.Millisecond,
	} {
		if got := b.Longest(n); got != want {
			t.Errorf("Longest(%d) with base 25ms, max 250ms = %s, want %s", n, got, want)
		}
	}
	// A large n doubles at most 16 times: no overflow, and the cap holds.
	if got := (&Backoff{Base: ms(10_000), Max: ms(60_000)}).Longest(1000); got != time.Minute {
		t.Errorf("Longest(1000) with base 10s, max 1m = %s, want 1m", got)
	}
	if got := b.RetryAfterMax(); got != time.Second {
		t.Errorf("RetryAfterMax with max 250ms = %s, want 1s (at least a second)", got)
	}
	if got := (&Backoff{Base: ms(25), Max: ms(5000)}).RetryAfterMax(); got != 5*time.Second {
		t.Errorf("RetryAfterMax with max 5s = %s, want 5s", got)
	}
	for range 100 {
		if d := b.Delay(2, 0, nil); d < 0 || d > 50*time.Millisecond {
			t.Fatalf("Delay(2, 0) with base 25ms = %s, want within [0, 50ms]", d)
		}
		if d := b.Delay(2, 500*time.Millisecond, nil); d != 500*time.Millisecond {
			t.Fatalf("Delay(2, Retry-After 500ms) = %s, want 500ms", d)
		}
		if d := b.Delay(2, time.Hour, nil); d != time.Second {
			t.Fatalf("Delay(2, Retry-After 1h) with max 250ms = %s, want 1s (RetryAfterMax)", d)
		}
	}
}
