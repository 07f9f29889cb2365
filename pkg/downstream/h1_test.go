package downstream

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// The fast path (h1.go) must answer exactly as net/http does. Each case
// sends the same raw bytes to a downstream.Server and to a plain
// http.Server with the same handler and compares the raw bytes that come
// back, Date values aside.

var h1Handlers = map[string]http.HandlerFunc{
	"small body, no length": func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "hello")
	},
	"no body at all": func(w http.ResponseWriter, r *http.Request) {},
	"status only": func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusNoContent)
	},
	"not modified with headers": func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		w.Header().Set("Content-Length", "10")
		w.WriteHeader(http.StatusNotModified)
	},
	"explicit length": func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "5")
		w.Header().Set("X-B", "2")
		w.Header().Set("X-A", "1")
		_, _ = io.WriteString(w, "hello")
	},
	"large body, chunked": func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, strings.Repeat("0123456789", 500))
		_, _ = io.WriteString(w, strings.Repeat("x", 7))
	},
	"flushed stream": func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		_, _ = io.WriteString(w, "data: 1\n\n")
		w.(http.Flusher).Flush()
		_, _ = io.WriteString(w, "data: 2\n\n")
	},
	"declared and prefix trailers": func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Trailer", "X-Sum")
		w.WriteHeader(http.StatusOK)
		_, _ = io.WriteString(w, "body")
		w.Header().Set("X-Sum", "42")
		w.Header().Set(http.TrailerPrefix+"X-Late", "yes")
	},
	"header changed after WriteHeader": func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Before", "1")
		w.WriteHeader(http.StatusAccepted)
		w.Header().Set("X-After", "2")
		_, _ = io.WriteString(w, "x")
	},
	"value changed in place after WriteHeader": func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-V", "before")
		w.WriteHeader(http.StatusOK)
		w.Header()["X-V"][0] = "after"
		_, _ = io.WriteString(w, "x")
	},
	"closes the connection": func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Connection", "close")
		_, _ = io.WriteString(w, "bye")
	},
	"informational first": func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Link", "</a.css>; rel=preload")
		w.WriteHeader(http.StatusEarlyHints)
		_, _ = io.WriteString(w, "after hints")
	},
	"echoes the body": func(w http.ResponseWriter, r *http.Request) {
		b, err := io.ReadAll(r.Body)
		if err != nil {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		_, _ = w.Write(b)
	},
	"ignores the body": func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "not read")
	},
	"reports the request": func(w http.ResponseWriter, r *http.Request) {
		keys := make([]string, 0, len(r.Header))
		for k := range r.Header {
			keys = append(keys, k+"="+strings.Join(r.Header[k], "|"))
		}
		slicesSort(keys)
		_, _ = io.WriteString(w, strings.Join([]string{r.Method, r.Host, r.RequestURI, r.URL.String(),
			strconv.FormatInt(r.ContentLength, 10), strconv.FormatBool(r.Close), r.Proto, strings.Join(keys, ";")}, "\n"))
	},
	"writes more than announced": func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "2")
		_, err := io.WriteString(w, "abc")
		_, _ = io.WriteString(w, "["+strconv.FormatBool(err == http.ErrContentLength)+"]")
	},
	"writes less than announced": func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "10")
		_, _ = io.WriteString(w, "abc")
	},
}

func slicesSort(s []string) {
	for i := 1; i < len(s); i++ {
		for j := i; j > 0 && s[j] < s[j-1]; j-- {
			s[j], s[j-1] = s[j-1], s[j]
		}
	}
}

