package downstream

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sidecar-mesh/sidecar/internal/ascii"
	"github.com/sidecar-mesh/sidecar/internal/rawio"
	"golang.org/x/net/http/httpguts"
)

// Why this file exists: Go's HTTP/1.1 server is lenient where a proxy must be
// strict. It accepts Content-Length together with Transfer-Encoding (and
// deletes Content-Length before a handler can see the pair), answers unknown
// Transfer-Encodings with a 501 of its own, and accepts identical duplicate
// Content-Lengths. Those are the shapes request smuggling is made of, so the
// listener checks the framing of every request on the wire, before net/http
// parses it, and hands its verdict to the handler.
//
// The check tracks each connection's byte stream through header blocks and
// bodies (Content-Length or chunked) exactly as net/http frames them, so it
// knows where every header block starts. A header block that fails the check
// is never given to net/http: it is replaced by a fixed placeholder request,
// the verdict is queued, and the connection ends after it. The handler takes
// verdicts in order (net/http serves one request at a time per HTTP/1.x
// connection) and answers a bad one with 400 bad_request, so nothing
// malformed is ever forwarded. A fault found inside a chunked body (a bare
// LF in a chunk line) surfaces as ErrBadFraming from the body's Read.

// ErrBadFraming is the error a request body's Read returns when the chunked
// framing on the wire is malformed.
var ErrBadFraming = errors.New("malformed chunked framing")

// placeholder stands in for a rejected header block. The handler knows it by
// its queued verdict, and also by its Host, so that a verdict queue out of
// step can never let it pass.
var placeholder = []byte("GET / HTTP/1.1\r\nHost: " + placeholderHost + "\r\n\r\n")

const placeholderHost = "rejected.invalid"

// h2Preface is HTTP/2's connection preface. Only a connection that starts
// with all of it is handed to net/http unchecked (it serves or refuses h2c
// itself); "PRI *" anywhere else is checked like any request.
var h2Preface = []byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")

type framingState uint8

const (
	stHeader      framingState = iota // reading a header block
	stBody                            // Content-Length body, remaining bytes in n
	stChunkLine                       // a chunk-size line
	stChunkData                       // chunk data, remaining bytes in n
	stChunkCRLF                       // the CRLF after chunk data
	stTrailer                         // trailer lines after the last chunk
	stPassthrough                     // HTTP/2 or an oversized header: net/http takes over
	stDead                            // after a rejected request: nothing more is read
	stTunnel                          // after a CONNECT: bytes held, unjudged, for the tunnel
)

// Verdict is the framing check's judgement of one request.
type Verdict struct {
	// Reason is empty for a request that passed, else says what was wrong.
	Reason string
}

// FramingListener wraps a listener so that every accepted connection checks
// HTTP/1.x request framing. Use it with an http.Server whose ConnContext is
// ConnContext, and call TakeVerdict at the start of the handler.
type FramingListener struct {
	net.Listener
	// MaxHeaderBytes bounds a header block; past it the connection is handed
	// to net/http unchecked, whose own MaxHeaderBytes answers 431.
	MaxHeaderBytes int
	// ReadHeaderTimeout bounds the wait for the rest of a header block once
	// its first bytes are in, on every request of a connection (zero: no
	// bound). The check holds a block until it is whole, so the server
	// above sees none of it before: without this, the second request of a
	// keep-alive connection could trickle in for the whole idle timeout.
	ReadHeaderTimeout time.Duration
}

// Accept implements net.Listener.
func (l *FramingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return l.wrap(c), nil
}

// wrap puts the framing check in front of c.
func (l *FramingListener) wrap(c net.Conn) *framingConn {
	max := l.MaxHeaderBytes
	if max <= 0 {
		max = 1 << 20
	}
	return &framingConn{Conn: rawio.Wrap(c), maxHeader: max + 4096, headerTimeout: l.ReadHeaderTimeout}
}

