package proxyhttp

import (
	"net"
	"syscall"
	"unsafe"
)

// connAlive reports whether a pooled connection still looks usable: the peer
// has not closed it and sent nothing unasked (a server's 408 before closing).
// One non-blocking MSG_PEEK recv, no goroutine per idle connection.
func connAlive(c net.Conn) bool {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return true
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	alive := true
	var b [1]byte
	err = rc.Read(func(fd uintptr) bool {
		n, _, errno := syscall.Syscall6(syscall.SYS_RECVFROM, fd, uintptr(unsafe.Pointer(&b[0])), 1,
			syscall.MSG_PEEK|syscall.MSG_DONTWAIT, 0, 0)
		alive = errno == syscall.EAGAIN || errno == syscall.EWOULDBLOCK || errno == syscall.EINTR
		_ = n
		return true
	})
	return err == nil && alive
}
