package rawio

import (
	"net"
	"syscall"
	"unsafe"
)

// Alive reports whether a pooled connection may carry the next request:
// the peer has not closed it, and it holds no byte nobody asked for (a
// server's 408 before closing, a body longer than its Content-Length, a
// body to a HEAD, an unsolicited response). One non-blocking MSG_PEEK
// recv, no goroutine per idle connection.
func Alive(c net.Conn) bool {
	if rc, ok := c.(*rawTCPConn); ok {
		return rc.idleAndEmpty()
	}
	if tc, ok := c.(interface{ NetConn() net.Conn }); ok {
		// A TLS connection (the mesh's): a record that came while it was
		// idle is an answer nobody asked for, or the peer closing; either
		// way it must not carry the next request.
		return Alive(tc.NetConn())
	}
	sc, ok := c.(syscall.Conn)
	if !ok {
		return true
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	alive := true
	err = rc.Read(func(fd uintptr) bool {
		alive = peekNothing(fd)
		return true
	})
	return err == nil && alive
}

// idleAndEmpty is Alive for a raw connection, without an allocation.
func (c *rawTCPConn) idleAndEmpty() bool {
	c.rmu.Lock()
	defer c.rmu.Unlock()
	if c.peekFn == nil {
		c.peekFn = func(fd uintptr) bool { c.peekOK = peekNothing(fd); return true }
	}
	c.peekOK = false
	err := c.rc.Read(c.peekFn)
	return err == nil && c.peekOK
}

// peekNothing reports whether the socket fd has nothing to read and is not
// closed by its peer. MSG_DONTWAIT never blocks, so it is a raw syscall.
func peekNothing(fd uintptr) bool {
	var b [1]byte
	for {
		_, _, errno := syscall.RawSyscall6(syscall.SYS_RECVFROM, fd, uintptr(unsafe.Pointer(&b[0])), 1,
			syscall.MSG_PEEK|syscall.MSG_DONTWAIT, 0, 0)
		if errno == syscall.EINTR {
			continue
		}
		return errno == syscall.EAGAIN || errno == syscall.EWOULDBLOCK
	}
}
