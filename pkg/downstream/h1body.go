package downstream

// The request body of the fast path, framed by Content-Length.

import (
	"io"
	"net/http"
	"sync"
	"sync/atomic"
)

// h1Body is a request body framed by Content-Length, as net/http's body.
type h1Body struct {
	c       *h1Conn
	mu      sync.Mutex // guards the fields below: Close may race a Read
	remain  int64
	sawEOF  bool
	closed  bool
	closing bool // the request asked to close the connection
	early   bool // closed with more than maxPostHandlerReadBytes unread
	onEOF   func()
	// eof mirrors sawEOF for the watch timer, which must not take mu:
	// onEOF runs under mu and takes the connection's bgMu.
	eof atomic.Bool
}

func (b *h1Body) Read(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return 0, http.ErrBodyReadAfterClose
	}
	return b.readLocked(p)
}

func (b *h1Body) readLocked(p []byte) (int, error) {
	if b.sawEOF {
		return 0, io.EOF
	}
	if b.remain <= 0 {
		b.hitEOF()
		return 0, io.EOF
	}
	if int64(len(p)) > b.remain {
		p = p[:b.remain]
	}
	n, err := b.c.readBody(p)
	b.remain -= int64(n)
	if err == io.EOF {
		b.sawEOF = true
		if b.remain > 0 {
			err = io.ErrUnexpectedEOF
		}
	}
	if err == nil && n > 0 && b.remain == 0 {
		err = io.EOF
		b.sawEOF = true
	}
	if b.sawEOF {
		b.eof.Store(true)
		if b.onEOF != nil {
			b.onEOF()
		}
	}
	return n, err
}

func (b *h1Body) hitEOF() {
	b.sawEOF = true
	b.eof.Store(true)
	if b.onEOF != nil {
		b.onEOF()
	}
}

func (b *h1Body) eofSeen() bool { return b.eof.Load() }

type lockedBody struct{ b *h1Body }

func (l lockedBody) Read(p []byte) (int, error) { return l.b.readLocked(p) }

func (b *h1Body) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return nil
	}
	var err error
	switch {
	case b.sawEOF:
	case b.closing:
		// The connection closes next: no point reading on.
	case b.remain > maxPostHandlerReadBytes:
		b.early = true
	default:
		var n int64
		n, err = io.CopyN(io.Discard, lockedBody{b}, maxPostHandlerReadBytes)
		if err == io.EOF {
			err = nil
		}
		if n == maxPostHandlerReadBytes {
			b.early = true
		}
	}
	b.closed = true
	return err
}

func (b *h1Body) didEarlyClose() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.early
}
