//go:build !linux

package proxyhttp

import "net"

// rawIO returns c: raw-syscall I/O is Linux only.
func rawIO(c net.Conn) net.Conn { return c }
