package downstream

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// An HTTP/2 client that resets its stream mid-body is gone, not a bad
// request: its handler does not answer 400 into the void.
func TestHTTP2StreamResetIsClientGone(t *testing.T) {
	got := make(chan error, 1)
	srv := startFastLimits(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b := NewBodyReader(w, r, 5*time.Second)
		_, err := io.Copy(io.Discard, b)
		got <- err
	}), Limits{})
	tr := &http2.Transport{AllowHTTP: true, DialTLSContext: func(ctx context.Context, network, addr string, _ *tls.Config) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, network, addr)
	}}
	defer tr.CloseIdleConnections()
	pr, pw := io.Pipe()
	defer pw.Close()
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+srv.Addr().String()+"/", pr)
	done := make(chan struct{})
	go func() {
		defer close(done)
		if resp, err := tr.RoundTrip(req); err == nil {
			resp.Body.Close()
		}
	}()
	io.WriteString(pw, "the first part of the body")
	cancel() // RST_STREAM(CANCEL)
	<-done
	select {
	case err := <-got:
		var ce *ClientError
		if !errors.As(err, &ce) || !ce.Gone() || ce.Timeout() {
			t.Fatalf("body error %v; want a ClientError that says the client is gone", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the handler's body read did not end")
	}
}
