// Command loopfwd is a bare HTTP/1.1 keep-alive forwarder on event loops,
// for benchmarks: the engine the sidecar's request path would run on if it
// left Go's netpoller, without the sidecar's policy chain, telemetry or
// anything else, so that `make bench` can put its cost beside the
// sidecar's, HAProxy's and nginx's in the same run.
//
//	loopfwd -listen 127.0.0.1:18091 -upstream 127.0.0.1:18080 [-loops N]
//
// Each of -loops event loops (default: GOMAXPROCS) runs on an OS thread of
// its own with an epoll set, accepts on a SO_REUSEPORT listener of its own
// (as nginx and HAProxy spread connections over their threads), and owns
// its connections: non-blocking sockets, each client connection a small
// state machine paired with one upstream connection of its own, dialled at
// its first request and reused for the next while both sides keep it
// alive. No goroutine per connection, no read before each wait, no
// hand-off between threads.
//
// It keeps the checks a forwarder owes both sides: request heads parsed
// and validated (method and header names tokens, no control bytes in
// values, no obsolete line folding, one Content-Length and never with
// Transfer-Encoding), hop-by-hop headers dropped, heads at most 64 KiB,
// answers framed by exactly one Content-Length, and an upstream connection
// that sends a byte past its answer closed, never reused. What it does not
// do it refuses: a request with a body or an upgrade gets 501, an answer
// without a Content-Length (chunked, or read to close) ends both
// connections. Linux only.
package main

import (
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"runtime"
	"syscall"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:18091", "address to accept clients on")
	upstream := flag.String("upstream", "127.0.0.1:18080", "address of the one upstream")
	loops := flag.Int("loops", runtime.GOMAXPROCS(0), "event loops, each on an OS thread of its own")
	flag.Parse()
	if err := run(*listen, *upstream, *loops); err != nil {
		fmt.Fprintln(os.Stderr, "loopfwd:", err)
		os.Exit(1)
	}
}

func run(listen, upstream string, loops int) error {
	if loops < 1 {
		return fmt.Errorf("-loops must be at least 1, got %d", loops)
	}
	la, err := net.ResolveTCPAddr("tcp4", listen)
	if err != nil {
		return err
	}
	ua, err := net.ResolveTCPAddr("tcp4", upstream)
	if err != nil {
		return err
	}
	errc := make(chan error, loops)
	for range loops {
		l, err := newLoop(la, ua)
		if err != nil {
			return err
		}
		go func() {
			runtime.LockOSThread()
			errc <- l.run()
		}()
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	select {
	case err := <-errc:
		return err
	case <-sig:
		return nil
	}
}
