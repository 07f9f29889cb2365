// Package freeport picks loopback ports for test servers that are stopped
// and started again on the same ports. Ports from the kernel's ephemeral
// range (what listening on port 0 gives) are unsafe for that: while the
// server is down, any outgoing connection may take the number as its
// source port, and the server can't bind it again. These come from below
// that range.
package freeport

import (
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"strconv"
)

// low and high bound the ports picked: under Linux's default ephemeral
// range (32768-60999) and above the well-known and common service ports.
const low, high = 20000, 32000

// Stable returns n distinct ports free on 127.0.0.1 for TCP (and for UDP
// too, with udp set) at the time of the call, outside the ephemeral range.
func Stable(n int, udp bool) ([]int, error) {
	var held []io.Closer
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	var out []int
	for tries := 0; len(out) < n; tries++ {
		if tries == 1000 {
			return nil, fmt.Errorf("freeport: found only %d of %d free ports in %d tries", len(out), n, tries)
		}
		port := low + rand.IntN(high-low)
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		l, err := net.Listen("tcp", addr)
		if err != nil {
			continue
		}
		held = append(held, l) // held until all are picked: no duplicates
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
