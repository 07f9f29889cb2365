package clip

import (
	"strings"
	"testing"
	"unicode/utf8"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestString(t *testing.T) {
	const n = 256
	for _, tc := range []struct{ in, want string }{
		{"/ok", "/ok"},
		{"/\xff", "/\uFFFD"},
		{"Serv\xffce Unavailable", "Serv\uFFFDce Unavailable"},
		{strings.Repeat("a", 300), strings.Repeat("a", n)},
		{strings.Repeat("a", n-1) + "é", strings.Repeat("a", n-1)},
		{strings.Repeat("\xff", 300), "\uFFFD"},
		{strings.Repeat("é", 200), strings.Repeat("é", n/2)},
	} {
		got := String(tc.in, n)
		if got != tc.want || !utf8.ValidString(got) || len(got) > n {
			t.Errorf("String(%.20q...) = %.20q... (%d bytes), want %.20q... (%d)", tc.in, got, len(got), tc.want, len(tc.want))
		}
	}
}
