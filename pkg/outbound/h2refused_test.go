package outbound_test

import (
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// h2Refuser is an h2c endpoint (prior knowledge, a raw framer) that
// processes no request: each stream gets RST_STREAM REFUSED_STREAM, or
// with goAway a GOAWAY naming the stream before it as the last, after
// which the connection is closed. Either says the request was not
// processed (RFC 9113, 8.7). streams is safe for concurrent use.
type h2Refuser struct {
	ln      net.Listener
	goAway  bool
	streams atomic.Int64
}

func startH2Refuser(t *testing.T, goAway bool) *h2Refuser {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &h2Refuser{ln: ln, goAway: goAway}
	var wg sync.WaitGroup
	var mu sync.Mutex // guards open
	open := map[net.Conn]bool{}
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			open[c] = true
			mu.Unlock()
			wg.Go(func() {
				r.serve(c)
				c.Close()
				mu.Lock()
				delete(open, c)
				mu.Unlock()
			})
		}
	})
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for c := range open {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return r
}

func (r *h2Refuser) serve(c net.Conn) {
	preface := make([]byte, len(http2.ClientPreface))
	if _, err := io.ReadFull(c, preface); err != nil || string(preface) != http2.ClientPreface {
		return
	}
	fr := http2.NewFramer(c, c)
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	if err := fr.WriteSettings(); err != nil {
		return
	}
	for {
		frame, err := fr.ReadFrame()
		if err != nil {
			return
		}
		switch f := frame.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				err = fr.WriteSettingsAck()
			}
		case *http2.PingFrame:
			if !f.IsAck() {
				err = fr.WritePing(true, f.Data)
			}
		case *http2.MetaHeadersFrame:
			r.streams.Add(1)
			if r.goAway {
				_ = fr.WriteGoAway(max(f.StreamID, 2)-2, http2.ErrCodeNo, nil)
				return
			}
			err = fr.WriteRSTStream(f.StreamID, http2.ErrCodeRefusedStream)
		}
		if err != nil {
			return
		}
	}
}

// A service with an HTTP/2 endpoint that refuses every stream next to a
// healthy one: every request is answered, at once, by the healthy one. The
// refusal says the request was not processed, so the chain sends it to the
// other endpoint, a POST too; the refusing endpoint is not asked again
// (after waits of 1s, 2s, 4s...) while the call's deadline runs out.
// Breakers and outlier detection are off, so that it stays in the rotation.
func TestH2RefusedStreamFailsOver(t *testing.T) {
	for _, tc := range []struct {
		name   string
		goAway bool
	}{{"REFUSED_STREAM", false}, {"GOAWAY beyond the stream", true}} {
		t.Run(tc.name, func(t *testing.T) {
			refuser := startH2Refuser(t, tc.goAway)
			var served atomic.Int64
			healthy := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				served.Add(1)
				io.Copy(io.Discard, r.Body)
				io.WriteString(w, "healthy "+r.Proto)
			})}
			var p http.Protocols
			p.SetUnencryptedHTTP2(true)
			healthy.Protocols = &p
			hln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			go healthy.Serve(hln)
			t.Cleanup(func() { healthy.Close() })

			sc := startSidecar(t, options{
				static:   map[string][]string{"mix": {refuser.ln.Addr().String(), hln.Addr().String()}},
				policies: "service: mix\n" + noBreaker + noOutliers,
			})
			c := h2Client(t, sc.addr)
			var slowest time.Duration
			for i := range 8 {
				before := refuser.streams.Load()
				start := time.Now()
				var resp *http.Response
				var err error
				if i%2 == 0 {
					resp, err = c.Get("http://mix/x")
				} else {
					// No body: the method is under test, not the replay of
					// a body the refused attempt had begun to read.
					resp, err = c.Post("http://mix/x", "text/plain", nil)
				}
				if err != nil {
					t.Fatalf("request %d: %v", i, err)
				}
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				took := time.Since(start)
				slowest = max(slowest, took)
				if resp.StatusCode != 200 || string(b) != "healthy HTTP/2.0" {
					t.Errorf("request %d: %s %q (x-sidecar-error %q) after %v; want 200 from the healthy endpoint",
						i, resp.Status, b, resp.Header.Get("X-Sidecar-Error"), took)
				}
				if took > 500*time.Millisecond {
					t.Errorf("request %d took %v; want it failed over at once", i, took)
				}
				if n := refuser.streams.Load() - before; n > 1 {
					t.Errorf("request %d: the refusing endpoint saw %d streams; want at most 1", i, n)
				}
			}
			if refuser.streams.Load() == 0 {
				t.Fatalf("no request went to the refusing endpoint; the test proves nothing")
			}
			t.Logf("the refusing endpoint saw %d streams; the slowest request took %v", refuser.streams.Load(), slowest)
		})
	}
}
