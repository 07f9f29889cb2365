//go:build linux

package main

import (
	"bytes"
	"errors"
	"fmt"
	"net"

	"golang.org/x/sys/unix"
)

// pair is one client connection and the upstream connection that serves
// it, with what is in flight between them.
type pair struct {
	cfd, ufd   int    // ufd -1: not dialled yet (or closed after an answer)
	cin        []byte // client bytes not yet forwarded: the next requests
	uout       []byte // bytes for the upstream not yet written
	cout       []byte // bytes for the client not yet written
	uin        []byte // the answer's head, read so far
	busy       bool   // a request is out, its answer not all forwarded
	body       bool   // the answer's head went out; left body bytes to come
	left       int64
	headReq    bool // the request out is HEAD: its answer has no body
	closing    bool // close the pair once cout is written
	upClose    bool // the answer said Connection: close
	wantOut    bool // EPOLLOUT is on for the client
	connecting bool
	held       bool // the upstream's EPOLLIN is off while cout drains
}

// loop is one event loop: a listener of its own and the connections it
// accepted, on one OS thread.
type loop struct {
	ep, lfd int
	up      unix.SockaddrInet4
	byFD    []*pair
	scratch []byte
	head    []byte // the head being built for the other side
}

func newLoop(listen, upstream *net.TCPAddr) (*loop, error) {
	l := &loop{scratch: make([]byte, 64<<10)}
	l.up.Port = upstream.Port
	copy(l.up.Addr[:], upstream.IP.To4())
	var err error
	if l.ep, err = unix.EpollCreate1(unix.EPOLL_CLOEXEC); err != nil {
		return nil, fmt.Errorf("epoll: %w", err)
	}
	if l.lfd, err = unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0); err != nil {
		return nil, err
	}
	_ = unix.SetsockoptInt(l.lfd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
	if err := unix.SetsockoptInt(l.lfd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); err != nil {
		return nil, fmt.Errorf("SO_REUSEPORT: %w", err)
	}
	sa := &unix.SockaddrInet4{Port: listen.Port}
	copy(sa.Addr[:], listen.IP.To4())
	if err := unix.Bind(l.lfd, sa); err != nil {
		return nil, fmt.Errorf("listen %v: %w", listen, err)
	}
	if err := unix.Listen(l.lfd, 4096); err != nil {
		return nil, err
	}
	return l, unix.EpollCtl(l.ep, unix.EPOLL_CTL_ADD, l.lfd, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(l.lfd)})
}

func (l *loop) run() error {
	events := make([]unix.EpollEvent, 256)
	for {
		n, err := unix.EpollWait(l.ep, events, -1)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return fmt.Errorf("epoll_wait: %w", err)
		}
		for _, ev := range events[:n] {
			fd := int(ev.Fd)
			if fd == l.lfd {
				l.accept()
				continue
			}
			if fd >= len(l.byFD) || l.byFD[fd] == nil {
				continue // closed by an earlier event of this batch
			}
			p := l.byFD[fd]
			if fd == p.cfd {
				l.clientEvent(p, ev.Events)
			} else {
				l.upstreamEvent(p, ev.Events)
			}
		}
	}
}

func (l *loop) track(fd int, p *pair) {
	for fd >= len(l.byFD) {
		l.byFD = append(l.byFD, nil)
	}
	l.byFD[fd] = p
}

func (l *loop) watch(op, fd int, events uint32) {
	_ = unix.EpollCtl(l.ep, op, fd, &unix.EpollEvent{Events: events, Fd: int32(fd)})
}

func (l *loop) accept() {
	for {
		fd, _, err := unix.Accept4(l.lfd, unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC)
		if err != nil {
			return // EAGAIN: all taken; anything else: the next event retries
		}
		_ = unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
		p := &pair{cfd: fd, ufd: -1}
		l.track(fd, p)
		l.watch(unix.EPOLL_CTL_ADD, fd, unix.EPOLLIN|unix.EPOLLRDHUP)
	}
}

// shut closes both connections of p.
func (l *loop) shut(p *pair) {
	for _, fd := range []int{p.cfd, p.ufd} {
		if fd >= 0 {
			l.byFD[fd] = nil
			_ = unix.Close(fd) // also leaves the epoll set
		}
	}
	p.cfd, p.ufd = -1, -1
}

// dropUpstream closes p's upstream connection; the next request dials anew.
func (l *loop) dropUpstream(p *pair) {
	if p.ufd >= 0 {
		l.byFD[p.ufd] = nil
		_ = unix.Close(p.ufd)
		p.ufd, p.uout, p.connecting, p.held = -1, p.uout[:0], false, false
	}
}

