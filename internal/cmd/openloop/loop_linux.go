//go:build linux

package main

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"runtime"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// conn is one keep-alive connection of the pool.
type conn struct {
	fd   int // -1 when closed
	busy bool
	due  int64  // scheduled time of the request in flight (monotonic ns)
	sent int64  // when it was written
	buf  []byte // response bytes read so far
}

// engine is one epoll loop over its share of the connections and of the
// schedule. Each runs on a locked OS thread of its own.
type engine struct {
	c       *config
	sa      unix.Sockaddr
	req     []byte
	ep, tfd int
	conns   []*conn
	byFD    map[int]*conn
	idle    []*conn
	rec     *recorder
	busy    int
}

func monotonic() int64 {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return ts.Nano()
}

func attack(c config) (*Result, error) {
	tcp, err := net.ResolveTCPAddr("tcp", c.addr)
	if err != nil {
		return nil, err
	}
	var sa unix.Sockaddr
	if ip4 := tcp.IP.To4(); ip4 != nil {
		s4 := &unix.SockaddrInet4{Port: tcp.Port}
		copy(s4.Addr[:], ip4)
		sa = s4
	} else {
		s6 := &unix.SockaddrInet6{Port: tcp.Port}
		copy(s6.Addr[:], tcp.IP.To16())
		sa = s6
	}
	total := int64(c.rate * c.duration.Seconds())
	threads := min(c.threads, c.conns)
	req := []byte("GET " + c.path + " HTTP/1.1\r\nHost: " + c.host + "\r\nUser-Agent: openloop\r\n\r\n")
	engines := make([]*engine, threads)
	for k := range engines {
		e := &engine{c: &c, sa: sa, req: req, byFD: map[int]*conn{}, ep: -1, tfd: -1,
			rec: newRecorder(total/int64(threads) + 1)}
		engines[k] = e
		defer e.shut()
		// Connect up front: the schedule measures requests, not handshakes.
		if err := e.open(c.conns/threads + boolInt(k < c.conns%threads)); err != nil {
			return nil, fmt.Errorf("connecting to %s: %w", c.addr, err)
		}
	}
	start := monotonic() + 20e6
	var wg sync.WaitGroup
	for k, e := range engines {
		wg.Add(1)
		go func() {
			defer wg.Done()
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			e.loop(start, int64(k), int64(threads), total)
		}()
	}
	wg.Wait()
	elapsed := time.Duration(monotonic() - start)
	rec := engines[0].rec
	for _, e := range engines[1:] {
		rec.merge(e.rec)
	}
	return summarize(c, total, rec, elapsed), nil
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// open sets up the engine's epoll set, timer and n connections.
func (e *engine) open(n int) error {
	var err error
	if e.ep, err = unix.EpollCreate1(unix.EPOLL_CLOEXEC); err != nil {
		return fmt.Errorf("epoll: %w", err)
	}
	if e.tfd, err = unix.TimerfdCreate(unix.CLOCK_MONOTONIC, unix.TFD_NONBLOCK|unix.TFD_CLOEXEC); err != nil {
		return fmt.Errorf("timerfd: %w", err)
	}
	if err := unix.EpollCtl(e.ep, unix.EPOLL_CTL_ADD, e.tfd, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(e.tfd)}); err != nil {
		return err
	}
	for range n {
		cn := &conn{fd: -1, buf: make([]byte, 0, 4096)}
		if err := e.dial(cn); err != nil {
			return err
		}
		e.conns = append(e.conns, cn)
		e.idle = append(e.idle, cn)
	}
	return nil
}

// shut closes everything open closed.
func (e *engine) shut() {
	for _, cn := range e.conns {
		e.close(cn)
	}
	for _, fd := range []int{e.tfd, e.ep} {
		if fd >= 0 {
			_ = unix.Close(fd)
		}
	}
}

