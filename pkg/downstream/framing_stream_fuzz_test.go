package downstream

import (
	"bytes"
	"slices"
	"testing"
)

// FuzzFramingStream holds the framing check's bookkeeping to the bytes: it
// hands net/http the client's bytes unchanged up to the first fault, then
// either a placeholder (a rejected header block) or nothing more (a fault
// in a body), and it judges the same whatever sizes net/http reads in.
func FuzzFramingStream(f *testing.F) {
	f.Add([]byte("POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"+
		"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nT: v\r\n\r\n"), uint8(3))
	f.Add([]byte("GET / HTTP/1.1\r\nHost: x\r\nX-A: b\r\n c\r\n\r\n"), uint8(1))
	f.Add([]byte("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\nxy\r\n0\r\n\r\n"), uint8(2))
	f.Add([]byte("POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx\r\n\r\nGET /b HTTP/1.1\r\n\r\n"), uint8(5))
	f.Add([]byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04"), uint8(4))
	f.Fuzz(func(t *testing.T, input []byte, size uint8) {
		small := max(int(size)%16, 1)
		got1, v1, err1 := framedConn(t, string(input), small)
		got2, v2, err2 := framedConn(t, string(input), 4096)
		if got1 != got2 || err1 != err2 || !slices.Equal(v1, v2) {
			t.Fatalf("reads of %d and 4096 bytes differ:\n%q %v %v\n%q %v %v", small, got1, v1, err1, got2, v2, err2)
		}
		out := []byte(got1)
		rejected := len(v1) > 0 && v1[len(v1)-1].Reason != ""
		for _, v := range v1[:max(len(v1)-1, 0)] {
			if v.Reason != "" {
				t.Fatalf("verdicts %v: a rejection before the last one", v1)
			}
		}
		if rejected {
			if !bytes.HasSuffix(out, placeholder) {
				t.Fatalf("rejected, but net/http read %q, not ending in the placeholder", out)
			}
			out = out[:len(out)-len(placeholder)]
		}
		if !bytes.HasPrefix(input, out) {
			t.Fatalf("net/http read %q, which is not the start of the client's bytes %q", out, input)
		}
		if rem := input[len(out):]; !rejected && err1 != ErrBadFraming && !unfinished(rem) {
			t.Fatalf("no fault found, yet net/http did not get %q, which is more than an unfinished header block or line", rem)
		}
	})
}

// unfinished reports whether rem, the end of a stream the check did not
// pass on, is something net/http could not have served either: an
// unfinished header block or chunk line, the start of the HTTP/2 preface,
// or the CR/LF bytes net/http skips after a POST.
func unfinished(rem []byte) bool {
	if len(rem) == 0 || bytes.HasPrefix(h2Preface, rem) {
		return true
	}
	if len(rem) < 4 && len(bytes.Trim(rem, "\r\n")) == 0 {
		return true
	}
	return !bytes.HasPrefix(rem, []byte("\n")) && !bytes.HasPrefix(rem, []byte("\r\n")) &&
		!bytes.Contains(rem, []byte("\n\n")) && !bytes.Contains(rem, []byte("\n\r\n"))
}