// framingConn is not safe for concurrent Reads (net/http never does that);
// the verdict queue is shared with the handler goroutine and has its own lock.
type framingConn struct {
	net.Conn
	maxHeader int

	// Read side, owned by the goroutine calling Read.
	state framingState
	n     int64  // bytes left in the current body or chunk
	buf   []byte // bytes read from the wire
	r     int    // buf[r:rel] is checked and ready for net/http
	rel   int    // buf[rel:w] is not checked yet
	w     int
	scan  int   // in stHeader, where the search for the block's end resumes
	err   error // ErrBadFraming once the stream is dead for it

	started   bool // a first byte was seen: no HTTP/2 preface any more
	afterPOST bool // the last request was a POST (see process)

	mu       sync.Mutex // guards verdicts
	verdicts []Verdict

	// Read deadlines: the server's own (SetReadDeadline), and the header
	// clock of a block held part way (see ReadHeaderTimeout); the earlier
	// is in force. The server's are set from any goroutine (net/http
	// aborts its background read from the handler's).
	headerTimeout time.Duration
	dmu           sync.Mutex // guards the two below
	ownerRD       time.Time
	headerRD      time.Time

	// hijacked is set when the handler takes the connection over (CONNECT,
	// Upgrade): from then on bytes pass unchecked.
	hijacked atomic.Bool
	// badFraming is set when a body's framing was found malformed.
	badFraming atomic.Bool
	// bodyErr is the error a BodyReader on this connection last failed
	// with, and its request (see Cause).
	bodyErr atomic.Pointer[bodyFailure]
}

// CloseWrite half-closes the connection (tunnels and upgrades end one
// direction at a time).
func (c *framingConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Conn.Close()
}

// resume starts the check on a connection whose first bytes a reader
// other than Read took (the fast path, which parses and checks the blocks
// it serves itself): b are the bytes it read and did not consume, at the
// start of a header block, to be checked before anything else. started
// says whether bytes came before them (only a connection's first bytes
// can be HTTP/2's preface), afterPOST whether a POST's body ended right
// before them (up to four CR/LF bytes are dropped then).
func (c *framingConn) resume(b []byte, started, afterPOST bool) {
	c.buf = append(make([]byte, 0, max(len(b), 4096)), b...)
	c.buf = c.buf[:cap(c.buf)]
	c.r, c.rel, c.scan, c.w = 0, 0, 0, len(b)
	c.state, c.started, c.afterPOST = stHeader, started, afterPOST
}

func (c *framingConn) pushVerdict(v Verdict) {
	c.mu.Lock()
	c.verdicts = append(c.verdicts, v)
	c.mu.Unlock()
}

func (c *framingConn) takeVerdict() (Verdict, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.verdicts) == 0 {
		return Verdict{}, false
	}
	v := c.verdicts[0]
	// Shift in place: the queue keeps its array, so a connection's
	// verdicts cost no allocation after the first.
	n := copy(c.verdicts, c.verdicts[1:])
	c.verdicts[n] = Verdict{}
	c.verdicts = c.verdicts[:n]
	return v, true
}

func (c *framingConn) Read(p []byte) (int, error) {
	if c.state != stPassthrough && c.hijacked.Load() {
		c.state, c.rel = stPassthrough, c.w
	}
	for {
		if c.r < c.rel {
			n := copy(p, c.buf[c.r:c.rel])
			c.r += n
			c.headerClock(false)
			return n, nil
		}
		switch c.state {
		case stDead:
			if c.err != nil {
				return 0, c.err
			}
			// Nothing more is served on this connection, but an EOF here
			// would tell net/http the client left and cancel the request
			// in flight. Discard what the client sends until it closes or
			// net/http ends the read with a deadline.
			var discard [512]byte
			for {
				if _, err := c.Conn.Read(discard[:]); err != nil {
					return 0, err
				}
			}
		case stTunnel:
			// Until the handler takes the connection over, what the
			// client sends after the CONNECT is held; reads wait for it
			// (net/http aborts its background read before a hijack).
			if c.w-c.rel > maxTunnelHeld {
				return 0, errTunnelHeld
			}
			c.headerClock(false)
			if err := c.fill(); err != nil {
				return 0, err
			}
			if c.hijacked.Load() {
				c.state, c.rel = stPassthrough, c.w
			}
			continue
		case stPassthrough:
			if len(p) >= len(c.buf)/2 {
				return c.Conn.Read(p)
			}
			// Small reads are served from the buffer, filled by one read:
			// HTTP/2's server reads each frame's 9-byte header and then
			// its payload from the connection, two reads a frame without
			// it. An error that came with bytes comes again on the next
			// read (a connection's errors stay).
			n, err := c.Conn.Read(c.buf)
			if n == 0 {
				return 0, err
			}
			c.r, c.rel, c.w = 0, n, n
			continue
		case stBody, stChunkData:
			// Body bytes flow straight into the caller's buffer.
			if c.rel == c.w {
				if int64(len(p)) > c.n {
					p = p[:c.n]
				}
				n, err := c.Conn.Read(p)
				c.n -= int64(n)
				if c.n == 0 {
					c.endData()
				}
				return n, err
			}
		}
		if c.rel < c.w {
			c.process()
			if c.r < c.rel || c.state == stDead || c.state == stPassthrough {
				continue
			}
		}
		// Errors are not sticky: net/http aborts reads with past deadlines
		// and then reads on.
		c.headerClock(c.state == stHeader && c.rel < c.w)
		if err := c.fill(); err != nil {
			return 0, err
		}
	}
}

