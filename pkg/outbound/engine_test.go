package outbound_test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime"
	"syscall"
	"testing"
	"time"
)

// On the event-loop engine, a local error answer that waits for a client
// not reading ends the call: its timeout does not fire afterwards (a
// second answer, a 504 the client never asked for, would have followed
// it and shifted every later answer on the connection by one), nor does
// the client's leaving count it again. The client pipelines failing
// requests and reads nothing past the timeout, then reads: one answer
// each, each a 502.
func TestLoopErrorAnswerEndsTheCall(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("the event-loop engine is Linux's")
	}
	dead, _ := net.Listen("tcp", "127.0.0.1:0")
	deadAddr := dead.Addr().String()
	dead.Close()
	sc := startSidecar(t, options{loops: true, static: map[string][]string{"dead": {deadAddr}},
		policies: "service: dead\ntimeout: 300ms\nretry: {attempts: 1}\n" + noBreaker + noOutliers})
	d := net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
		// A small window and segments: the sidecar's socket soon holds
		// all it may of the answers, and the rest wait in the engine.
		return c.Control(func(fd uintptr) {
			syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 2048)
			syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_MAXSEG, 536)
		})
	}}
	conn, err := d.Dial("tcp", sc.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	const n = 3000
	go func() {
		bw := bufio.NewWriter(conn)
		for range n {
			io.WriteString(bw, "GET / HTTP/1.1\r\nHost: dead\r\n\r\n")
		}
		bw.Flush()
	}()
	time.Sleep(time.Second) // past the timeout, reading nothing
	br := bufio.NewReader(conn)
	statuses := map[string]int{}
	for i := range n {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("answer %d of %d: %v (so far: %v)", i+1, n, err, statuses)
		}
		io.Copy(io.Discard, resp.Body)
		statuses[fmt.Sprint(resp.StatusCode, " ", resp.Header.Get("X-Sidecar-Error"))]++
	}
	conn.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if b, _ := br.Peek(1); len(b) > 0 {
		more, _ := io.ReadAll(br)
		t.Fatalf("answers %v, then more than one answer a request: %q", statuses, more[:min(len(more), 200)])
	}
	if len(statuses) != 1 || statuses["502 upstream_connect_failure"] != n {
		t.Fatalf("answers %v, want %d × 502 upstream_connect_failure", statuses, n)
	}
}
