package readahead

import (
	"io"
	"strings"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// reader is a stream with head read ahead of rest.
type reader struct {
	head []byte
	rest io.Reader
}

func (r *reader) Read(p []byte) (int, error) { return Read(&r.head, r.rest, p) }

func TestRead(t *testing.T) {
	for _, tc := range []struct{ head, rest string }{
		{"", ""},
		{"", "rest"},
		{"GET ", ""},
		{"GET ", "/ HTTP/1.1\r\n"},
	} {
		r := &reader{head: []byte(tc.head), rest: strings.NewReader(tc.rest)}
		got, err := io.ReadAll(r)
		if err != nil || string(got) != tc.head+tc.rest {
			t.Errorf("reading head %q then rest %q: got %q, %v; want %q", tc.head, tc.rest, got, err, tc.head+tc.rest)
		}
		// One byte at a time: the head is given back across reads.
		r = &reader{head: []byte(tc.head), rest: strings.NewReader(tc.rest)}
		var b [1]byte
		var one []byte
		for {
			n, err := r.Read(b[:])
			one = append(one, b[:n]...)
			if err != nil {
				break
			}
		}
		if string(one) != tc.head+tc.rest {
			t.Errorf("reading head %q then rest %q a byte at a time: got %q", tc.head, tc.rest, one)
		}
	}
}
