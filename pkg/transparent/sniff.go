package transparent

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"time"
)

// verdict is what the first bytes of a connection say about its protocol.
type verdict uint8

const (
	undecided verdict = iota
	isHTTP            // an HTTP/1.x request line, or the HTTP/2 preface
	notHTTP           // a byte no HTTP/1.x request line or HTTP/2 preface has there
)

var h2Preface = []byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")

// maxMethod bounds a request method; longer tokens are not HTTP.
const maxMethod = 32

// classify judges b, the first bytes of a connection. It decides as soon as
// one byte breaks the grammar of "METHOD SP TARGET SP HTTP/1.D CRLF" (and is
// not the HTTP/2 preface either), and says HTTP only once that whole line has
// arrived. sawMethod reports "METHOD SP" complete, for a sniff that times out
// before the line ends.
func classify(b []byte) (v verdict, sawMethod bool) {
	if len(b) == 0 {
		return undecided, false
	}
	if n := min(len(b), len(h2Preface)); bytes.Equal(b[:n], h2Preface[:n]) {
		if n == len(h2Preface) {
			return isHTTP, true
		}
		return undecided, n > len("PRI ")
	}
	i := 0
	for i < len(b) && isTokenChar(b[i]) {
		i++
	}
	if i == len(b) {
		if i > maxMethod {
			return notHTTP, false
		}
		return undecided, false
	}
	if i == 0 || i > maxMethod || b[i] != ' ' {
		return notHTTP, false
	}
	i++
	start := i
	for i < len(b) && b[i] > ' ' && b[i] != 0x7f {
		i++
	}
	if i == len(b) {
		return undecided, true
	}
	if i == start || b[i] != ' ' {
		return notHTTP, true
	}
	i++
	const version = "HTTP/1."
	for j := 0; j < len(version); j, i = j+1, i+1 {
		if i == len(b) {
			return undecided, true
		}
		if b[i] != version[j] {
			return notHTTP, true
		}
	}
	if i == len(b) {
		return undecided, true
	}
	if b[i] < '0' || b[i] > '9' {
		return notHTTP, true
	}
	i++
	if i == len(b) {
		return undecided, true
	}
	switch {
	case b[i] == '\n':
		return isHTTP, true
	case b[i] == '\r' && i+1 == len(b):
		return undecided, true
	case b[i] == '\r' && b[i+1] == '\n':
		return isHTTP, true
	}
	return notHTTP, true
}

// isTokenChar reports whether c may appear in an HTTP token (RFC 9110, 5.6.2).
func isTokenChar(c byte) bool {
	switch {
	case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		return true
	}
	return bytes.IndexByte([]byte("!#$%&'*+-.^_`|~"), c) >= 0
}

// sniff reads the first bytes of c until classify decides, maxBytes have
// arrived, the peer stops sending or timeout passes, and returns whether
// the connection speaks HTTP and the bytes read (which the caller must hand
// on). Nothing within the timeout (a server-speaks-first protocol such as
// SMTP or MySQL) is not HTTP; neither is a token without a space after it
// when the time is up. A request line still arriving when the time is up,
// or longer than maxBytes, is HTTP: net/http judges the rest.
func sniff(c net.Conn, timeout time.Duration, maxBytes int) (http bool, head []byte, err error) {
	if err := c.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		return false, nil, err
	}
	defer func() {
		if err == nil {
			err = c.SetReadDeadline(time.Time{})
		}
	}()
	buf := make([]byte, 0, 512)
	for {
		if len(buf) == cap(buf) {
			buf = append(buf, 0)[:len(buf)]
		}
		n, rerr := c.Read(buf[len(buf):min(cap(buf), maxBytes)])
		buf = buf[:len(buf)+n]
		v, sawMethod := classify(buf)
		switch {
		case v == isHTTP:
			return true, buf, nil
		case v == notHTTP:
			return false, buf, nil
		case len(buf) >= maxBytes:
			return sawMethod, buf, nil
		}
		if rerr == nil {
			continue
		}
		if errors.Is(rerr, os.ErrDeadlineExceeded) {
			return sawMethod, buf, nil
		}
		if errors.Is(rerr, io.EOF) {
			// The app half-closed before a whole request line: whatever
			// it is, the destination gets it as sent.
			return false, buf, nil
		}
		return false, buf, rerr
	}
}
