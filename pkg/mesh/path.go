package mesh

import (
	"errors"
	"strings"
)

// errBadEscape is a percent sign not followed by two hex digits.
var errBadEscape = errors.New("a '%' in the path is not followed by two hex digits")

// CanonicalPath is the path the intentions judge and the app is sent: an
// escaped request path normalized as Envoy's normalize_path does it (RFC
// 3986 section 6), which Consul turns on for every service's inbound
// listener since the L7 intentions bypass of CVE-2024-10005: escapes of
// unreserved characters decoded ("/%61dmin" is "/admin"), the remaining
// escapes in upper case, backslashes as slashes, then dot segments
// removed ("/public/../admin" is "/admin"). Escaped slashes (%2F, %5C)
// stay escaped and adjacent slashes are not merged, Consul's defaults. A
// path that does not start with "/" ("*") is returned as it is. It fails
// on a malformed escape.
func CanonicalPath(p string) (string, error) {
	if !strings.HasPrefix(p, "/") || !strings.ContainsAny(p, "%\\") && !strings.Contains(p, "/.") {
		return p, nil // nothing to decode, no dot segment: most paths, gRPC's among them
	}
	b := make([]byte, 0, len(p))
	for i := 0; i < len(p); i++ {
		switch c := p[i]; c {
		case '%':
			if i+2 >= len(p) || !isHex(p[i+1]) || !isHex(p[i+2]) {
				return "", errBadEscape
			}
			if v := unhex(p[i+1])<<4 | unhex(p[i+2]); unreserved(v) {
				b = append(b, v)
			} else {
				b = append(b, '%', upperHex(p[i+1]), upperHex(p[i+2]))
			}
			i += 2
		case '\\':
			b = append(b, '/')
		default:
			b = append(b, c)
		}
	}
	return removeDotSegments(string(b)), nil
}

// removeDotSegments is RFC 3986's remove_dot_segments (5.2.4) for a path
// that starts with "/": "." segments dropped, ".." ones taking the segment
// before with them, never above the root; a path ending in one keeps its
// trailing slash.
func removeDotSegments(p string) string {
	if !strings.Contains(p, "/.") {
		return p
	}
	segs := strings.Split(p[1:], "/")
	out := make([]string, 0, len(segs))
	for i, s := range segs {
		last := i == len(segs)-1
		switch s {
		case ".":
		case "..":
			if len(out) > 0 {
				out = out[:len(out)-1]
			}
		default:
			out = append(out, s)
			continue
		}
		if last {
			out = append(out, "")
		}
	}
	return "/" + strings.Join(out, "/")
}

// unreserved is RFC 3986's unreserved: ALPHA / DIGIT / "-" / "." / "_" / "~".
func unreserved(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' ||
		c == '-' || c == '.' || c == '_' || c == '~'
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

func unhex(c byte) byte {
	switch {
	case c <= '9':
		return c - '0'
	case c >= 'a':
		return c - 'a' + 10
	default:
		return c - 'A' + 10
	}
}

func upperHex(c byte) byte {
	if 'a' <= c && c <= 'f' {
		return c - 'a' + 'A'
	}
	return c
}