// SetReadDeadline implements net.Conn: the server's read deadline.
func (c *framingConn) SetReadDeadline(t time.Time) error {
	c.dmu.Lock()
	defer c.dmu.Unlock()
	c.ownerRD = t
	return c.applyRD()
}

// SetDeadline implements net.Conn.
func (c *framingConn) SetDeadline(t time.Time) error {
	if err := c.Conn.SetWriteDeadline(t); err != nil {
		return err
	}
	return c.SetReadDeadline(t)
}

// headerClock starts (on) or stops the header clock of a block held part
// way. It costs nothing for a block that comes in one read.
func (c *framingConn) headerClock(on bool) {
	if c.headerTimeout <= 0 {
		return
	}
	c.dmu.Lock()
	defer c.dmu.Unlock()
	switch {
	case on && c.headerRD.IsZero():
		c.headerRD = time.Now().Add(c.headerTimeout)
	case !on && !c.headerRD.IsZero():
		c.headerRD = time.Time{}
	default:
		return
	}
	_ = c.applyRD()
}

// applyRD puts the earlier of the two read deadlines in force; c.dmu held.
func (c *framingConn) applyRD() error {
	t := c.ownerRD
	if !c.headerRD.IsZero() && (t.IsZero() || c.headerRD.Before(t)) {
		t = c.headerRD
	}
	return c.Conn.SetReadDeadline(t)
}

// fill reads more bytes from the wire into buf, compacting or growing it.
func (c *framingConn) fill() error {
	if c.r == c.w {
		c.r, c.rel, c.w, c.scan = 0, 0, 0, 0
	}
	if c.w == len(c.buf) {
		if c.r > 0 {
			copy(c.buf, c.buf[c.r:c.w])
			c.rel -= c.r
			c.scan -= c.r
			c.w -= c.r
			c.r = 0
		}
		if c.w == len(c.buf) {
			size := 2 * len(c.buf)
			if size == 0 {
				size = 4096
			}
			nb := make([]byte, size)
			copy(nb, c.buf[:c.w])
			c.buf = nb
		}
	}
	n, err := readSome(c.Conn, c.buf[c.w:])
	c.w += n
	return err
}

// maxTunnelHeld bounds what a client may send after a CONNECT before its
// tunnel opens.
const maxTunnelHeld = 64 << 10

// errTunnelHeld ends a connection whose client sent more than
// maxTunnelHeld after a CONNECT before the tunnel opened.
var errTunnelHeld = errors.New("more than 64 KiB sent after a CONNECT before its tunnel opened")

// readSome reads into p: nil with n > 0 bytes, else the read's error
// (io.ErrNoProgress for a read that returned neither).
func readSome(r io.Reader, p []byte) (int, error) {
	n, err := r.Read(p)
	if n > 0 {
		return n, nil
	}
	if err == nil {
		err = io.ErrNoProgress
	}
	return 0, err
}

