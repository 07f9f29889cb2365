package downstream

// The response writer of the fast path: net/http's response and
// chunkWriter, ported.

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/sidecar-mesh/sidecar/internal/readahead"
	"golang.org/x/net/http/httpguts"
)

// h1Response is net/http's response writer for one request, ported: the
// same buffering, header block and connection decisions.
type h1Response struct {
	c                   *h1Conn
	req                 *http.Request
	reqBody             io.ReadCloser
	w                   *bufio.Writer // bufferBeforeChunkingSize, to cw
	cw                  h1ChunkWriter
	handlerHeader       http.Header
	snapshot            http.Header // handlerHeader at WriteHeader, when Header was called
	calledHeader        bool
	wroteHeader         bool
	hijacked            bool
	fullDuplex          bool
	handlerDone         bool
	wantsClose          bool
	closeAfter          bool
	status              int
	written             int64
	contentLength       int64
	trailers            []string
	requestBodyLimitHit bool
	writeDeadline       bool // the handler set one: cleared after the request, as net/http
	dateBuf             [len(http.TimeFormat)]byte
	clenBuf             [20]byte
}

var (
	_ http.ResponseWriter = (*h1Response)(nil)
	_ http.Flusher        = (*h1Response)(nil)
	_ http.Hijacker       = (*h1Response)(nil)
)

func (w *h1Response) reset(req *http.Request) {
	w.req, w.reqBody = req, req.Body
	if w.handlerHeader == nil {
		w.handlerHeader = make(http.Header)
	} else {
		clear(w.handlerHeader)
	}
	if w.snapshot != nil {
		clear(w.snapshot)
	}
	w.calledHeader, w.wroteHeader, w.hijacked, w.fullDuplex, w.handlerDone = false, false, false, false, false
	w.closeAfter, w.requestBodyLimitHit, w.writeDeadline = false, false, false
	w.wantsClose = req.Close
	w.status, w.written, w.contentLength = 0, 0, -1
	w.trailers = w.trailers[:0]
	w.cw.wroteHeader, w.cw.chunking, w.cw.header = false, false, nil
	w.w.Reset(&w.cw)
}

func (w *h1Response) Header() http.Header {
	if w.cw.header == nil && w.wroteHeader && !w.cw.wroteHeader {
		// Read between the logical and the physical write of the header:
		// the written state is kept apart, as net/http does.
		w.cw.header = w.snap()
	}
	w.calledHeader = true
	return w.handlerHeader
}

// snap copies the handler's header into the reused snapshot map, values
// included (as net/http's Clone: a handler changing a value after
// WriteHeader does not change what is sent), in one allocation.
func (w *h1Response) snap() http.Header {
	if w.snapshot == nil {
		w.snapshot = make(http.Header, len(w.handlerHeader))
	}
	n := 0
	for _, v := range w.handlerHeader {
		n += len(v)
	}
	vals := make([]string, n)
	for k, v := range w.handlerHeader {
		n := copy(vals, v)
		w.snapshot[k] = vals[:n:n]
		vals = vals[n:]
	}
	return w.snapshot
}

func (w *h1Response) SetReadDeadline(t time.Time) error {
	w.c.bgMu.Lock()
	defer w.c.bgMu.Unlock()
	w.c.deadline = t
	return w.c.rd.SetReadDeadline(t)
}

func (w *h1Response) SetWriteDeadline(t time.Time) error {
	w.writeDeadline = true
	return w.c.conn.SetWriteDeadline(t)
}

func (w *h1Response) EnableFullDuplex() error {
	w.fullDuplex = true
	return nil
}

func (w *h1Response) WriteHeader(code int) {
	if w.hijacked {
		w.c.srv.logf("http: response.WriteHeader on hijacked connection")
		return
	}
	if w.wroteHeader {
		w.c.srv.logf("http: superfluous response.WriteHeader call")
		return
	}
	if code < 100 || code > 999 {
		panic(fmt.Sprintf("invalid WriteHeader code %v", code))
	}
	if code >= 100 && code <= 199 && code != http.StatusSwitchingProtocols {
		writeStatusLine(w.c.bw, code)
		_ = w.handlerHeader.WriteSubset(w.c.bw, excludedHeadersNoBody)
		_, _ = w.c.bw.WriteString("\r\n")
		_ = w.c.bw.Flush()
		return
	}
	w.wroteHeader = true
	w.status = code
	if w.calledHeader && w.cw.header == nil {
		w.cw.header = w.snap()
	}
	if cl := w.handlerHeader.Get("Content-Length"); cl != "" {
		v, err := strconv.ParseInt(cl, 10, 64)
		if err == nil && v >= 0 {
			w.contentLength = v
		} else {
			w.c.srv.logf("http: invalid Content-Length of %q", cl)
			w.handlerHeader.Del("Content-Length")
		}
	}
}

