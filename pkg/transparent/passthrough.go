package transparent

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"sync"
)

var copyBufs = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

// passthrough connects to dst and splices c to it both ways, head (the
// bytes sniffed) first. Each direction ends on its own (half-close), so a
// protocol where one side finishes sending first works; an error in either
// direction ends both.
func (l *Listener) passthrough(c net.Conn, head []byte, dst netip.AddrPort) {
	if l.cfg.AllowTCP != nil && !l.cfg.AllowTCP(l.ctx, dst) {
		l.obs.Refused(RefusedNotAllowed)
		l.log.Debug("refused TCP passthrough to a destination not allowed", "destination", dst.String())
		reset(c)
		return
	}
	ctx, cancel := context.WithTimeout(l.ctx, l.cfg.ConnectTimeout)
	up, err := l.cfg.Dial(ctx, "tcp", dst.String())
	cancel()
	if err != nil {
		l.obs.Refused(RefusedConnectFailure)
		l.log.Debug("TCP passthrough: cannot connect to the original destination", "destination", dst.String(), "err", err)
		reset(c)
		return
	}
	if !l.track(c, up) {
		_ = c.Close()
		_ = up.Close()
		return
	}
	defer l.untrack(c, up)
	l.obs.PassthroughOpened()
	defer l.obs.PassthroughClosed()

	done := make(chan struct{})
	go func() {
		defer close(done)
		l.pipe(up, c, head, DirectionSent)
	}()
	l.pipe(c, up, nil, DirectionReceived)
	<-done
	_ = c.Close()
	_ = up.Close()
}

// pipe copies head and then src to dst until src ends, then half-closes
// dst. On any other error it closes both, so that the other direction ends
// too.
func (l *Listener) pipe(dst, src net.Conn, head []byte, direction string) {
	abort := func() {
		_ = src.Close()
		_ = dst.Close()
	}
	if len(head) > 0 {
		n, err := dst.Write(head)
		l.obs.Bytes(direction, n)
		if err != nil {
			abort()
			return
		}
	}
	bp := copyBufs.Get().(*[]byte)
	defer copyBufs.Put(bp)
	buf := *bp
	for {
		n, rerr := src.Read(buf)
		if n > 0 {
			w, werr := dst.Write(buf[:n])
			l.obs.Bytes(direction, w)
			if werr != nil {
				abort()
				return
			}
		}
		if errors.Is(rerr, io.EOF) {
			if cw, ok := dst.(interface{ CloseWrite() error }); ok {
				_ = cw.CloseWrite()
			} else {
				_ = dst.Close()
			}
			return
		}
		if rerr != nil {
			abort()
			return
		}
	}
}