// process checks pending bytes buf[rel:w] and moves rel past what is ready,
// until it needs more bytes from the wire.
func (c *framingConn) process() {
	for c.rel < c.w {
		pending := c.buf[c.rel:c.w]
		switch c.state {
		case stHeader:
			if !c.started && bytes.HasPrefix(h2Preface, pending[:min(len(pending), len(h2Preface))]) {
				if len(pending) < len(h2Preface) {
					return
				}
				c.state = stPassthrough
				c.rel = c.w
				return
			}
			c.started = true
			// After a POST, net/http drops up to four CR/LF bytes that old
			// clients send after the body; so does the check, so that the
			// blocks (and their verdicts) stay in step.
			if c.afterPOST && c.rel == c.scan {
				k := 0
				for k < len(pending) && k < 4 && (pending[k] == '\r' || pending[k] == '\n') {
					k++
				}
				if k == len(pending) && k < 4 {
					return // more may follow; decide with them
				}
				c.afterPOST = false
				c.rel += k
				c.scan = c.rel
				continue
			}
			if c.rel == c.scan && !requestStart(pending[0]) {
				// Not HTTP (a TLS ClientHello, a binary protocol): handed
				// on as it is, for the server to refuse at once rather than
				// wait for a header block that never comes.
				c.state = stPassthrough
				c.rel = c.w
				return
			}
			end := c.headerEnd()
			if end < 0 {
				if c.w-c.rel > c.maxHeader {
					c.state = stPassthrough // net/http answers 431
					c.rel = c.w
				}
				return
			}
			c.checkHeader(end)
		case stBody, stChunkData:
			k := int(min(int64(len(pending)), c.n))
			c.rel += k
			c.n -= int64(k)
			if c.n == 0 {
				c.endData()
			}
		case stChunkLine, stTrailer:
			i := bytes.IndexByte(pending, '\n')
			if i < 0 {
				if len(pending) > 4096 {
					c.badBody()
				}
				return
			}
			line := pending[:i]
			if len(line) == 0 || line[len(line)-1] != '\r' {
				c.badBody() // bare LF
				return
			}
			line = line[:len(line)-1]
			if c.state == stTrailer {
				if len(line) > 0 && (line[0] == ' ' || line[0] == '\t') {
					c.badBody() // obs-fold, as in a header block
					return
				}
				if len(line) == 0 {
					c.state, c.scan = stHeader, c.rel+i+1
				}
			} else if size, ok := ParseChunkSize(line); !ok {
				c.badBody()
				return
			} else if size == 0 {
				c.state = stTrailer
			} else {
				c.state, c.n = stChunkData, size
			}
			c.rel += i + 1
		case stChunkCRLF:
			if len(pending) < 2 {
				return
			}
			if pending[0] != '\r' || pending[1] != '\n' {
				c.badBody()
				return
			}
			c.rel += 2
			c.state = stChunkLine
		default:
			return
		}
	}
}

func (c *framingConn) endData() {
	if c.state == stChunkData {
		c.state = stChunkCRLF
	} else {
		c.state, c.scan = stHeader, c.rel
	}
}

// badBody stops the stream inside a body: net/http gets ErrBadFraming once the
// bytes before the fault are consumed.
func (c *framingConn) badBody() {
	c.state = stDead
	c.w = c.rel
	c.err = ErrBadFraming
	c.badFraming.Store(true)
}

// headerEnd returns the index in buf just past the empty line that ends the
// header block starting at rel, or -1. Lines end with LF or CRLF, as
// net/textproto reads them.
func (c *framingConn) headerEnd() int {
	for {
		i := bytes.IndexByte(c.buf[c.scan:c.w], '\n')
		if i < 0 {
			return -1
		}
		nl := c.scan + i
		lineStart := c.scan
		c.scan = nl + 1
		// An empty line ends the block. As the first line it is an empty
		// request line, which net/http rejects: it is passed on as is.
		if line := c.buf[lineStart:nl]; len(line) == 0 || (len(line) == 1 && line[0] == '\r') {
			return nl + 1
		}
	}
}

