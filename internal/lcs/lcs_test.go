package lcs

import (
	"strings"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// render writes a script as one letter an op: the element kept (lower
// case), deleted ("-x") or inserted ("+x").
func render(a, b string, ops []Op) string {
	var s strings.Builder
	for _, op := range ops {
		switch op.Kind {
		case Keep:
			s.WriteByte(a[op.A])
		case Delete:
			s.WriteString("-" + a[op.A:op.A+1])
		case Insert:
			s.WriteString("+" + b[op.B:op.B+1])
		}
	}
	return s.String()
}

func TestScript(t *testing.T) {
	for _, tc := range []struct{ a, b, want string }{
		{"", "", ""},
		{"abc", "abc", "abc"},
		{"", "ab", "+a+b"},
		{"ab", "", "-a-b"},
		{"abc", "axc", "a-b+xc"},    // a change: the old line first
		{"abcd", "acbd", "a-bc+bd"}, // a move is a delete and an insert
		{"xabc", "abcy", "-xabc+y"}, // one at each end
		{"aaa", "aa", "aa-a"},       // equal elements pair from the front
		{"abab", "baba", "-abab+a"}, // one of the shortest
	} {
		ops := Script(len(tc.a), len(tc.b), func(i, j int) bool { return tc.a[i] == tc.b[j] })
		if got := render(tc.a, tc.b, ops); got != tc.want {
			t.Errorf("Script(%q, %q) = %s, want %s", tc.a, tc.b, got, tc.want)
		}
		for k, op := range ops {
			if k > 0 {
				prev := ops[k-1]
				if op.A != prev.A+boolInt(prev.Kind != Insert) || op.B != prev.B+boolInt(prev.Kind != Delete) {
					t.Errorf("Script(%q, %q): op %d at (%d, %d) does not follow op %d at (%d, %d)", tc.a, tc.b, k, op.A, op.B, k-1, prev.A, prev.B)
				}
			}
		}
	}
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}
