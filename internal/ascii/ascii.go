// Package ascii compares header names and values as HTTP does: ASCII
// case-insensitively, never by Unicode's folding (which would take
// "tranſfer-encoding", with a long s, for "transfer-encoding").
package ascii

// EqualFold reports whether b equals s, a lower-case string, ignoring the
// case of ASCII letters in b.
func EqualFold(b []byte, s string) bool {
	if len(b) != len(s) {
		return false
	}
	for i := range b {
		c := b[i]
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		if c != s[i] {
			return false
		}
	}
	return true
}
