package discovery

import "testing"

func TestNextIndex(t *testing.T) {
	for _, tc := range []struct{ prev, last, want uint64 }{
		{0, 7, 7},    // first answer
		{7, 9, 9},    // something changed
		{9, 9, 9},    // the wait ended with nothing new
		{9, 3, 0},    // backwards: start over
		{0, 0, 1},    // never wait on 0
		{5, 0, 0},    // backwards to 0
		{1, 0, 0},    // ... even from 1
		{0, 1, 1},    // a fresh agent
		{1, 1, 1},    // ... unchanged
		{42, 43, 43}, // forwards
	} {
		if got := nextIndex(tc.prev, tc.last); got != tc.want {
			t.Errorf("nextIndex(%d, %d) = %d, want %d", tc.prev, tc.last, got, tc.want)
		}
	}
}
