package ascii

import (
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestEqualFold(t *testing.T) {
	for _, tc := range []struct {
		b    string
		want bool
	}{
		{"Transfer-Encoding", true}, {"TRANSFER-ENCODING", true}, {"transfer-encoding", true},
		{"tranſfer-encoding", false}, {"transfer_encoding", false}, {"transfer-encodin", false},
	} {
		if got := EqualFold([]byte(tc.b), "transfer-encoding"); got != tc.want {
			t.Errorf("EqualFold(%q) = %v, want %v", tc.b, got, tc.want)
		}
	}
}
