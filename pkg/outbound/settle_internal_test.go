package outbound

import (
	"io"
	"net/http"
	"strings"
	"testing"

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
	settled := settleGRPC(p, req, resp)
	buf := make([]byte, 64)
	n, err := settled.Body.Read(buf)
	if n != len(msg) || string(buf[:n]) != msg || err != nil && err != io.EOF {
		t.Fatalf("first read: %d bytes %q, %v; want the whole message %q in one read", n, buf[:n], err, msg)
	}
	if n, err := settled.Body.Read(buf); n != 0 || err != io.EOF {
		t.Fatalf("second read: %d, %v; want 0, EOF", n, err)
	}
}