func (e *engine) dial(cn *conn) error {
	domain := unix.AF_INET
	if _, ok := e.sa.(*unix.SockaddrInet6); ok {
		domain = unix.AF_INET6
	}
	fd, err := unix.Socket(domain, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	_ = unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	// A blocking connect: on loopback it is immediate.
	if err := unix.Connect(fd, e.sa); err != nil {
		unix.Close(fd)
		return err
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return err
	}
	if err := unix.EpollCtl(e.ep, unix.EPOLL_CTL_ADD, fd, &unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLRDHUP, Fd: int32(fd)}); err != nil {
		unix.Close(fd)
		return err
	}
	cn.fd = fd
	cn.buf = cn.buf[:0]
	e.byFD[fd] = cn
	return nil
}

func (e *engine) close(cn *conn) {
	if cn.fd < 0 {
		return
	}
	delete(e.byFD, cn.fd)
	_ = unix.Close(cn.fd) // also leaves the epoll set
	cn.fd = -1
	cn.buf = cn.buf[:0]
}

// finish ends the request in flight on cn and gives the connection back.
func (e *engine) finish(cn *conn) {
	cn.busy = false
	e.busy--
	e.idle = append(e.idle, cn)
}

// fail ends the request in flight on cn with an error and closes cn; it is
// dialed again when next needed.
func (e *engine) fail(cn *conn, kind string) {
	e.rec.failed(kind)
	e.close(cn)
	e.finish(cn)
}

// send writes the request due at due on an idle connection.
func (e *engine) send(due int64) {
	cn := e.idle[len(e.idle)-1]
	e.idle = e.idle[:len(e.idle)-1]
	cn.busy, cn.due = true, due
	e.busy++
	now := monotonic()
	cn.sent = now
	e.rec.sentAt(now - due)
	if cn.fd < 0 {
		if err := e.dial(cn); err != nil {
			e.fail(cn, "connect")
			return
		}
	}
	// The request is tiny and the socket idle: it goes out whole.
	n, err := unix.Write(cn.fd, e.req)
	if err != nil || n != len(e.req) {
		e.fail(cn, "write")
	}
}

// loop serves the requests first, first+step, first+2*step... of the
// schedule that begins at start, until all are answered or failed.
func (e *engine) loop(start, first, step, total int64) {
	period := 1e9 / e.c.rate
	due := func(n int64) int64 { return start + int64(float64(n)*period) }
	timeout := e.c.timeout.Nanoseconds()
	events := make([]unix.EpollEvent, 256)
	next := first // the next request to send
	armed := int64(-1)
	lastScan := start
	for {
		now := monotonic()
		for next < total && len(e.idle) > 0 && due(next) <= now {
			e.send(due(next))
			next += step
		}
		if next >= total && e.busy == 0 {
			return
		}
		// Wake at the next send time, if a connection is free for it.
		if next < total && len(e.idle) > 0 && armed != due(next) {
			armed = due(next)
			spec := unix.ItimerSpec{Value: unix.NsecToTimespec(armed)}
			_ = unix.TimerfdSettime(e.tfd, unix.TFD_TIMER_ABSTIME, &spec, nil)
		}
		if now-lastScan > 100e6 {
			lastScan = now
			for _, cn := range e.conns {
				if cn.busy && now-cn.sent > timeout {
					e.fail(cn, "timeout")
				}
			}
		}
		n, err := unix.EpollWait(e.ep, events, 100)
		if err != nil && !errors.Is(err, unix.EINTR) {
			panic(fmt.Sprintf("openloop: epoll_wait: %v", err))
		}
		for _, ev := range events[:max(n, 0)] {
			fd := int(ev.Fd)
			if fd == e.tfd {
				var b [8]byte
				_, _ = unix.Read(e.tfd, b[:])
				continue
			}
			if cn := e.byFD[fd]; cn != nil {
				e.readable(cn)
			}
		}
	}
}