var excludedHeadersNoBody = map[string]bool{"Content-Length": true, "Transfer-Encoding": true}

func (w *h1Response) Write(p []byte) (int, error) {
	if w.hijacked {
		return 0, http.ErrHijacked
	}
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	if len(p) == 0 {
		return 0, nil
	}
	if !bodyAllowedForStatus(w.status) {
		return 0, http.ErrBodyNotAllowed
	}
	w.written += int64(len(p))
	if w.contentLength != -1 && w.written > w.contentLength {
		return 0, http.ErrContentLength
	}
	return w.w.Write(p)
}

func (w *h1Response) WriteString(s string) (int, error) {
	if w.hijacked {
		return 0, http.ErrHijacked
	}
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	if len(s) == 0 {
		return 0, nil
	}
	if !bodyAllowedForStatus(w.status) {
		return 0, http.ErrBodyNotAllowed
	}
	w.written += int64(len(s))
	if w.contentLength != -1 && w.written > w.contentLength {
		return 0, http.ErrContentLength
	}
	return w.w.WriteString(s)
}

func (w *h1Response) Flush() { _ = w.FlushError() }

func (w *h1Response) FlushError() error {
	if w.hijacked {
		return http.ErrHijacked
	}
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	err := w.w.Flush()
	e2 := w.cw.flush()
	if err == nil {
		err = e2
	}
	return err
}

func (w *h1Response) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	if w.hijacked {
		return nil, nil, http.ErrHijacked
	}
	if w.wroteHeader {
		_ = w.cw.flush()
	}
	c := w.c
	c.stopWatch()
	w.hijacked = true
	c.setReadDeadline(time.Time{})
	_ = c.conn.SetWriteDeadline(time.Time{})
	c.srv.forget(c)
	pending := append([]byte(nil), c.rbuf[c.r:c.w]...)
	c.r, c.w = 0, 0
	// The connection the fast path reads: past the framing check, which
	// has no say in what a hijacked connection carries.
	br := bufio.NewReader(&readahead.Conn{Conn: c.rd, Head: pending})
	bw := bufio.NewWriter(c.rd)
	return c.rd, bufio.NewReadWriter(br, bw), nil
}

// finish ends the response once the handler returned.
func (w *h1Response) finish() {
	w.handlerDone = true
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	_ = w.w.Flush()
	w.cw.close()
	_ = w.c.bw.Flush()
	_ = w.reqBody.Close()
	if w.req.MultipartForm != nil {
		_ = w.req.MultipartForm.RemoveAll() // as net/http: no temporary files left behind
	}
	if w.writeDeadline {
		_ = w.c.conn.SetWriteDeadline(time.Time{})
	}
}

func (w *h1Response) shouldReuseConnection() bool {
	if w.closeAfter {
		return false
	}
	if w.req.Method != http.MethodHead && w.contentLength != -1 && bodyAllowedForStatus(w.status) && w.contentLength != w.written {
		return false // did not write what it announced: out of sync
	}
	if w.c.werr != nil {
		return false
	}
	return !w.closedRequestBodyEarly()
}

func (w *h1Response) closedRequestBodyEarly() bool {
	b, ok := w.req.Body.(*h1Body)
	return ok && b.didEarlyClose()
}

func (w *h1Response) declareTrailer(k string) {
	k = http.CanonicalHeaderKey(k)
	if !httpguts.ValidTrailerHeader(k) {
		return
	}
	w.trailers = append(w.trailers, k)
}

func (w *h1Response) finalTrailers() http.Header {
	var t http.Header
	for k, vv := range w.handlerHeader {
		if kk, found := strings.CutPrefix(k, http.TrailerPrefix); found {
			if t == nil {
				t = make(http.Header)
			}
			t[kk] = vv
		}
	}
	for _, k := range w.trailers {
		if t == nil {
			t = make(http.Header)
		}
		for _, v := range w.handlerHeader[k] {
			t.Add(k, v)
		}
	}
	return t
}

func bodyAllowedForStatus(status int) bool {
	switch {
	case status >= 100 && status <= 199, status == 204, status == 304:
		return false
	}
	return true
}

func writeStatusLine(bw *bufio.Writer, code int) {
	_, _ = bw.WriteString("HTTP/1.1 ")
	if text := http.StatusText(code); text != "" {
		var b [3]byte
		_, _ = bw.Write(strconv.AppendInt(b[:0], int64(code), 10))
		_ = bw.WriteByte(' ')
		_, _ = bw.WriteString(text)
		_, _ = bw.WriteString("\r\n")
	} else {
		_, _ = fmt.Fprintf(bw, "%03d status code %d\r\n", code, code)
	}
}