var h1Requests = map[string]string{
	"GET":               "GET /p?q=1 HTTP/1.1\r\nHost: svc\r\nUser-Agent: t\r\nAccept: */*\r\n\r\n",
	"HEAD":              "HEAD / HTTP/1.1\r\nHost: svc\r\n\r\n",
	"GET then GET":      "GET /1 HTTP/1.1\r\nHost: svc\r\n\r\nGET /2 HTTP/1.1\r\nHost: svc\r\n\r\n",
	"close":             "GET / HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n",
	"POST body":         "POST /u HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\n\r\nhelloGET /next HTTP/1.1\r\nHost: svc\r\n\r\n",
	"absolute form":     "GET http://svc:8080/a%20b?x=y HTTP/1.1\r\nHost: other\r\n\r\n",
	"odd header case":   "GET / HTTP/1.1\r\nhost: svc\r\nx-lower: a\r\nX-UPPER: b\r\nx-Mixed-case: c\r\nX-Dup: 1\r\nX-Dup: 2\r\nPragma: no-cache\r\n\r\n",
	"spaces in values":  "GET / HTTP/1.1\r\nHost: svc\r\nX-A:   padded\t \r\nX-Empty:\r\n\r\n",
	"then HTTP/1.0":     "GET /1 HTTP/1.1\r\nHost: svc\r\n\r\nGET /2 HTTP/1.0\r\nHost: svc\r\n\r\n",
	"then chunked":      "GET /1 HTTP/1.1\r\nHost: svc\r\n\r\nPOST /2 HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /3 HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n",
	"POST, CRLF, GET":   "POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 2\r\n\r\nhi\r\nGET /after HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n",
	"bad value then":    "GET /1 HTTP/1.1\r\nHost: svc\r\n\r\nGET /2 HTTP/1.1\r\nHost: svc\r\nX-A: a\x01b\r\n\r\n",
	"expect continue":   "POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\nhi",
	"no host":           "GET / HTTP/1.1\r\nX: y\r\n\r\n",
	"OPTIONS star":      "OPTIONS * HTTP/1.1\r\nHost: svc\r\n\r\n",
	"body short":        "POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 10\r\n\r\nabc",
	"GET with a body":   "GET / HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\n\r\nabcGET /x HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n",
	"keep-alive token":  "GET / HTTP/1.1\r\nHost: svc\r\nConnection: keep-alive, Close\r\n\r\n",
	"upgrade header":    "GET / HTTP/1.1\r\nHost: svc\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
	"big unread body":   "POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 300000\r\n\r\n" + strings.Repeat("z", 300000),
	"lowercase method":  "get / HTTP/1.1\r\nHost: svc\r\n\r\n",
	"empty first line":  "\r\nGET / HTTP/1.1\r\nHost: svc\r\n\r\n",
	"two content-lens":  "POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nhi",
	"trailer in a GET":  "GET / HTTP/1.1\r\nHost: svc\r\nTrailer: X-T\r\n\r\n",
	"tab before value":  "GET / HTTP/1.1\r\nHost:\tsvc\r\n\r\n",
	"percent in target": "GET /%zz HTTP/1.1\r\nHost: svc\r\n\r\n",
}

var dateLine = regexp.MustCompile(`(?m)^Date: .*\r$`)

func TestFastPathAnswersAsNetHTTP(t *testing.T) {
	for hname, h := range h1Handlers {
		t.Run(hname, func(t *testing.T) {
			fast := startFast(t, h)
			std := startStd(t, h)
			// Every exchange waits for the server's silence: run them all
			// at once.
			type result struct{ name, raw, got, want string }
			results := make(chan result, len(h1Requests))
			for rname, raw := range h1Requests {
				go func() {
					got := make(chan string, 1)
					go func() { got <- exchange(fast, raw) }()
					want := exchange(std, raw)
					results <- result{rname, raw, <-got, want}
				}()
			}
			for range h1Requests {
				r := <-results
				if r.got != r.want {
					t.Errorf("%s: request %q\nfast path answered:\n%q\nnet/http answers:\n%q", r.name, r.raw, r.got, r.want)
				}
			}
		})
	}
}