func (l *loop) clientEvent(p *pair, ev uint32) {
	if ev&unix.EPOLLOUT != 0 && !l.flushClient(p) {
		return
	}
	if ev&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) == 0 {
		return
	}
	n, err := unix.Read(p.cfd, l.scratch)
	if errors.Is(err, unix.EAGAIN) {
		return
	}
	if n <= 0 {
		l.shut(p) // the client left (a request in flight goes with it)
		return
	}
	p.cin = append(p.cin, l.scratch[:n]...)
	l.next(p)
}

// next sends the client's next request upstream, if one is whole and none
// is out.
func (l *loop) next(p *pair) {
	if p.busy || p.closing || len(p.cin) == 0 {
		return
	}
	end := bytes.Index(p.cin, []byte("\r\n\r\n"))
	if end < 0 && len(p.cin) <= maxHead {
		return
	}
	if end < 0 || end+4 > maxHead {
		l.refuse(p, "431 Request Header Fields Too Large")
		return
	}
	var h head
	var err error
	l.head, h, err = parseHead(l.head[:0], p.cin[:end+4], true)
	switch {
	case err != nil:
		l.refuse(p, "400 Bad Request")
		return
	case h.chunked || h.contentLength > 0 || h.upgrade:
		l.refuse(p, "501 Not Implemented") // the sidecar's other path's work
		return
	}
	p.cin = p.cin[:copy(p.cin, p.cin[end+4:])]
	p.busy, p.headReq, p.closing = true, string(h.method) == "HEAD", h.close
	if p.ufd < 0 && !l.dial(p) {
		l.refuse(p, "502 Bad Gateway")
		return
	}
	p.uout = append(p.uout, l.head...)
	if !p.connecting {
		l.flushUpstream(p)
	}
}

// refuse answers the client with status and closes it.
func (l *loop) refuse(p *pair, status string) {
	p.cout = append(p.cout, "HTTP/1.1 "+status+"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"...)
	p.closing, p.busy = true, false
	l.dropUpstream(p)
	l.flushClient(p)
}

func (l *loop) dial(p *pair) bool {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return false
	}
	_ = unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	err = unix.Connect(fd, &l.up)
	if err != nil && !errors.Is(err, unix.EINPROGRESS) {
		_ = unix.Close(fd)
		return false
	}
	p.ufd, p.connecting = fd, err != nil
	l.track(fd, p)
	ev := uint32(unix.EPOLLIN | unix.EPOLLRDHUP)
	if p.connecting {
		ev |= unix.EPOLLOUT
	}
	l.watch(unix.EPOLL_CTL_ADD, fd, ev)
	return true
}

// flushUpstream writes what is pending for the upstream.
func (l *loop) flushUpstream(p *pair) {
	n, err := unix.Write(p.ufd, p.uout)
	if err != nil && !errors.Is(err, unix.EAGAIN) {
		l.upstreamFailed(p)
		return
	}
	p.uout = p.uout[:copy(p.uout, p.uout[max(n, 0):])]
	ev := uint32(unix.EPOLLIN | unix.EPOLLRDHUP)
	if len(p.uout) > 0 {
		ev |= unix.EPOLLOUT
		l.watch(unix.EPOLL_CTL_MOD, p.ufd, ev)
	}
}

// upstreamFailed ends the request out: 502 if nothing of its answer went
// to the client yet, else the client's connection (its answer is cut).
func (l *loop) upstreamFailed(p *pair) {
	if p.busy && !p.body {
		l.refuse(p, "502 Bad Gateway")
		return
	}
	l.shut(p)
}

func (l *loop) upstreamEvent(p *pair, ev uint32) {
	if p.connecting && ev&(unix.EPOLLOUT|unix.EPOLLERR|unix.EPOLLHUP) != 0 {
		if e, err := unix.GetsockoptInt(p.ufd, unix.SOL_SOCKET, unix.SO_ERROR); err != nil || e != 0 {
			l.upstreamFailed(p)
			return
		}
		p.connecting = false
		l.watch(unix.EPOLL_CTL_MOD, p.ufd, unix.EPOLLIN|unix.EPOLLRDHUP)
	}
	if len(p.uout) > 0 && ev&unix.EPOLLOUT != 0 {
		l.watch(unix.EPOLL_CTL_MOD, p.ufd, unix.EPOLLIN|unix.EPOLLRDHUP)
		l.flushUpstream(p)
		if p.cfd < 0 {
			return
		}
	}
	if ev&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) == 0 || p.held {
		return
	}
	n, err := unix.Read(p.ufd, l.scratch)
	if errors.Is(err, unix.EAGAIN) {
		return
	}
	if n <= 0 {
		if p.busy {
			l.upstreamFailed(p)
		} else {
			l.dropUpstream(p) // an idle upstream connection closed
		}
		return
	}
	l.answer(p, l.scratch[:n])
}