// readable reads what arrived on cn and completes its response if whole.
func (e *engine) readable(cn *conn) {
	for {
		if len(cn.buf) == cap(cn.buf) {
			cn.buf = append(cn.buf, make([]byte, cap(cn.buf))...)[:len(cn.buf)]
		}
		k, err := unix.Read(cn.fd, cn.buf[len(cn.buf):cap(cn.buf)])
		if errors.Is(err, unix.EAGAIN) {
			break
		}
		if err != nil || k == 0 {
			if cn.busy {
				e.fail(cn, "closed")
			} else {
				e.close(cn) // the server closed an idle connection
			}
			return
		}
		cn.buf = cn.buf[:len(cn.buf)+k]
		if len(cn.buf) < cap(cn.buf) {
			break // drained; level-triggered epoll says if more comes
		}
	}
	if !cn.busy {
		e.close(cn) // bytes nobody asked for
		return
	}
	status, reason, size, closeConn, err := parseResponse(cn.buf)
	switch {
	case err != nil:
		e.fail(cn, "protocol")
		return
	case size == 0:
		return // incomplete
	}
	e.rec.answer(monotonic()-cn.due, status, reason)
	rest := copy(cn.buf, cn.buf[size:])
	cn.buf = cn.buf[:rest]
	if closeConn || rest > 0 {
		e.close(cn)
	}
	e.finish(cn)
}

var errMalformed = errors.New("malformed response")

// parseResponse frames the response at the start of b: its status, the
// x-sidecar-error value, its length (0 while incomplete) and whether the
// server closes the connection after it.
func parseResponse(b []byte) (status int, reason string, size int, closeConn bool, err error) {
	end := bytes.Index(b, []byte("\r\n\r\n"))
	if end < 0 {
		if len(b) > 64<<10 {
			return 0, "", 0, false, errMalformed
		}
		return 0, "", 0, false, nil
	}
	head := b[:end]
	line, rest, _ := bytes.Cut(head, []byte("\r\n"))
	if len(line) < 12 || !bytes.HasPrefix(line, []byte("HTTP/1.")) {
		return 0, "", 0, false, errMalformed
	}
	if status, err = strconv.Atoi(string(line[9:12])); err != nil {
		return 0, "", 0, false, errMalformed
	}
	closeConn = line[7] == '0'
	length, chunked := -1, false
	for len(rest) > 0 {
		var h []byte
		h, rest, _ = bytes.Cut(rest, []byte("\r\n"))
		name, value, ok := bytes.Cut(h, []byte(":"))
		if !ok {
			return 0, "", 0, false, errMalformed
		}
		value = bytes.TrimSpace(value)
		switch {
		case bytes.EqualFold(name, []byte("Content-Length")):
			if length, err = strconv.Atoi(string(value)); err != nil {
				return 0, "", 0, false, errMalformed
			}
		case bytes.EqualFold(name, []byte("Transfer-Encoding")):
			chunked = bytes.EqualFold(value, []byte("chunked"))
		case bytes.EqualFold(name, []byte("Connection")):
			closeConn = bytes.EqualFold(value, []byte("close"))
		case bytes.EqualFold(name, []byte("X-Sidecar-Error")):
			reason = string(value)
		}
	}
	body := end + 4
	switch {
	case status == 204 || status == 304 || status/100 == 1:
		return status, reason, body, closeConn, nil
	case chunked:
		n, ok, err := chunkedEnd(b, body)
		if err != nil || !ok {
			return 0, "", 0, false, err
		}
		return status, reason, n, closeConn, nil
	case length >= 0:
		if len(b) < body+length {
			return 0, "", 0, false, nil
		}
		return status, reason, body + length, closeConn, nil
	}
	return 0, "", 0, false, errMalformed // framed by close: not expected here
}

// chunkedEnd finds the end of a chunked body starting at b[i:].
func chunkedEnd(b []byte, i int) (int, bool, error) {
	for {
		eol := bytes.Index(b[i:], []byte("\r\n"))
		if eol < 0 {
			return 0, false, nil
		}
		line := b[i : i+eol]
		if j := bytes.IndexByte(line, ';'); j >= 0 {
			line = line[:j]
		}
		size, err := strconv.ParseInt(string(bytes.TrimSpace(line)), 16, 64)
		if err != nil || size < 0 {
			return 0, false, errMalformed
		}
		i += eol + 2
		if size == 0 {
			for { // trailer lines up to the empty one
				eol := bytes.Index(b[i:], []byte("\r\n"))
				if eol < 0 {
					return 0, false, nil
				}
				i += eol + 2
				if eol == 0 {
					return i, true, nil
				}
			}
		}
		if int64(len(b)-i) < size+2 {
			return 0, false, nil
		}
		i += int(size) + 2
	}
}
