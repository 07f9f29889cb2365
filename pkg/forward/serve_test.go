package forward_test

import (
	"bufio"
	"errors"
	"io"
	"net"
	"net/http"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/sidecar-mesh/sidecar/pkg/downstream"
	"github.com/sidecar-mesh/sidecar/pkg/forward"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// serve runs h on a listener of the sidecar's until the test ends.
func serve(t *testing.T, h http.Handler) *downstream.Server {
	t.Helper()
	srv, err := downstream.Listen("test", "127.0.0.1:0", h, downstream.Limits{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve() }()
	t.Cleanup(func() {
		_ = srv.Close()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return srv
}

// Through a real server: the handler sees the verdict; a bad request gets
// the local 400 and the connection closes.
func TestServerVerdicts(t *testing.T) {
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if v := downstream.TakeVerdict(r); v.Reason != "" {
			forward.WriteError(w, r, &forward.LocalError{Status: 400, Reason: forward.ReasonBadRequest, Detail: v.Reason})
			return
		}
		io.WriteString(w, "ok")
	})
	srv, err := downstream.Listen("test", "127.0.0.1:0", h, downstream.Limits{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve() }()
	defer func() {
		srv.HTTP.Close()
		<-done
	}()
	c, err := net.Dial("tcp", srv.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(c, "GET / HTTP/1.1\r\nHost: a\r\n\r\nPOST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n")
	br := bufio.NewReader(c)
	for i, want := range []int{200, 400} {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("response %d: %v", i, err)
		}
		io.Copy(io.Discard, resp.Body)
		if resp.StatusCode != want {
			t.Fatalf("response %d: %d, want %d", i, resp.StatusCode, want)
		}
		if want == 400 && (resp.Header.Get(forward.ErrorHeader) != "bad_request" || !resp.Close) {
			t.Fatalf("rejection: header %q close %v, want bad_request and Connection: close", resp.Header.Get(forward.ErrorHeader), resp.Close)
		}
	}
}

// net/http cancels a request's context when a read on its connection fails,
// so a transport sending a broken body may report the cancellation instead
// of the body's error. The client is still owed its answer: Forward hands
// OnError the body's error. The upstream here always reports the
// cancellation, the order the race picks at times.
func TestBrokenBodyIsAnsweredNotAborted(t *testing.T) {
	cases := []struct {
		name, request string
		status        int
		reason        string
	}{
		{"malformed chunk line", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n2\nxy\r\n0\r\n\r\n", 400, forward.ReasonBadRequest},
		{"obs-fold in a trailer", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: a\r\n b\r\n\r\n", 400, forward.ReasonBadRequest},
		{"stalled chunked body", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel", 408, forward.ReasonRequestTimeout},
	}
	next := brokenBodyUpstream(func(r *http.Request) (*http.Response, error) {
		_, _ = io.Copy(io.Discard, r.Body) // fails: the body is broken
		select {
		case <-r.Context().Done():
			return nil, r.Context().Err()
		case <-time.After(5 * time.Second):
			return nil, errors.New("the request's context was never canceled")
		}
	})
	fw := &forward.Forwarder{OnError: func(w http.ResponseWriter, r *http.Request, err error) {
		var ce *downstream.ClientError
		switch {
		case errors.As(err, &ce) && ce.Timeout():
			forward.WriteError(w, r, &forward.LocalError{Status: 408, Reason: forward.ReasonRequestTimeout, Detail: err.Error()})
		case errors.As(err, &ce) && !ce.Gone():
			forward.WriteError(w, r, &forward.LocalError{Status: 400, Reason: forward.ReasonBadRequest, Detail: err.Error()})
		default:
			panic(http.ErrAbortHandler) // as the listeners do for a client gone
		}
	}}
	srv := serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		r.Body = downstream.NewBodyReader(w, r, 100*time.Millisecond)
		fw.Forward(w, r, next, "upstream.invalid")
	}))
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, err := net.Dial("tcp", srv.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(5 * time.Second))
			io.WriteString(c, tc.request)
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			if err != nil {
				t.Fatalf("no answer: %v", err)
			}
			resp.Body.Close()
			if resp.StatusCode != tc.status || resp.Header.Get(forward.ErrorHeader) != tc.reason {
				t.Fatalf("answer %d %q, want %d %q", resp.StatusCode, resp.Header.Get(forward.ErrorHeader), tc.status, tc.reason)
			}
		})
	}
}

type brokenBodyUpstream func(*http.Request) (*http.Response, error)

func (f brokenBodyUpstream) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }
