package mesh

import (
	"errors"
	"strings"
)

// errBadEscape is a percent sign not followed by two hex digits.
var errBadEscape = errors.New("a '%' in the path is not followed by two hex digits")

// errNUL is an escaped NUL byte, which Envoy's canonicalizer refuses.
var errNUL = errors.New("the path has an escaped NUL byte (%00)")

// CanonicalPath is the path the intentions judge and the app is sent: an
// escaped request path normalized as Envoy's normalize_path does it (RFC
// 3986 section 6), which Consul turns on for every service's inbound
// listener since the L7 intentions bypass of CVE-2024-10005: escapes of
// unreserved characters decoded ("/%61dmin" is "/admin"), the remaining
// escapes kept as written, backslashes as slashes, bytes that may not
// stand in a path unescaped escaped ("{" is "%7B"), then dot segments
// removed ("/public/../admin" is "/admin"), a dot segment with path
// parameters among them ("/public/..;x/admin" is "/admin", as Tomcat
// reads it). Escaped slashes (%2F, %5C) stay escaped and adjacent slashes
// are not merged, Consul's defaults. A path that does not start with "/"
// ("*") is returned as it is. It fails on a malformed escape and on an
// escaped NUL.
//
// The escaping makes the result a path Go's URL keeps as written
// (URL.EscapedPath): the path the app is sent is the path judged, byte for
// byte.
func CanonicalPath(p string) (string, error) {
	if !strings.HasPrefix(p, "/") || plain(p) {
		return p, nil // nothing to decode or escape, no dot segment: most paths, gRPC's among them
	}
	const hex = "0123456789ABCDEF"
	b := make([]byte, 0, len(p))
	for i := 0; i < len(p); i++ {
		switch c := p[i]; {
		case c == '%':
			if i+2 >= len(p) || !isHex(p[i+1]) || !isHex(p[i+2]) {
				return "", errBadEscape
			}
			v := unhex(p[i+1])<<4 | unhex(p[i+2])
			switch {
			case v == 0:
				return "", errNUL
			case unreserved(v):
				b = append(b, v)
			default:
				b = append(b, '%', p[i+1], p[i+2])
			}
			i += 2
		case c == '\\':
			b = append(b, '/')
		case !pathByte(c):
			b = append(b, '%', hex[c>>4], hex[c&15])
		default:
			b = append(b, c)
		}
	}
	return removeDotSegments(string(b)), nil
}

// plain reports whether p needs no work: no escape, backslash or byte to
// escape, and no dot segment.
func plain(p string) bool {
	for i := 0; i < len(p); i++ {
		if c := p[i]; c == '%' || c == '\\' || !pathByte(c) {
			return false
		}
	}
	return !strings.Contains(p, "/.")
}

// pathByte reports whether c may stand unescaped in a path as Go's URL
// writes one (net/url's validEncoding): RFC 3986's unreserved and
// sub-delims, ':', '@' and '/'.
func pathByte(c byte) bool {
	if unreserved(c) {
		return true
	}
	switch c {
	case '/', ':', '@', '!', '$', '&', '\'', '(', ')', '*', '+', ',', ';', '=':
		return true
	}
	return false
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
		switch dotSegment(s) {
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

// dotSegment is s without its path parameters when that makes it a dot
// segment ("..;jsessionid=x" is ".."), else s.
func dotSegment(s string) string {
	if name, _, ok := strings.Cut(s, ";"); ok && (name == "." || name == "..") {
		return name
	}
	return s
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