// h1ChunkWriter is net/http's chunkWriter: it writes the header block on
// the first write and frames the body in chunks when it must.
type h1ChunkWriter struct {
	res         *h1Response
	header      http.Header // the snapshot, or nil: the handler's header
	wroteHeader bool
	chunking    bool
}

func (cw *h1ChunkWriter) Write(p []byte) (n int, err error) {
	if !cw.wroteHeader {
		cw.writeHeader(p)
	}
	if cw.res.req.Method == http.MethodHead {
		return len(p), nil // eat writes
	}
	bw := cw.res.c.bw
	if cw.chunking {
		var h [18]byte
		if _, err = bw.Write(append(strconv.AppendInt(h[:0], int64(len(p)), 16), '\r', '\n')); err != nil {
			_ = cw.res.c.conn.Close()
			return 0, err
		}
	}
	n, err = bw.Write(p)
	if cw.chunking && err == nil {
		_, err = bw.WriteString("\r\n")
	}
	if err != nil {
		_ = cw.res.c.conn.Close()
	}
	return n, err
}

func (cw *h1ChunkWriter) flush() error {
	if !cw.wroteHeader {
		cw.writeHeader(nil)
	}
	return cw.res.c.bw.Flush()
}

func (cw *h1ChunkWriter) close() {
	if !cw.wroteHeader {
		cw.writeHeader(nil)
	}
	if cw.chunking {
		bw := cw.res.c.bw
		_, _ = bw.WriteString("0\r\n")
		if trailers := cw.res.finalTrailers(); trailers != nil {
			_ = trailers.Write(bw)
		}
		_, _ = bw.WriteString("\r\n")
	}
}

// dateCache formats the Date header once a second.
var dateCache atomic.Pointer[dateValue]

type dateValue struct {
	sec int64
	b   []byte
}

func appendDate(b []byte, now time.Time) []byte {
	sec := now.Unix()
	if d := dateCache.Load(); d != nil && d.sec == sec {
		return append(b, d.b...)
	}
	v := now.UTC().AppendFormat(nil, http.TimeFormat)
	dateCache.Store(&dateValue{sec: sec, b: v})
	return append(b, v...)
}