// exchange writes raw on a new connection and reads until the server
// closes it or stays silent for 300 ms.
func exchange(addr, raw string) string {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return "dial: " + err.Error()
	}
	defer c.Close()
	go func() { _, _ = io.WriteString(c, raw) }()
	var out []byte
	buf := make([]byte, 64<<10)
	for {
		_ = c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		n, err := c.Read(buf)
		out = append(out, buf[:n]...)
		if err != nil {
			break
		}
	}
	return dateLine.ReplaceAllString(string(out), "Date: (date)\r")
}

func startFast(t *testing.T, h http.Handler) string {
	t.Helper()
	return startFastLimits(t, h, Limits{}).Addr().String()
}

// startStd serves h with net/http alone, with the settings Listen gives
// its fallback.
func startStd(t *testing.T, h http.Handler) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l := Limits{}.WithDefaults()
	srv := &http.Server{Handler: h, ReadHeaderTimeout: l.ReadHeaderTimeout, IdleTimeout: l.IdleTimeout,
		MaxHeaderBytes: l.MaxHeaderBytes, DisableGeneralOptionsHandler: true,
		ErrorLog: nil}
	done := make(chan struct{})
	go func() { _ = srv.Serve(ln); close(done) }()
	t.Cleanup(func() { _ = srv.Close(); <-done })
	return ln.Addr().String()
}

// A client that goes away while its request runs cancels the request's
// context, once the request has run for clientWatchDelay.
func TestFastPathClientGoneCancels(t *testing.T) {
	started, canceled := make(chan struct{}), make(chan struct{})
	addr := startFast(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		close(started)
		select {
		case <-r.Context().Done():
			close(canceled)
		case <-time.After(5 * time.Second):
		}
	}))
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.WriteString(c, "GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
	<-started
	_ = c.Close()
	select {
	case <-canceled:
	case <-time.After(3 * time.Second):
		t.Fatal("the client closed its connection but the request's context was not canceled")
	}
}

// A request still running when Shutdown starts finishes, with
// "Connection: close"; Shutdown returns once it has.
func TestFastPathShutdownWaitsForInFlight(t *testing.T) {
	release := make(chan struct{})
	var served atomic.Int32
	srv, err := Listen("test", "127.0.0.1:0", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			<-release
		}
		served.Add(1)
		_, _ = io.WriteString(w, "done")
	}), Limits{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve() }()
	c, err := net.Dial("tcp", srv.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_, _ = io.WriteString(c, "GET /slow HTTP/1.1\r\nHost: svc\r\n\r\n")
	for deadline := time.Now().Add(2 * time.Second); !isActive(firstConn(srv)); {
		if time.Now().After(deadline) {
			t.Fatal("the request never became active")
		}
		time.Sleep(time.Millisecond) // waiting for the server's goroutine
	}
	shut := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		shut <- srv.Shutdown(ctx)
	}()
	select {
	case err := <-shut:
		t.Fatalf("Shutdown returned (%v) with a request in flight", err)
	case <-time.After(100 * time.Millisecond):
	}
	close(release)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("reading the in-flight answer: %v", err)
	}
	if resp.StatusCode != 200 || !resp.Close {
		t.Errorf("in-flight answer: status %d, close %v; want 200 with Connection: close", resp.StatusCode, resp.Close)
	}
	if err := <-shut; err != nil {
		t.Errorf("Shutdown: %v", err)
	}
	if err := <-done; err != nil {
		t.Errorf("Serve: %v", err)
	}
	if served.Load() != 1 {
		t.Errorf("served %d requests, want 1", served.Load())
	}
}

func isActive(c *h1Conn) bool { return c != nil && connState(c.state.Load()) == stateActive }

func firstConn(s *Server) *h1Conn {
	s.h1.mu.Lock()
	defer s.h1.mu.Unlock()
	for c := range s.h1.conns {
		return c
	}
	return nil
}