// answer forwards bytes of the upstream's answer to the client.
func (l *loop) answer(p *pair, b []byte) {
	if !p.busy {
		l.dropUpstream(p) // bytes nobody asked for: never reuse it
		return
	}
	var out []byte // the answer's head to forward, when this read completed it
	if !p.body {
		end := -1
		if len(p.uin) == 0 {
			end = bytes.Index(b, []byte("\r\n\r\n")) // the whole head in one read: parsed where it lies
		}
		if end < 0 {
			p.uin = append(p.uin, b...)
			if end = bytes.Index(p.uin, []byte("\r\n\r\n")); end < 0 {
				if len(p.uin) > maxHead {
					l.upstreamFailed(p)
				}
				return
			}
			b = p.uin
		}
		if end+4 > maxHead {
			l.upstreamFailed(p)
			return
		}
		var h head
		var err error
		l.head, h, err = parseHead(l.head[:0], b[:end+4], false)
		switch {
		case err != nil || h.status < 200 || h.chunked:
			l.upstreamFailed(p) // interim answers and chunked bodies: the other path's
			return
		case p.headReq || h.status == 204 || h.status == 304:
			p.left = 0
		case h.contentLength < 0:
			l.upstreamFailed(p)
			return
		default:
			p.left = h.contentLength
		}
		p.body, p.upClose, out = true, h.close, l.head
		b = b[end+4:]
	}
	k := int(min(int64(len(b)), p.left))
	p.left -= int64(k)
	extra := len(b) > k // bytes past the answer's end
	switch {
	case out != nil:
		l.head = append(out, b[:k]...) // the head and what came of the body: one write
		l.sendClient(p, l.head)
	case k > 0:
		l.sendClient(p, b[:k])
	}
	if p.cfd < 0 {
		return
	}
	if p.left == 0 {
		p.busy, p.body, p.uin = false, false, p.uin[:0]
		if extra || p.upClose || p.closing {
			l.dropUpstream(p) // a byte past its answer: never reused
		}
		if p.closing && len(p.cout) == 0 {
			l.shut(p)
			return
		}
		l.next(p) // a pipelined request
	}
}

// sendClient writes b to the client, keeping what the socket does not
// take; while any is kept the upstream is not read (backpressure).
func (l *loop) sendClient(p *pair, b []byte) {
	if len(p.cout) == 0 {
		n, err := unix.Write(p.cfd, b)
		if err != nil && !errors.Is(err, unix.EAGAIN) {
			l.shut(p)
			return
		}
		b = b[max(n, 0):]
	}
	if len(b) == 0 {
		return
	}
	p.cout = append(p.cout, b...)
	p.wantOut = true
	l.watch(unix.EPOLL_CTL_MOD, p.cfd, unix.EPOLLIN|unix.EPOLLOUT|unix.EPOLLRDHUP)
	if p.ufd >= 0 && !p.held {
		p.held = true
		l.watch(unix.EPOLL_CTL_MOD, p.ufd, unix.EPOLLRDHUP)
	}
}

// flushClient writes what is pending for the client; false when the pair
// is gone.
func (l *loop) flushClient(p *pair) bool {
	if len(p.cout) > 0 {
		n, err := unix.Write(p.cfd, p.cout)
		if err != nil && !errors.Is(err, unix.EAGAIN) {
			l.shut(p)
			return false
		}
		p.cout = p.cout[:copy(p.cout, p.cout[max(n, 0):])]
		if len(p.cout) > 0 {
			if !p.wantOut {
				p.wantOut = true
				l.watch(unix.EPOLL_CTL_MOD, p.cfd, unix.EPOLLIN|unix.EPOLLOUT|unix.EPOLLRDHUP)
			}
			return true
		}
	}
	if p.closing && !p.busy {
		l.shut(p)
		return false
	}
	if p.wantOut {
		p.wantOut = false
		l.watch(unix.EPOLL_CTL_MOD, p.cfd, unix.EPOLLIN|unix.EPOLLRDHUP)
	}
	if p.held && p.ufd >= 0 {
		p.held = false
		l.watch(unix.EPOLL_CTL_MOD, p.ufd, unix.EPOLLIN|unix.EPOLLRDHUP)
	}
	return true
}
