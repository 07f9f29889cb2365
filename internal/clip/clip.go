// Package clip bounds text that came off the wire before the sidecar keeps
// or shows it: a header line an upstream quoted in an error, a path, a
// reason phrase. What an app, a peer or an upstream wrote may be of any
// length and any bytes; what the sidecar records, logs, exports or answers
// with is valid UTF-8 of a bounded length.
package clip

import (
	"strings"
	"unicode/utf8"
)

// String is s as valid UTF-8 (each run of invalid bytes one U+FFFD) of at
// most n bytes, cut on a character's boundary.
func String(s string, n int) string {
	if len(s) > n {
		s = s[:n] // a character cut in two becomes U+FFFD below
	}
	if !utf8.ValidString(s) {
		s = strings.ToValidUTF8(s, "\uFFFD")
		if len(s) > n {
			i := n
			for i > 0 && !utf8.RuneStart(s[i]) {
				i--
			}
			s = s[:i]
		}
	}
	return s
}