// h2c with prior knowledge still reaches net/http's HTTP/2 server.
func TestFastPathHandsOverH2C(t *testing.T) {
	addr := startFast(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, r.Proto)
	}))
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_, _ = io.WriteString(c, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
	// The server's SETTINGS frame: 9-byte header, type 4.
	head := make([]byte, 9)
	_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := io.ReadFull(c, head); err != nil || head[3] != 4 {
		t.Fatalf("after the HTTP/2 preface: frame header %x, %v; want a SETTINGS frame", head, err)
	}
}

// startFastLimits is startFast with limits of the test's choosing.
func startFastLimits(t *testing.T, h http.Handler, l Limits) *Server {
	t.Helper()
	srv, err := Listen("test", "127.0.0.1:0", h, l, nil)
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

// roundTrip writes raw on c and reads one answer, body included.
func roundTrip(t *testing.T, c net.Conn, br *bufio.Reader, raw string) (*http.Response, string) {
	t.Helper()
	_, _ = io.WriteString(c, raw)
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("answer to %q: %v", raw, err)
	}
	body, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	return resp, string(body)
}

// The header of a later request on a keep-alive connection gets
// ReadHeaderTimeout once it has begun, not the idle timeout: a client
// trickling it in is cut off. Also after a POST and its CRLF, which the
// check lets through early.
func TestKeepAliveHeaderTimeout(t *testing.T) {
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		_, _ = io.WriteString(w, "ok")
	})
	srv := startFastLimits(t, h, Limits{ReadHeaderTimeout: 200 * time.Millisecond, IdleTimeout: time.Minute})
	for name, tc := range map[string]struct{ first, then string }{
		"after a GET":  {"GET / HTTP/1.1\r\nHost: svc\r\n\r\n", "GET / HT"},
		"after a POST": {"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 2\r\n\r\nhi", "\r\nGET / HT"},
	} {
		t.Run(name, func(t *testing.T) {
			c, err := net.Dial("tcp", srv.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			br := bufio.NewReader(c)
			roundTrip(t, c, br, tc.first)
			_, _ = io.WriteString(c, tc.then) // and nothing more
			_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
			n, err := io.Copy(io.Discard, br)
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				t.Fatal("the connection with a half-sent header was still open after 10 s (idle timeout 1 min, header timeout 200 ms)")
			}
			if n != 0 {
				t.Errorf("%d bytes answered to a half-sent header, want none", n)
			}
		})
	}
}

// A connection holding part of its next request is idle to Shutdown, as
// with net/http: Shutdown closes it instead of waiting for it.
func TestShutdownClosesHalfSentRequests(t *testing.T) {
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		_, _ = io.WriteString(w, "ok")
	})
	srv := startFastLimits(t, h, Limits{IdleTimeout: time.Minute})
	c, err := net.Dial("tcp", srv.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	roundTrip(t, c, bufio.NewReader(c), "POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 2\r\n\r\nhi")
	_, _ = io.WriteString(c, "\r\nGET / HT")
	time.Sleep(50 * time.Millisecond) // for the bytes to reach the server
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown with only a half-sent request on the listener: %v", err)
	}
}

// A write deadline a handler sets ends with its request, as with net/http.
func TestWriteDeadlineEndsWithTheRequest(t *testing.T) {
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/a" {
			_ = http.NewResponseController(w).SetWriteDeadline(time.Now().Add(50 * time.Millisecond))
		}
		_, _ = io.WriteString(w, "ok "+r.URL.Path)
	})
	srv := startFastLimits(t, h, Limits{})
	c, err := net.Dial("tcp", srv.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	br := bufio.NewReader(c)
	roundTrip(t, c, br, "GET /a HTTP/1.1\r\nHost: svc\r\n\r\n")
	time.Sleep(150 * time.Millisecond) // past /a's write deadline
	if _, body := roundTrip(t, c, br, "GET /b HTTP/1.1\r\nHost: svc\r\n\r\n"); body != "ok /b" {
		t.Errorf("second request answered %q, want \"ok /b\"", body)
	}
}
