package downstream

// Parsing a header block of the fast path into a request, exactly as
// net/http would, or refusing it (the connection is then handed over).

import (
	"net/http"
	"net/url"

	"golang.org/x/net/http/httpguts"
)

// headerBlockEnd returns the length of the header block at the start of b,
// through its empty line, or 0 while it is incomplete.
func headerBlockEnd(b []byte) int {
	for i := 0; i < len(b); {
		j := indexByte(b[i:], '\n')
		if j < 0 {
			return 0
		}
		line := b[i : i+j]
		i += j + 1
		if len(line) == 0 || (len(line) == 1 && line[0] == '\r') {
			return i
		}
	}
	return 0
}

func indexByte(b []byte, c byte) int {
	for i, x := range b {
		if x == c {
			return i
		}
	}
	return -1
}

// requestStart reports whether b can begin a request: a method's first
// character, or a CR or LF before the request line.
func requestStart(b byte) bool {
	return b == '\r' || b == '\n' || httpguts.IsTokenRune(rune(b))
}

var fastMethods = [...]string{http.MethodGet, http.MethodPost, http.MethodHead, http.MethodPut,
	http.MethodDelete, http.MethodOptions, http.MethodPatch}

// parse fills req with the request of a header block the fast path can
// serve exactly as net/http would, or returns false.
func (c *h1Conn) parse(block []byte, req *http.Request) bool {
	if !parsePlain(block, c.remoteAddr, req) {
		return false
	}
	if req.ContentLength > 0 {
		req.Body = &h1Body{c: c, remain: req.ContentLength, closing: req.Close}
	}
	return true
}

// PlainRequest fills req with the request of block, one whole header block
// (through its empty line), when it is one the fast path serves exactly as
// net/http would and the framing check passes: HTTP/1.1, a common method,
// an origin-form or http absolute-form target, one valid Host, no Expect,
// Upgrade or Transfer-Encoding, at most one Content-Length, and no header
// name that spells a framing or forwarding header with '_' for '-'. Its
// body is http.NoBody: req.ContentLength says how many bytes follow the
// block. False for anything else, which the listener's server answers
// (net/http, behind the framing check) as it answers it today.
func PlainRequest(block []byte, remoteAddr string, req *http.Request) bool {
	if f, reason := parseFraming(block); reason != "" || f.chunked || f.connect {
		return false
	}
	return parsePlain(block, remoteAddr, req) && underscoredLookalike(req.Header) == ""
}

// parsePlain is parse without the body.
func parsePlain(block []byte, remoteAddr string, req *http.Request) bool {
	// Request line: METHOD SP TARGET SP HTTP/1.1 CRLF.
	eol := indexByte(block, '\n')
	if eol < 1 || block[eol-1] != '\r' {
		return false
	}
	line := block[:eol-1]
	const proto = " HTTP/1.1"
	if len(line) <= len(proto) || string(line[len(line)-len(proto):]) != proto {
		return false
	}
	line = line[:len(line)-len(proto)]
	sp := indexByte(line, ' ')
	if sp < 0 {
		return false
	}
	method := ""
	for _, m := range fastMethods {
		if string(line[:sp]) == m {
			method = m
			break
		}
	}
	target := line[sp+1:]
	if method == "" || len(target) == 0 || !(target[0] == '/' || len(target) > 7 && string(target[:7]) == "http://") {
		return false
	}
	for _, b := range target {
		if b <= ' ' || b >= 0x7f {
			return false
		}
	}
	// One string holds the target and every header value.
	all := string(block[sp+1 : len(block)])
	rawURL := all[:len(target)]
	u, err := url.ParseRequestURI(rawURL)
	if err != nil {
		return false
	}

	// Header lines.
	lines := block[eol+1:]
	n := 0
	for _, b := range lines {
		if b == '\n' {
			n++
		}
	}
	hdr := make(http.Header, n)
	vals := make([]string, 0, n)
	off := sp + 1 // offset of all in block
	pos := eol + 1
	for {
		e := indexByte(block[pos:], '\n')
		if e < 1 || block[pos+e-1] != '\r' {
			return false // bare LF: net/http's own reading decides
		}
		l := block[pos : pos+e-1]
		lineStart := pos
		pos += e + 1
		if len(l) == 0 {
			break
		}
		colon := indexByte(l, ':')
		if colon <= 0 {
			return false
		}
		name := l[:colon]
		vs, ve := colon+1, len(l)
		for vs < ve && (l[vs] == ' ' || l[vs] == '\t') {
			vs++
		}
		for ve > vs && (l[ve-1] == ' ' || l[ve-1] == '\t') {
			ve--
		}
		value := all[lineStart+vs-off : lineStart+ve-off]
		if !httpguts.ValidHeaderFieldValue(value) {
			return false
		}
		key, ok := canonicalKey(name, all[lineStart-off:lineStart+colon-off])
		if !ok {
			return false
		}
		switch key {
		case "Expect", "Upgrade", "Transfer-Encoding":
			return false
		case "Connection":
			if httpguts.HeaderValuesContainsToken([]string{value}, "upgrade") {
				return false
			}
		}
		if prior, ok := hdr[key]; ok {
			hdr[key] = append(prior, value)
			continue
		}
		vals = append(vals, value)
		hdr[key] = vals[len(vals)-1 : len(vals) : len(vals)]
	}

	hosts := hdr["Host"]
	if len(hosts) != 1 || !httpguts.ValidHostHeader(hosts[0]) {
		return false
	}
	var cl int64
	if v, ok := hdr["Content-Length"]; ok {
		if len(v) != 1 {
			return false // net/http merges identical duplicates: let it
		}
		n, ok := parseDecimal([]byte(v[0]))
		if !ok {
			return false
		}
		cl = n
	}
	host := u.Host
	if host == "" {
		host = hosts[0]
	}
	// As net/http's readRequest.
	if hp, ok := hdr["Pragma"]; ok && len(hp) > 0 && hp[0] == "no-cache" {
		if _, ok := hdr["Cache-Control"]; !ok {
			hdr["Cache-Control"] = []string{"no-cache"}
		}
	}
	closeReq := httpguts.HeaderValuesContainsToken(hdr["Connection"], "close")
	delete(hdr, "Host")

	*req = http.Request{
		Method:        method,
		URL:           u,
		Proto:         "HTTP/1.1",
		ProtoMajor:    1,
		ProtoMinor:    1,
		Header:        hdr,
		ContentLength: cl,
		Close:         closeReq,
		Host:          host,
		RemoteAddr:    remoteAddr,
		RequestURI:    rawURL,
		Body:          http.NoBody,
	}
	return true
}

// canonicalKey returns the canonical form of header name b (s is b as a
// string), as net/textproto does, without allocating when b already is
// canonical or a common header; false for a name that is no token.
func canonicalKey(b []byte, s string) (string, bool) {
	upper := true
	canonical := true
	for _, c := range b {
		if !httpguts.IsTokenRune(rune(c)) {
			return "", false
		}
		if upper && 'a' <= c && c <= 'z' || !upper && 'A' <= c && c <= 'Z' {
			canonical = false
		}
		upper = c == '-'
	}
	if canonical {
		return s, true
	}
	return http.CanonicalHeaderKey(s), true
}
