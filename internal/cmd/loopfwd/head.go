package main

import (
	"bytes"
	"errors"
)

// maxHead bounds a request or answer head.
const maxHead = 64 << 10

// head is what forwarding needs of a parsed head.
type head struct {
	method        []byte // requests
	status        int    // answers
	contentLength int64  // -1: none
	chunked       bool   // Transfer-Encoding present
	upgrade       bool   // Upgrade present
	close         bool   // Connection: close, or HTTP/1.0 without keep-alive
}

var (
	errBadHead  = errors.New("malformed head")
	errBadValue = errors.New("bad Content-Length")
)

// hopByHop are the headers a forwarder drops (RFC 9110, 7.6.1).
var hopByHop = [][]byte{
	[]byte("connection"), []byte("keep-alive"), []byte("proxy-connection"), []byte("te"),
	[]byte("trailer"), []byte("upgrade"), []byte("proxy-authenticate"), []byte("proxy-authorization"),
}

// tokenChar is RFC 9110's tchar.
var tokenChar = func() (t [256]bool) {
	for c := '0'; c <= '9'; c++ {
		t[c] = true
	}
	for c := 'a'; c <= 'z'; c++ {
		t[c], t[c-'a'+'A'] = true, true
	}
	for _, c := range "!#$%&'*+-.^_`|~" {
		t[c] = true
	}
	return
}()

func isToken(b []byte) bool {
	if len(b) == 0 {
		return false
	}
	for _, c := range b {
		if !tokenChar[c] {
			return false
		}
	}
	return true
}

// validValue reports whether a field value has no control bytes but tab.
func validValue(b []byte) bool {
	for _, c := range b {
		if c < ' ' && c != '\t' || c == 0x7f {
			return false
		}
	}
	return true
}

// parseHead parses the head b (ending with its blank line), validating
// every line, and appends to dst the head to forward: the first line as
// is, every field but the hop-by-hop ones and those Connection names. It
// returns dst and the head's facts.
func parseHead(dst, b []byte, request bool) ([]byte, head, error) {
	h := head{contentLength: -1}
	eol := bytes.IndexByte(b, '\n')
	if eol < 1 || b[eol-1] != '\r' {
		return dst, h, errBadHead
	}
	line := b[:eol-1]
	if request {
		sp1 := bytes.IndexByte(line, ' ')
		sp2 := bytes.LastIndexByte(line, ' ')
		if sp1 <= 0 || sp2 <= sp1+1 || !isToken(line[:sp1]) {
			return dst, h, errBadHead
		}
		h.method = line[:sp1]
		switch string(line[sp2+1:]) {
		case "HTTP/1.1":
		case "HTTP/1.0":
			h.close = true
		default:
			return dst, h, errBadHead
		}
		for _, c := range line[sp1+1 : sp2] {
			if c <= ' ' || c == 0x7f {
				return dst, h, errBadHead
			}
		}
	} else {
		if len(line) < 12 || string(line[:9]) != "HTTP/1.1 " && string(line[:9]) != "HTTP/1.0 " || len(line) > 12 && line[12] != ' ' {
			return dst, h, errBadHead
		}
		for _, c := range line[9:12] {
			if c < '0' || c > '9' {
				return dst, h, errBadHead
			}
			h.status = h.status*10 + int(c-'0')
		}
	}
	dst = append(dst, b[:eol+1]...)
	rest := b[eol+1:]
	// Two passes over the fields: the first for what Connection names,
	// the second to copy.
	var named [][]byte
	for pass := 0; pass < 2; pass++ {
		r := rest
		for {
			eol := bytes.IndexByte(r, '\n')
			if eol < 1 || r[eol-1] != '\r' {
				return dst, h, errBadHead
			}
			line := r[:eol-1]
			if len(line) == 0 {
				break
			}
			field := r[:eol+1]
			r = r[eol+1:]
			colon := bytes.IndexByte(line, ':')
			if colon <= 0 || !isToken(line[:colon]) {
				return dst, h, errBadHead // also obsolete folding: a line starting with a space
			}
			name, value := line[:colon], bytes.Trim(line[colon+1:], " \t")
			if !validValue(value) {
				return dst, h, errBadHead
			}
			if pass == 0 {
				if err := h.field(name, value, &named); err != nil {
					return dst, h, err
				}
				continue
			}
			if dropped(name, named) {
				continue
			}
			dst = append(dst, field...)
		}
	}
	if h.chunked && h.contentLength >= 0 {
		return dst, h, errBadValue
	}
	return append(dst, '\r', '\n'), h, nil
}

// field records what one field says of the message's framing.
func (h *head) field(name, value []byte, named *[][]byte) error {
	switch {
	case bytes.EqualFold(name, []byte("content-length")):
		n, ok := int64(0), len(value) > 0 && len(value) <= 18
		for _, c := range value {
			if c < '0' || c > '9' {
				ok = false
				break
			}
			n = n*10 + int64(c-'0')
		}
		if !ok || h.contentLength >= 0 && h.contentLength != n {
			return errBadValue
		}
		h.contentLength = n
	case bytes.EqualFold(name, []byte("transfer-encoding")):
		h.chunked = true
	case bytes.EqualFold(name, []byte("upgrade")):
		h.upgrade = true
	case bytes.EqualFold(name, []byte("connection")):
		for tok := range bytes.SplitSeq(value, []byte(",")) {
			tok = bytes.Trim(tok, " \t")
			if bytes.EqualFold(tok, []byte("close")) {
				h.close = true
			} else if bytes.EqualFold(tok, []byte("keep-alive")) {
				h.close = false
			}
			*named = append(*named, tok)
		}
	}
	return nil
}

// dropped reports whether a field is not forwarded: hop-by-hop, or named
// by Connection.
func dropped(name []byte, named [][]byte) bool {
	for _, h := range hopByHop {
		if bytes.EqualFold(name, h) {
			return true
		}
	}
	for _, n := range named {
		if bytes.EqualFold(name, n) {
			return true
		}
	}
	return false
}
