package engine

import (
	"bytes"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/downstream"
)

// answerHead is how an answer goes to the client: its head as net/http's
// server writes it for a handler (the header block and the fields it adds:
// Date, Content-Length, a sniffed Content-Type, Connection, chunking) and
// the body's framing that head announces.
type answerHead struct {
	status  int
	header  http.Header
	isHEAD  bool
	close   bool // the connection ends after the answer
	done    bool // the whole body is known (a reply): its length is given
	body    []byte
	chunked bool // set by appendHead: the body goes in chunks
	noBody  bool // set by appendHead: no body bytes go out
}

// appendHead appends h's head to dst, as net/http's chunkWriter.writeHeader
// writes it for an HTTP/1.1 request (downstream's fast path ports it), p
// being the first bytes of the body. It sets h.chunked and h.noBody.
func appendHead(dst []byte, h *answerHead, p []byte, now time.Time) []byte {
	header := h.header
	var exclude map[string]bool
	del := func(k string) {
		if _, ok := header[k]; ok {
			if exclude == nil {
				exclude = make(map[string]bool)
			}
			exclude[k] = true
		}
	}
	var set struct {
		contentType, connection, transferEncoding string
		contentLength                             []byte
	}
	var clen [20]byte
	trailers := false
	for k := range header {
		if strings.HasPrefix(k, http.TrailerPrefix) {
			if exclude == nil {
				exclude = make(map[string]bool)
			}
			exclude[k], trailers = true, true
		}
	}
	if len(header["Trailer"]) > 0 {
		trailers = true
	}
	te := header.Get("Transfer-Encoding")
	hasTE := te != ""
	_, hasCLHeader := header["Content-Length"]
	hasCL := hasCLHeader
	if h.done && !trailers && !hasTE && bodyAllowed(h.status) && !hasCLHeader && (!h.isHEAD || len(p) > 0) {
		set.contentLength = strconv.AppendInt(clen[:0], int64(len(p)), 10)
		hasCL = true
	}
	if header.Get("Connection") == "close" {
		h.close = true
	}
	if bodyAllowed(h.status) {
		_, haveType := header["Content-Type"]
		if header.Get("Content-Encoding") == "" && !haveType && !hasTE && len(p) > 0 {
			set.contentType = http.DetectContentType(p)
		}
	} else {
		for _, k := range suppressed(h.status) {
			del(k)
		}
	}
	if hasCL && hasTE && te != "identity" {
		del("Content-Length")
		hasCL = false
	}
	switch {
	case h.isHEAD || !bodyAllowed(h.status):
		del("Transfer-Encoding")
		h.noBody = true
	case hasCL:
		del("Transfer-Encoding")
	case hasTE && te == "identity":
		h.close = true
		del("Transfer-Encoding")
	default:
		h.chunked = true
		set.transferEncoding = "chunked"
		if hasTE && te == "chunked" {
			del("Transfer-Encoding")
		}
	}
	if h.chunked {
		del("Content-Length")
	}
	if h.close && !downstream.HasToken(header.Get("Connection"), "close") {
		del("Connection")
		set.connection = "close"
	}

	dst = appendStatusLine(dst, h.status)
	buf := bytes.NewBuffer(dst)
	_ = header.WriteSubset(buf, exclude)
	dst = buf.Bytes()
	if _, ok := header["Date"]; !ok {
		dst = append(dst, "Date: "...)
		dst = now.UTC().AppendFormat(dst, http.TimeFormat)
		dst = append(dst, "\r\n"...)
	}
	if set.contentLength != nil {
		dst = append(dst, "Content-Length: "...)
		dst = append(dst, set.contentLength...)
		dst = append(dst, "\r\n"...)
	}
	for _, kv := range [...][2]string{{"Content-Type", set.contentType}, {"Connection", set.connection}, {"Transfer-Encoding", set.transferEncoding}} {
		if kv[1] != "" {
			dst = append(dst, kv[0]...)
			dst = append(dst, ": "...)
			dst = append(dst, kv[1]...)
			dst = append(dst, "\r\n"...)
		}
	}
	return append(dst, "\r\n"...)
}

func appendStatusLine(dst []byte, code int) []byte {
	dst = append(dst, "HTTP/1.1 "...)
	if text := http.StatusText(code); text != "" {
		dst = strconv.AppendInt(dst, int64(code), 10)
		dst = append(dst, ' ')
		dst = append(dst, text...)
		return append(dst, "\r\n"...)
	}
	if code < 100 {
		dst = append(dst, '0')
	}
	if code < 10 {
		dst = append(dst, '0')
	}
	dst = strconv.AppendInt(dst, int64(code), 10)
	dst = append(dst, " status code "...)
	dst = strconv.AppendInt(dst, int64(code), 10)
	return append(dst, "\r\n"...)
}

// appendTrailers appends the last chunk with the answer's trailers: the
// fields named with http.TrailerPrefix in header and those it declares in
// Trailer, as net/http's chunkWriter.close writes them.
func appendTrailers(dst []byte, header http.Header) []byte {
	dst = append(dst, "0\r\n"...)
	var tr http.Header
	for k, vv := range header {
		if name, ok := strings.CutPrefix(k, http.TrailerPrefix); ok {
			if tr == nil {
				tr = make(http.Header)
			}
			tr[http.CanonicalHeaderKey(name)] = vv
		}
	}
	for _, v := range header["Trailer"] {
		for name := range strings.SplitSeq(v, ",") {
			name = http.CanonicalHeaderKey(strings.TrimSpace(name))
			if vv, ok := header[name]; ok && name != "" {
				if tr == nil {
					tr = make(http.Header)
				}
				tr[name] = vv
			}
		}
	}
	if tr != nil {
		buf := bytes.NewBuffer(dst)
		_ = tr.Write(buf)
		dst = buf.Bytes()
	}
	return append(dst, "\r\n"...)
}

func bodyAllowed(status int) bool {
	return !(status >= 100 && status <= 199 || status == 204 || status == 304)
}

func suppressed(status int) []string {
	switch {
	case status == 304:
		return []string{"Content-Type", "Content-Length", "Transfer-Encoding"}
	case !bodyAllowed(status):
		return []string{"Content-Length", "Transfer-Encoding"}
	}
	return nil
}
