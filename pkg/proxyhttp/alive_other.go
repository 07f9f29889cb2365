//go:build !linux

package proxyhttp

import "net"

// connAlive cannot peek without blocking here; a stale connection is caught
// by the transport's single resend instead.
func connAlive(net.Conn) bool { return true }
