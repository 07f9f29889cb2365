// Package freeport picks loopback ports for test servers that are stopped
// and started again on the same ports, or that are told their ports before
// they start. Ports from the kernel's ephemeral range (what listening on
// port 0 gives) are unsafe for that: while the server is down, any
// outgoing connection may take the number as its source port, and the
// server can't bind it again. These come from below that range.
//
// Test binaries of several packages run at once, and each hands out ports
// it has not bound yet, so two of them picking from the same pool could
// give the same port to two servers. Each process therefore claims a block
// of its own, by holding a listener on the block's first port for as long
// as it runs (the scheme of Consul's sdk/freeport), and hands out the
// block's other ports in turn, so a port comes back only after all the
// others have been handed out.
package freeport

import (
	"fmt"
	"io"
	"net"
	"strconv"
	"sync"
)

// low and high bound the ports picked: under Linux's default ephemeral
// range (32768-60999) and above the well-known and common service ports.
// They are split in blocks of blockSize.
const (
	low, high = 20000, 32000
	blockSize = 500
)

var (
	mu      sync.Mutex
	lock    net.Listener // held for the life of the process: the block is ours
	base    int          // the block's first port (the lock's)
	next    int          // offset in the block of the next port to try
	claimed bool
)

// claim takes the first free block. A failed claim (every block held by
// other processes) is an error for the caller.
func claim() error {
	if claimed {
		return nil
	}
	for b := low; b+blockSize <= high; b += blockSize {
		l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(b)))
		if err != nil {
			continue
		}
		lock, base, next, claimed = l, b, 1, true
		return nil
	}
	return fmt.Errorf("freeport: every block of %d ports in %d-%d is held by another process", blockSize, low, high)
}

// Stable returns n distinct ports free on 127.0.0.1 for TCP (and for UDP
// too, with udp set) at the time of the call, outside the ephemeral range
// and inside this process's block.
func Stable(n int, udp bool) ([]int, error) {
	mu.Lock()
	defer mu.Unlock()
	if err := claim(); err != nil {
		return nil, err
	}
	var held []io.Closer
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	var out []int
	for tries := 0; len(out) < n; tries++ {
		if tries == blockSize {
			return nil, fmt.Errorf("freeport: found only %d of %d free ports in block %d-%d", len(out), n, base, base+blockSize-1)
		}
		port := base + next
		if next++; next == blockSize {
			next = 1
		}
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		l, err := net.Listen("tcp", addr)
		if err != nil {
			continue
		}
		held = append(held, l)
		if udp {
			u, err := net.ListenPacket("udp", addr)
			if err != nil {
				continue
			}
			held = append(held, u)
		}
		out = append(out, port)
	}
	return out, nil
}
