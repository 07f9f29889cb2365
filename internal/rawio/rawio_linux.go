// Package rawio makes the reads and writes of a TCP connection raw syscalls,
// which leave the Go runtime's monitor thread asleep (see Wrap).
package rawio

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"unsafe"
)

// Why this file exists: every read and write of a net.TCPConn is a
// syscall made through the runtime's syscall entry, and the first one
// after the process went idle wakes the runtime's monitor thread (sysmon),
// which then polls every 20 µs for a millisecond or more. A sidecar at a
// few thousand requests per second goes idle between requests all the
// time: on a 2-core pod at 1000 requests per second that monitor was a
// third of the sidecar's CPU (see docs/benchmarks.md). The socket is
// non-blocking, so its reads and writes never block in the kernel: made as
// raw syscalls through the connection's RawConn, they leave the runtime's
// state alone, and the netpoller still parks the goroutine when a read
// finds nothing or a write finds the buffer full, with deadlines and
// Close working as before.

// rawTCPConn is a *net.TCPConn whose Read and Write are raw syscalls.
// Everything else (deadlines, Close, CloseWrite, SyscallConn, ReadFrom) is
// the TCPConn's. Safe for concurrent use as any net.Conn: one Read and one
// Write at a time each.
type rawTCPConn struct {
	*net.TCPConn
	rc syscall.RawConn

	rmu    sync.Mutex // guards the read state
	rbuf   []byte
	rn     int
	rerr   syscall.Errno
	readFn func(fd uintptr) bool
	peekFn func(fd uintptr) bool // idleAndEmpty's, made on first use
	peekOK bool

	wmu     sync.Mutex // guards the write state
	wbuf    []byte
	wn      int
	werr    syscall.Errno
	writeFn func(fd uintptr) bool
}

// Wrap returns c with raw-syscall reads and writes when it is a TCP
// connection, else c itself.
func Wrap(c net.Conn) net.Conn {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return c
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return c
	}
	r := &rawTCPConn{TCPConn: tc, rc: rc}
	r.readFn, r.writeFn = r.doRead, r.doWrite
	return r
}

func (c *rawTCPConn) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	c.rmu.Lock()
	defer c.rmu.Unlock()
	c.rbuf, c.rn, c.rerr = p, 0, 0
	err := c.rc.Read(c.readFn)
	n, errno := c.rn, c.rerr
	c.rbuf = nil
	switch {
	case err != nil:
		return 0, c.opError("read", err)
	case errno != 0:
		return 0, c.opError("read", os.NewSyscallError("read", errno))
	case n == 0:
		return 0, io.EOF
	}
	return n, nil
}

// doRead runs with the socket ready to read: false when it had nothing
// after all (wait again).
func (c *rawTCPConn) doRead(fd uintptr) bool {
	for {
		n, _, e := syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(&c.rbuf[0])), uintptr(len(c.rbuf)))
		switch e {
		case 0:
			c.rn = int(n)
			return true
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return false
		}
		c.rerr = e
		return true
	}
}

func (c *rawTCPConn) Write(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.wbuf, c.wn, c.werr = p, 0, 0
	for c.wn < len(p) {
		if err := c.rc.Write(c.writeFn); err != nil {
			n := c.wn
			c.wbuf = nil
			return n, c.opError("write", err)
		}
		if c.werr != 0 {
			n := c.wn
			c.wbuf = nil
			return n, c.opError("write", os.NewSyscallError("write", c.werr))
		}
	}
	n := c.wn
	c.wbuf = nil
	return n, nil
}

// doWrite runs with the socket ready to write: false when its buffer is
// full (wait, then write the rest).
func (c *rawTCPConn) doWrite(fd uintptr) bool {
	for c.wn < len(c.wbuf) {
		rest := c.wbuf[c.wn:]
		n, _, e := syscall.RawSyscall(syscall.SYS_WRITE, fd, uintptr(unsafe.Pointer(&rest[0])), uintptr(len(rest)))
		switch e {
		case 0:
			c.wn += int(n)
			continue
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return false
		}
		c.werr = e
		return true
	}
	return true
}

// opError words err as net.TCPConn does: an *net.OpError with the
// operation and addresses, around os.ErrDeadlineExceeded, net.ErrClosed or
// the syscall error.
func (c *rawTCPConn) opError(op string, err error) error {
	var oe *net.OpError
	if errors.As(err, &oe) {
		err = oe.Err // RawConn's "raw-read"/"raw-write" wrapping
	}
	return &net.OpError{Op: op, Net: "tcp", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: err}
}