// checkHeader judges the header block buf[rel:end] and sets the body state.
func (c *framingConn) checkHeader(end int) {
	block := c.buf[c.rel:end]
	f, reason := parseFraming(block)
	if reason != "" {
		c.pushVerdict(Verdict{Reason: reason})
		// Replace the block with the placeholder and end the stream after it.
		c.buf = append(c.buf[:c.rel], placeholder...)
		c.w = len(c.buf)
		c.rel = c.w
		c.buf = c.buf[:cap(c.buf)]
		c.state = stDead
		return
	}
	c.pushVerdict(Verdict{})
	c.afterPOST = f.post
	c.rel = end
	if f.connect {
		// What follows is the tunnel's, not HTTP: held, unjudged and
		// unchanged, never handed to net/http as a request; released as
		// it is once the handler takes the connection over (hijacked),
		// else never.
		c.state = stTunnel
		return
	}
	switch {
	case f.chunked:
		c.state = stChunkLine
	case f.length > 0:
		c.state, c.n = stBody, f.length
	default:
		c.scan = end
	}
}

type framing struct {
	chunked bool
	length  int64
	post    bool
	connect bool
}

// parseFraming reads the framing headers of one request header block. It
// returns a non-empty reason for a block that must not be served.
func parseFraming(block []byte) (framing, string) {
	var f framing
	var (
		clSeen bool
		teSeen bool
		http11 bool
	)
	first := true
	for len(block) > 0 {
		i := bytes.IndexByte(block, '\n')
		if i < 0 {
			break
		}
		line := bytes.TrimSuffix(block[:i], []byte{'\r'})
		block = block[i+1:]
		if first {
			first = false
			f.post = bytes.HasPrefix(line, []byte("POST "))
			f.connect = bytes.HasPrefix(line, []byte("CONNECT "))
			http11 = bytes.HasSuffix(line, []byte(" HTTP/1.1"))
			continue
		}
		if len(line) == 0 {
			break
		}
		// net/http folds a continuation line into the header before it; a
		// proxy must not forward folded headers (RFC 9112, 5.2).
		if line[0] == ' ' || line[0] == '\t' {
			return f, "obsolete line folding (obs-fold) in the header block"
		}
		colon := bytes.IndexByte(line, ':')
		if colon < 0 {
			return f, "header line without a colon"
		}
		// Only SP and HTAB are whitespace around a value (RFC 9110, 5.5),
		// as net/textproto trims: "\vchunked" is not "chunked".
		name, value := line[:colon], bytes.Trim(line[colon+1:], " \t")
		if !isToken(name) {
			return f, "invalid header name " + quote(name)
		}
		switch {
		case ascii.EqualFold(name, "content-length"):
			n, ok := parseDecimal(value)
			if !ok {
				return f, "invalid Content-Length"
			}
			if clSeen && n != f.length {
				return f, "conflicting Content-Length headers"
			}
			clSeen, f.length = true, n
		case ascii.EqualFold(name, "transfer-encoding"):
			if teSeen {
				return f, "more than one Transfer-Encoding header"
			}
			teSeen = true
			if !ascii.EqualFold(value, "chunked") {
				return f, "unsupported Transfer-Encoding " + quote(value)
			}
			f.chunked = true
		case lookalike(name, "content-length"), lookalike(name, "transfer-encoding"):
			// Content_Length, Transfer_Encoding: framing to an upstream
			// that maps '_' to '-' (CGI, WSGI), nothing to this check.
			return f, "header name " + quote(name) + " with '_' for '-' in a framing header"
		}
	}
	if clSeen && teSeen {
		return f, "both Content-Length and Transfer-Encoding"
	}
	// A CONNECT has no content (RFC 9110, 9.3.6): bytes after its header
	// block are the tunnel's, which a body would have net/http read as
	// the request's and the tunnel as its own.
	if f.connect && (teSeen || f.length > 0) {
		return f, "a CONNECT request with content"
	}
	// net/http ignores Transfer-Encoding before HTTP/1.1 and would read
	// the body as the next request; RFC 9112 6.1 says reject it.
	if teSeen && !http11 {
		return f, "Transfer-Encoding in a request older than HTTP/1.1"
	}
	return f, ""
}

// isToken reports whether b is a token (RFC 9110, 5.6.2): a header name
// (no spaces, no separators, so "Transfer-Encoding :" can't slip past as
// another name) or a method (net/http's HTTP/1 server checks methods, its
// HTTP/2 server does not, and a method with a space would become another
// request line upstream).
func isToken[T string | []byte](b T) bool {
	if len(b) == 0 {
		return false
	}
	for i := range len(b) {
		if !httpguts.IsTokenRune(rune(b[i])) {
			return false
		}
	}
	return true
}

func parseDecimal(b []byte) (int64, bool) {
	if len(b) == 0 || len(b) > 18 {
		return 0, false
	}
	var n int64
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + int64(c-'0')
	}
	return n, true
}

// ParseChunkSize parses a chunk-size line without its line end,
// "HEX[;ext]", as net/http's chunked reader does.
func ParseChunkSize(line []byte) (int64, bool) {
	line = bytes.TrimRight(line, " \t")
	if i := bytes.IndexByte(line, ';'); i >= 0 {
		line = line[:i]
	}
	if len(line) == 0 || len(line) > 16 {
		return 0, false
	}
	var n int64
	for _, c := range line {
		var d byte
		switch {
		case '0' <= c && c <= '9':
			d = c - '0'
		case 'a' <= c && c <= 'f':
			d = c - 'a' + 10
		case 'A' <= c && c <= 'F':
			d = c - 'A' + 10
		default:
			return 0, false
		}
		n = n<<4 | int64(d)
	}
	if n < 0 {
		return 0, false
	}
	return n, true
}

// lookalike reports whether b is s (lower-case, with '-') spelled with at
// least one '_' for a '-', in any case.
func lookalike[T string | []byte](b T, s string) bool {
	if len(b) != len(s) {
		return false
	}
	underscore := false
	for i := range len(b) {
		c := b[i]
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		switch {
		case c == s[i]:
		case c == '_' && s[i] == '-':
			underscore = true
		default:
			return false
		}
	}
	return underscore
}

func quote(b []byte) string {
	if len(b) > 32 {
		b = b[:32]
	}
	return `"` + string(bytes.ToValidUTF8(b, []byte("?"))) + `"`
}

type connKey struct{}

// ConnContext stores the connection in the request context so the handler
// can take its verdict. Set it as http.Server.ConnContext.
func ConnContext(ctx context.Context, c net.Conn) context.Context {
	if fc, ok := c.(*framingConn); ok {
		ctx = context.WithValue(ctx, connKey{}, fc)
		c = fc.Conn
	}
	return withOriginalDst(ctx, c)
}

// PeerTLS returns the TLS state of the connection r came on (a ListenTLS
// listener's), nil for a plaintext one.
func PeerTLS(r *http.Request) *tls.ConnectionState {
	fc, ok := r.Context().Value(connKey{}).(*framingConn)
	if !ok {
		return nil
	}
	tc, ok := fc.Conn.(*tls.Conn)
	if !ok {
		return nil
	}
	cs := tc.ConnectionState()
	return &cs
}

// TakeVerdict returns the framing verdict of r, the request being served on
// its connection. It returns the zero Verdict (a pass) for connections the
// check does not cover, such as HTTP/2. The placeholder of a rejected block
// is rejected by its Host too, whatever the queue says. Call it exactly
// once per request, first thing in the handler.
func TakeVerdict(r *http.Request) Verdict {
	var v Verdict
	if fc, ok := r.Context().Value(connKey{}).(*framingConn); ok {
		v, _ = fc.takeVerdict() // none for HTTP/2 and unchecked connections
	}
	if v.Reason == "" && r.Host == placeholderHost {
		v.Reason = "malformed request"
	}
	if v.Reason == "" && r.ProtoMajor == 2 {
		v.Reason = h2Malformed(r)
	}
	if v.Reason == "" {
		v.Reason = underscoredLookalike(r.Header)
	}
	return v
}

