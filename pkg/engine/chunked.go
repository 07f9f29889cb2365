package engine

import (
	"bytes"
	"errors"
	"net/http"
	"net/textproto"

	"golang.org/x/net/http/httpguts"

	"github.com/sidecar-mesh/sidecar/pkg/downstream"
)

// chunkReader frames a chunked body as it arrives, as strictly as
// net/http's reader: a chunk-size line of hex digits (extensions dropped,
// at most 4 KiB) ending in CRLF, the data and its CRLF, and after the last
// chunk the trailer fields (no folding, at most maxTrailer bytes) and the
// empty line.
type chunkReader struct {
	state      chunkState
	left       int64  // data bytes left of the current chunk
	line       []byte // a size line or the trailer block, so far
	lineStart  int    // where the trailer block's last line starts in line
	maxTrailer int
	trailer    http.Header
}

type chunkState uint8

const (
	chSize chunkState = iota
	chData
	chDataEnd // the CRLF after a chunk's data
	chTrailer
	chDone
)

var errBadChunk = errors.New("malformed chunked encoding")

const maxChunkLine = 4096

// feed reads b, calling emit with each run of body data, and returns how
// many bytes of b were the body's (fewer than len(b) once it ended: the
// rest follows the body).
func (r *chunkReader) feed(b []byte, emit func([]byte)) (int, error) {
	n := 0
	for n < len(b) && r.state != chDone {
		switch r.state {
		case chSize:
			i := bytes.IndexByte(b[n:], '\n')
			if i < 0 {
				r.line = append(r.line, b[n:]...)
				if len(r.line) >= maxChunkLine {
					return n, errBadChunk
				}
				return len(b), nil
			}
			line := b[n : n+i+1]
			if len(r.line) > 0 {
				r.line = append(r.line, line...)
				line = r.line
			}
			n += i + 1
			size, ok := parseChunkSize(line)
			r.line = r.line[:0]
			if !ok {
				return n, errBadChunk
			}
			if size == 0 {
				r.state = chTrailer
				continue
			}
			r.left, r.state = size, chData
		case chData:
			k := int(min(int64(len(b)-n), r.left))
			emit(b[n : n+k])
			n += k
			if r.left -= int64(k); r.left == 0 {
				r.state = chDataEnd
			}
		case chDataEnd:
			r.line = append(r.line, b[n])
			n++
			if len(r.line) == 2 {
				if r.line[0] != '\r' || r.line[1] != '\n' {
					return n, errBadChunk
				}
				r.line, r.state = r.line[:0], chSize
			}
		case chTrailer:
			i := bytes.IndexByte(b[n:], '\n')
			if i < 0 {
				r.line = append(r.line, b[n:]...)
				if len(r.line) > r.maxTrailer {
					return n, errBadChunk
				}
				return len(b), nil
			}
			r.line = append(r.line, b[n:n+i+1]...)
			n += i + 1
			line := r.line[r.lineStart:]
			if len(r.line) > r.maxTrailer || len(line) < 2 || line[len(line)-2] != '\r' {
				return n, errBadChunk
			}
			if len(line) == 2 { // the empty line: the end
				if err := r.parseTrailer(r.line); err != nil {
					return n, err
				}
				r.line, r.state = nil, chDone
				continue
			}
			r.lineStart = len(r.line)
		}
	}
	return n, nil
}

// done reports whether the body ended.
func (r *chunkReader) done() bool { return r.state == chDone }

// parseChunkSize reads a chunk-size line (with its LF): hex digits, then
// optional extensions after ';', then CRLF.
func parseChunkSize(line []byte) (int64, bool) {
	if len(line) < 3 || line[len(line)-2] != '\r' {
		return 0, false // a bare LF: refused, as net/http refuses it
	}
	return downstream.ParseChunkSize(line[:len(line)-2])
}

// parseTrailer reads the trailer block (its lines and the empty line).
func (r *chunkReader) parseTrailer(block []byte) error {
	for len(block) > 0 {
		i := bytes.IndexByte(block, '\n')
		if i < 1 || block[i-1] != '\r' {
			return errBadChunk
		}
		line := block[:i-1]
		block = block[i+1:]
		if len(line) == 0 {
			return nil
		}
		colon := bytes.IndexByte(line, ':')
		if colon <= 0 || line[0] == ' ' || line[0] == '\t' {
			return errBadChunk
		}
		name, value := string(line[:colon]), string(bytes.Trim(line[colon+1:], " \t"))
		if !httpguts.ValidHeaderFieldName(name) || !httpguts.ValidHeaderFieldValue(value) {
			return errBadChunk
		}
		if r.trailer == nil {
			r.trailer = make(http.Header)
		}
		k := textproto.CanonicalMIMEHeaderKey(name)
		r.trailer[k] = append(r.trailer[k], value)
	}
	return nil
}
