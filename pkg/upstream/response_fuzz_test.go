package upstream_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/sidecar-mesh/sidecar/internal/attacktest"
	"github.com/sidecar-mesh/sidecar/pkg/upstream"
)

// FuzzResponse holds the transport to what it may do with any bytes an
// upstream answers a request with:
//   - it never panics, and every failure is a *ConnectError or an
//     *UpstreamError (a broken or oversized answer: a *BadResponseError
//     inside it);
//   - a response it passes on has a head within the header limit, and its
//     body reads to an end;
//   - a connection that carried anything past the response is never used
//     for the next request: the upstream keeps the connection open and
//     answers a second request on it, after whatever the first answer
//     left, so the next request's answer is its own (from the same
//     connection or a new one), or the next request fails, but it never
//     reads the first answer's leftovers.
func FuzzResponse(f *testing.F) {
	for _, m := range attacktest.Misbehaviours() {
		if m.Class == "size" {
			continue // seeds stay small; the size cases run in the suite
		}
		answer, stray := m.Answer(http.MethodGet, "t1")
		f.Add([]byte(answer+stray), false)
		answer, stray = m.Answer(http.MethodHead, "t1")
		f.Add([]byte(answer+stray), true)
	}
	f.Add([]byte("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"), false)
	f.Add([]byte("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-T: 1\r\n\r\n"), false)
	f.Add([]byte("HTTP/1.0 200 OK\r\n\r\nuntil close"), false)
	const limit = 1 << 10
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		f.Fatal(err)
	}
	defer ln.Close()
	const second = "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond"
	f.Fuzz(func(t *testing.T, answer []byte, head bool) {
		method := http.MethodGet
		if head {
			method = http.MethodHead
		}
		dials := 0
		var servers sync.WaitGroup
		defer servers.Wait()
		tr := upstream.NewTransport(upstream.TransportConfig{
			MaxResponseHeaderBytes: limit,
			ResponseHeaderTimeout:  5 * time.Second,
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				dials++
				client, err := net.Dial("tcp", ln.Addr().String())
				if err != nil {
					return nil, err
				}
				server, err := ln.Accept()
				if err != nil {
					client.Close()
					return nil, err
				}
				out, keep := answer, endsOnItsOwn(answer, method)
				if dials > 1 {
					out, keep = []byte(second), false
				}
				servers.Add(1)
				go func() {
					defer servers.Done()
					defer server.Close()
					_ = server.SetDeadline(time.Now().Add(10 * time.Second))
					br := bufio.NewReader(server)
					if _, err := http.ReadRequest(br); err != nil {
						return
					}
					_, _ = server.Write(out)
					if !keep {
						// The answer ends where the connection's sending
						// side does.
						_ = server.(*net.TCPConn).CloseWrite()
						_, _ = io.Copy(io.Discard, server)
						return
					}
					// The connection stays open for a second request, which
					// comes at once if the transport found it clean, and is
					// answered after whatever the first answer left.
					_ = server.SetReadDeadline(time.Now().Add(2 * time.Second))
					if _, err := http.ReadRequest(br); err != nil {
						return
					}
					_, _ = io.WriteString(server, second)
				}()
				return client, nil
			},
		})
		defer tr.Close()
		req, _ := http.NewRequest(method, "http://svc/", nil)
		resp, err := tr.RoundTrip(req)
		if err != nil {
			var ue *upstream.UpstreamError
			var ce *upstream.ConnectError
			if !errors.As(err, &ue) && !errors.As(err, &ce) {
				t.Fatalf("RoundTrip failed with %T %v, want an *UpstreamError or *ConnectError", err, err)
			}
			return
		}
		size := len(resp.Status) + 12
		for k, vv := range resp.Header {
			for _, v := range vv {
				size += len(k) + len(v) + 4
			}
		}
		if size > limit+64 {
			t.Fatalf("a response head of about %d bytes passed a limit of %d", size, limit)
		}
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
		resp.Body.Close()

		req2, _ := http.NewRequest(http.MethodGet, "http://svc/", nil)
		resp2, err := tr.RoundTrip(req2)
		if err != nil {
			return
		}
		body, _ := io.ReadAll(io.LimitReader(resp2.Body, 1<<20))
		resp2.Body.Close()
		if string(body) != "second" {
			t.Fatalf("the second request read %q (%d connections dialled), want \"second\": the first answer's leftovers", body, dials)
		}
	})
}

// endsOnItsOwn reports whether answer begins with a whole response to a
// request of method that ends without the connection ending (interim
// responses, then one with a length or chunks, not asking to close): one a
// transport may keep the connection after.
func endsOnItsOwn(answer []byte, method string) bool {
	br := bufio.NewReader(bytes.NewReader(answer))
	for range 10 {
		resp, err := http.ReadResponse(br, &http.Request{Method: method})
		if err != nil {
			return false
		}
		if resp.StatusCode >= 100 && resp.StatusCode < 200 && resp.StatusCode != http.StatusSwitchingProtocols {
			continue
		}
		_, err = io.Copy(io.Discard, resp.Body)
		return err == nil && !resp.Close && resp.StatusCode != http.StatusSwitchingProtocols
	}
	return false
}