// guardedHeaders are the framing, hop-by-hop and forwarding headers whose
// names an upstream that maps '_' to '-' (CGI, WSGI, PHP) would read from
// a look-alike: "Transfer_Encoding" becomes framing there, "X_Forwarded_For"
// a client address. Envoy's headers_with_underscores_action can reject
// every such name; these are the ones that matter to a proxy.
var guardedHeaders = []string{"content-length", "transfer-encoding", "keep-alive", "proxy-connection",
	"proxy-authenticate", "proxy-authorization", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto"}

// underscoredLookalike says which header of h spells a guarded header with
// '_' for '-', or "".
func underscoredLookalike(h http.Header) string {
	for name := range h {
		if strings.IndexByte(name, '_') < 0 {
			continue
		}
		for _, g := range guardedHeaders {
			if lookalike(name, g) {
				return "header name " + quote([]byte(name)) + " with '_' for '-' in a framing, hop-by-hop or forwarding header"
			}
		}
	}
	return ""
}

// h2Malformed says why an HTTP/2 request's header fields make it malformed
// (RFC 9113, 8.2.2): connection-specific fields, or TE other than
// "trailers". net/http's HTTP/2 server lets them through; a proxy must not
// forward them. "" when the fields are fine.
func h2Malformed(r *http.Request) string {
	if !isToken(r.Method) {
		return "method " + quote([]byte(r.Method)) + " is not a token"
	}
	if !httpguts.ValidHostHeader(r.Host) {
		return ":authority " + quote([]byte(r.Host)) + " is not a valid host"
	}
	h := r.Header
	for _, name := range []string{"Connection", "Keep-Alive", "Proxy-Connection", "Transfer-Encoding", "Upgrade"} {
		if _, ok := h[name]; ok {
			return "connection-specific header field " + name + " in an HTTP/2 request"
		}
	}
	if te, ok := h["Te"]; ok && (len(te) != 1 || !strings.EqualFold(strings.TrimSpace(te[0]), "trailers")) {
		return "TE other than \"trailers\" in an HTTP/2 request"
	}
	if r.Method != http.MethodConnect {
		if reason := badPath(r.Method, r.RequestURI); reason != "" {
			return reason
		}
	}
	return ""
}

// badPath says why an HTTP/2 request's :path cannot be a request-target
// (RFC 9113, 8.3.1; RFC 9112, 3.2), or "": net/http's HTTP/2 server takes
// its query as written, so ":path /public?x /admin HTTP/1.1" would reach an
// HTTP/1.1 app as a request line of its own making. A space, a control
// byte, a byte past ASCII or a fragment has no place in one; "*" only for
// OPTIONS; anything else starts with "/".
func badPath(method, path string) string {
	if path == "*" {
		if method == http.MethodOptions {
			return ""
		}
		return ":path \"*\" in a request other than OPTIONS"
	}
	if !strings.HasPrefix(path, "/") {
		return ":path " + quote([]byte(path)) + " does not start with \"/\""
	}
	for i := 0; i < len(path); i++ {
		if c := path[i]; c <= ' ' || c >= 0x7f || c == '#' {
			return ":path " + quote([]byte(path)) + " holds a byte a request-target may not (space, control, non-ASCII or '#')"
		}
	}
	return ""
}

// HijackAware returns w wrapped so that when the handler hijacks the
// connection (for a CONNECT tunnel or a protocol upgrade) the framing check
// steps aside and the bytes that follow pass unchecked.
func HijackAware(w http.ResponseWriter, r *http.Request) http.ResponseWriter {
	fc, ok := r.Context().Value(connKey{}).(*framingConn)
	if !ok {
		return w
	}
	return &hijackWriter{ResponseWriter: w, fc: fc}
}

type hijackWriter struct {
	http.ResponseWriter
	fc *framingConn
}

func (h *hijackWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	c, brw, err := http.NewResponseController(h.ResponseWriter).Hijack()
	if err == nil {
		h.fc.hijacked.Store(true)
	}
	return c, brw, err
}

func (h *hijackWriter) Flush()                      { _ = http.NewResponseController(h.ResponseWriter).Flush() }
func (h *hijackWriter) Unwrap() http.ResponseWriter { return h.ResponseWriter }
