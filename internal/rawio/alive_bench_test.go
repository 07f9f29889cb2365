//go:build linux

package rawio

import (
	"net"
	"testing"
)

// BenchmarkAlive is what the transport pays to check a pooled connection
// before reusing it: one non-blocking MSG_PEEK recv on an idle loopback
// connection.
func BenchmarkAlive(b *testing.B) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	peer := <-accepted
	defer peer.Close()
	rc := Wrap(c)
	b.ReportAllocs()
	for b.Loop() {
		if !Alive(rc) {
			b.Fatal("an idle connection with nothing to read is not alive")
		}
	}
}
