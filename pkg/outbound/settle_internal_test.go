package outbound

import (
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/policy"
)

// A gRPC answer whose first byte settleGRPC read hands that byte on with
// what follows it in one read: alone it would be a DATA frame, and a write,
// of its own to the client.
func TestSettledBodyKeepsTheMessageWhole(t *testing.T) {
	msg := "\x00\x00\x00\x00\x05hello"
	resp := &http.Response{StatusCode: http.StatusOK, Header: http.Header{"Content-Type": {"application/grpc"}},
		Body: io.NopCloser(strings.NewReader(msg))}
	req, _ := http.NewRequest("POST", "http://svc/pkg.S/M", nil)
	p := &policy.Retry{On: []string{"grpc-unavailable"}}
	settled, err := settleGRPC(p, req, resp, time.Time{}, false)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	n, err := settled.Body.Read(buf)
	if n != len(msg) || string(buf[:n]) != msg || err != nil && err != io.EOF {
		t.Fatalf("first read: %d bytes %q, %v; want the whole message %q in one read", n, buf[:n], err, msg)
	}
	if n, err := settled.Body.Read(buf); n != 0 || err != io.EOF {
		t.Fatalf("second read: %d, %v; want 0, EOF", n, err)
	}
}

// A gRPC answer whose first message is slow to come (a server stream that
// sends its headers at once) is held at most until shortly before the
// attempt's deadline, then passed on unsettled, its first byte still to
// come through: never cut by the hold. One whose stream breaks before any
// message is an upstream failure, for the chain to judge.
func TestSettleGRPCHoldIsBounded(t *testing.T) {
	p := &policy.Retry{On: []string{"grpc-unavailable"}}
	req, _ := http.NewRequest("POST", "http://svc/pkg.S/M", nil)
	answer := func(body io.ReadCloser) *http.Response {
		return &http.Response{StatusCode: http.StatusOK, Header: http.Header{"Content-Type": {"application/grpc"}}, Body: body}
	}

	pr, pw := io.Pipe()
	start := time.Now()
	resp, err := settleGRPC(p, req, answer(pr), start.Add(300*time.Millisecond), true)
	if err != nil || time.Since(start) >= 300*time.Millisecond {
		t.Fatalf("a slow first message: %v after %v, want the answer passed on before the deadline", err, time.Since(start))
	}
	go func() {
		time.Sleep(100 * time.Millisecond)
		io.WriteString(pw, "\x00\x00\x00\x00\x02hi")
		pw.Close()
	}()
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || string(b) != "\x00\x00\x00\x00\x02hi" {
		t.Fatalf("the passed-on stream read %q, %v; want the whole message", b, err)
	}

	pr, pw = io.Pipe()
	pw.CloseWithError(errors.New("stream reset"))
	if _, err := settleGRPC(p, req, answer(pr), time.Time{}, false); err == nil || !isUpstreamError(err) {
		t.Fatalf("a stream broken before its first message: %v, want an upstream error", err)
	}

	// Closed while the hold's read waits: the read ends with it.
	pr, _ = io.Pipe()
	resp, _ = settleGRPC(p, req, answer(pr), time.Now().Add(50*time.Millisecond), true)
	resp.Body.Close()
}
