package upstream

import (
	"io"
	"net/http"
	"net/textproto"

	"golang.org/x/net/http/httpguts"
)

// parseUsualHead reads the head most answers have, without net/http's
// reader and its allocations: HTTP/1.1, a final status from 200 to 599 but
// 204 and 304, to a request other than HEAD and CONNECT; every line ending
// in CRLF; field names of token characters; values of visible ASCII,
// spaces and tabs; exactly one Content-Length, of digits; and none of the
// fields whose reading is more than a copy (Transfer-Encoding, Trailer,
// Connection, Keep-Alive, Pragma). ok is false for any other head, which
// http.ReadResponse reads then. For the heads it reads, the answer is
// field for field what http.ReadResponse gives (TestUsualHeadAsNetHTTP
// holds it to that), but for its Body, which is not to be read.
func parseUsualHead(head []byte, req *http.Request) (resp *http.Response, ok bool) {
	if req == nil || req.Method == http.MethodHead || req.Method == http.MethodConnect {
		return nil, false
	}
	const proto = "HTTP/1.1 "
	if len(head) < len(proto)+3+4 || string(head[:len(proto)]) != proto {
		return nil, false
	}
	eol := indexCRLF(head)
	if eol < 0 {
		return nil, false
	}
	status := head[len(proto):eol]
	if len(status) < 3 {
		return nil, false
	}
	code := 0
	for i := range 3 {
		c := status[i]
		if c < '0' || c > '9' {
			return nil, false
		}
		code = code*10 + int(c-'0')
	}
	if code < 200 || code > 599 || code == http.StatusNoContent || code == http.StatusNotModified {
		return nil, false
	}
	if len(status) > 3 && status[3] != ' ' {
		return nil, false
	}
	for _, c := range status {
		if !visible(c) {
			return nil, false
		}
	}
	// Count the fields, and check the block ends where the head does.
	lines := head[eol+2:]
	n := 0
	for rest := lines; ; {
		i := indexCRLF(rest)
		if i < 0 {
			return nil, false
		}
		if i == 0 {
			if len(rest) != 2 {
				return nil, false // bytes after the head's end
			}
			break
		}
		n++
		rest = rest[i+2:]
	}
	// One string holds the status and every name and value.
	all := string(head[len(proto) : len(head)-2])
	off := len(proto) // of all in head
	resp = &http.Response{
		Status:     all[:len(status)],
		StatusCode: code,
		Proto:      "HTTP/1.1",
		ProtoMajor: 1,
		ProtoMinor: 1,
		Request:    req,
	}
	hdr := make(http.Header, n)
	vals := make([]string, n)
	contentLength := int64(-1)
	pos := eol + 2
	for i := range n {
		end := pos + indexCRLF(head[pos:])
		line := head[pos:end]
		colon := -1
		for j, c := range line {
			if c == ':' {
				colon = j
				break
			}
			if !httpguts.IsTokenRune(rune(c)) {
				return nil, false
			}
		}
		if colon <= 0 {
			return nil, false
		}
		v0, v1 := colon+1, len(line)
		for v0 < v1 && (line[v0] == ' ' || line[v0] == '\t') {
			v0++
		}
		for v1 > v0 && (line[v1-1] == ' ' || line[v1-1] == '\t') {
			v1--
		}
		for _, c := range line[v0:v1] {
			if !visible(c) && c != '\t' {
				return nil, false
			}
		}
		name := textproto.CanonicalMIMEHeaderKey(all[pos-off : pos-off+colon])
		value := all[pos-off+v0 : pos-off+v1]
		switch name {
		case "Transfer-Encoding", "Trailer", "Connection", "Keep-Alive", "Pragma":
			return nil, false
		case "Content-Length":
			if contentLength >= 0 || len(value) == 0 || len(value) > 18 {
				return nil, false
			}
			contentLength = 0
			for j := range len(value) {
				c := value[j]
				if c < '0' || c > '9' {
					return nil, false
				}
				contentLength = contentLength*10 + int64(c-'0')
			}
		}
		vals[i] = value
		if prior, dup := hdr[name]; dup {
			hdr[name] = append(prior, value)
		} else {
			hdr[name] = vals[i : i+1 : i+1]
		}
		pos = end + 2
	}
	if contentLength < 0 {
		return nil, false // a body to the close: net/http's to read
	}
	resp.Header = hdr
	resp.ContentLength = contentLength
	resp.Body = http.NoBody
	if contentLength > 0 {
		resp.Body = unread
	}
	return resp, true
}

// unread is the Body of an answer with a body parseUsualHead read the head
// of: the caller reads the body from the connection.
var unread = io.NopCloser(eofReader{})

type eofReader struct{}

func (eofReader) Read([]byte) (int, error) { return 0, io.EOF }

func indexCRLF(b []byte) int {
	for i := 0; i+1 < len(b); i++ {
		if b[i] == '\r' {
			if b[i+1] == '\n' {
				return i
			}
			return -2 // a CR alone: not a usual head
		}
		if b[i] == '\n' {
			return -2 // a bare LF
		}
	}
	return -1
}

// visible reports whether c is visible ASCII or a space.
func visible(c byte) bool { return c >= ' ' && c < 0x7f }