// writeHeader is net/http's chunkWriter.writeHeader for HTTP/1.1 requests.
func (cw *h1ChunkWriter) writeHeader(p []byte) {
	if cw.wroteHeader {
		return
	}
	cw.wroteHeader = true
	w := cw.res
	keepAlivesEnabled := w.c.srv.doKeepAlives()
	isHEAD := w.req.Method == http.MethodHead

	header := cw.header
	owned := header != nil
	if !owned {
		header = w.handlerHeader
	}
	var excludeHeader map[string]bool
	delHeader := func(key string) {
		if owned {
			header.Del(key)
			return
		}
		if _, ok := header[key]; !ok {
			return
		}
		if excludeHeader == nil {
			excludeHeader = make(map[string]bool)
		}
		excludeHeader[key] = true
	}
	var set struct {
		contentType, connection, transferEncoding string
		date, contentLength                       []byte
	}

	trailers := false
	for k := range cw.header {
		if strings.HasPrefix(k, http.TrailerPrefix) {
			if excludeHeader == nil {
				excludeHeader = make(map[string]bool)
			}
			excludeHeader[k] = true
			trailers = true
		}
	}
	for _, v := range cw.header["Trailer"] {
		trailers = true
		foreachHeaderElement(v, w.declareTrailer)
	}

	te := header.Get("Transfer-Encoding")
	hasTE := te != ""
	if w.handlerDone && !trailers && !hasTE && bodyAllowedForStatus(w.status) && !headerHas(header, "Content-Length") && (!isHEAD || len(p) > 0) {
		w.contentLength = int64(len(p))
		set.contentLength = strconv.AppendInt(w.clenBuf[:0], int64(len(p)), 10)
	}
	hasCL := w.contentLength != -1
	if w.wantsClose {
		w.closeAfter = true
	}
	if header.Get("Connection") == "close" || !keepAlivesEnabled {
		w.closeAfter = true
	}

	if w.req.ContentLength != 0 && !w.closeAfter && !w.fullDuplex {
		var discard, tooBig bool
		switch bdy := w.req.Body.(type) {
		case *h1Body:
			bdy.mu.Lock()
			switch {
			case bdy.closed:
				if !bdy.sawEOF {
					w.closeAfter = true // closed in the handler with a non-EOF error
				}
			case bdy.remain >= maxPostHandlerReadBytes:
				tooBig = true
			default:
				discard = true
			}
			bdy.mu.Unlock()
		default:
			discard = true
		}
		if discard {
			_, err := io.CopyN(io.Discard, w.reqBody, maxPostHandlerReadBytes+1)
			switch err {
			case nil:
				tooBig = true // there is more
			case http.ErrBodyReadAfterClose:
			case io.EOF:
				if err := w.reqBody.Close(); err != nil {
					w.closeAfter = true
				}
			default:
				// A read timeout, a client gone: whatever remains on the
				// wire must not be read as another request.
				w.closeAfter = true
			}
		}
		if tooBig {
			w.requestBodyLimitHit = true
			w.closeAfter = true
			delHeader("Connection")
			set.connection = "close"
		}
	}

	code := w.status
	if bodyAllowedForStatus(code) {
		_, haveType := header["Content-Type"]
		hasCE := header.Get("Content-Encoding") != ""
		if !hasCE && !haveType && !hasTE && len(p) > 0 {
			set.contentType = http.DetectContentType(p)
		}
	} else {
		for _, k := range suppressedHeaders(code) {
			delHeader(k)
		}
	}
	if !headerHas(header, "Date") {
		set.date = appendDate(w.dateBuf[:0], time.Now())
	}
	if hasCL && hasTE && te != "identity" {
		w.c.srv.logf("http: WriteHeader called with both Transfer-Encoding of %q and a Content-Length of %d", te, w.contentLength)
		delHeader("Content-Length")
		hasCL = false
	}
	switch {
	case isHEAD || !bodyAllowedForStatus(code) || code == http.StatusNoContent:
		delHeader("Transfer-Encoding")
	case hasCL:
		delHeader("Transfer-Encoding")
	case hasTE && te == "identity":
		cw.chunking = false
		w.closeAfter = true
		delHeader("Transfer-Encoding")
	default:
		cw.chunking = true
		set.transferEncoding = "chunked"
		if hasTE && te == "chunked" {
			delHeader("Transfer-Encoding")
		}
	}
	if cw.chunking {
		delHeader("Content-Length")
	}
	if w.closeAfter && (!keepAlivesEnabled || !HasToken(cw.header.Get("Connection"), "close")) && !isProtocolSwitchResponse(w.status, header) {
		delHeader("Connection")
		set.connection = "close"
	}

	bw := w.c.bw
	writeStatusLine(bw, code)
	_ = cw.header.WriteSubset(bw, excludeHeader)
	if set.date != nil {
		_, _ = bw.WriteString("Date: ")
		_, _ = bw.Write(set.date)
		_, _ = bw.WriteString("\r\n")
	}
	if set.contentLength != nil {
		_, _ = bw.WriteString("Content-Length: ")
		_, _ = bw.Write(set.contentLength)
		_, _ = bw.WriteString("\r\n")
	}
	for _, kv := range [...][2]string{{"Content-Type", set.contentType}, {"Connection", set.connection}, {"Transfer-Encoding", set.transferEncoding}} {
		if kv[1] != "" {
			_, _ = bw.WriteString(kv[0])
			_, _ = bw.WriteString(": ")
			_, _ = bw.WriteString(kv[1])
			_, _ = bw.WriteString("\r\n")
		}
	}
	_, _ = bw.WriteString("\r\n")
}

func headerHas(h http.Header, key string) bool {
	_, ok := h[key]
	return ok
}

func suppressedHeaders(status int) []string {
	switch {
	case status == 304:
		return []string{"Content-Type", "Content-Length", "Transfer-Encoding"}
	case !bodyAllowedForStatus(status):
		return []string{"Content-Length", "Transfer-Encoding"}
	}
	return nil
}

func isProtocolSwitchResponse(code int, h http.Header) bool {
	return code == http.StatusSwitchingProtocols && h.Get("Upgrade") != "" &&
		httpguts.HeaderValuesContainsToken(h["Connection"], "Upgrade")
}

// HasToken reports whether token appears in v, case-insensitively, as
// net/http's hasToken (a substring bounded by non-token characters).
func HasToken(v, token string) bool {
	if len(token) > len(v) || token == "" {
		return false
	}
	if v == token {
		return true
	}
	for sp := 0; sp <= len(v)-len(token); sp++ {
		if b := v[sp]; b != token[0] && b|0x20 != token[0] {
			continue
		}
		if sp > 0 && !isTokenBoundary(v[sp-1]) {
			continue
		}
		if endPos := sp + len(token); endPos != len(v) && !isTokenBoundary(v[endPos]) {
			continue
		}
		if strings.EqualFold(v[sp:sp+len(token)], token) {
			return true
		}
	}
	return false
}

func isTokenBoundary(b byte) bool { return b == ' ' || b == ',' || b == '\t' }

// foreachHeaderElement splits v by commas and calls fn for each non-empty
// trimmed element, as net/http.
func foreachHeaderElement(v string, fn func(string)) {
	v = strings.Trim(v, " \t")
	if v == "" {
		return
	}
	if !strings.Contains(v, ",") {
		fn(v)
		return
	}
	for f := range strings.SplitSeq(v, ",") {
		if f = strings.Trim(f, " \t"); f != "" {
			fn(f)
		}
	}
}
