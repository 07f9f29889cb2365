package outbound_test

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// h2Conn opens an h2c connection to the sidecar with a raw framer.
func h2Conn(t *testing.T, addr string) (net.Conn, *http2.Framer) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.WriteString(c, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	fr := http2.NewFramer(c, c)
	if err := fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	return c, fr
}

func requestHeaders(host string, extra int) []byte {
	var buf bytes.Buffer
	enc := hpack.NewEncoder(&buf)
	for _, f := range []hpack.HeaderField{{Name: ":method", Value: "GET"}, {Name: ":scheme", Value: "http"},
		{Name: ":authority", Value: host}, {Name: ":path", Value: "/"}} {
		enc.WriteField(f)
	}
	for i := range extra {
		enc.WriteField(hpack.HeaderField{Name: "x-pad", Value: strings.Repeat("a", 100+i%7)})
	}
	return buf.Bytes()
}

func heapInUse() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse
}

// HTTP/2 rapid reset (CVE-2023-44487): a client opening and cancelling
// 20000 streams as fast as it can neither stops other clients from being
// served nor leaves goroutines or memory behind; the upstream sees only a
// bounded share of the cancelled requests.
func TestH2RapidReset(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-r.Context().Done():
		case <-time.After(10 * time.Millisecond):
		}
	})
	sc := startSidecar(t, options{static: map[string][]string{"svc": {up.addr()}}})
	c := h2Client(t, sc.addr)
	if resp, err := c.Get("http://svc/"); err == nil { // the sidecar learns the upstream speaks HTTP/1.1
		resp.Body.Close()
	}
	goroutines, heap := runtime.NumGoroutine(), heapInUse()

	attacker, fr := h2Conn(t, sc.addr)
	defer attacker.Close()
	go io.Copy(io.Discard, attacker) // drain the server's frames
	block := requestHeaders("svc", 0)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for id := uint32(1); id < 40000; id += 2 {
			if fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: block, EndStream: true, EndHeaders: true}) != nil {
				return // the server closed the connection: fine
			}
			if fr.WriteRSTStream(id, http2.ErrCodeCancel) != nil {
				return
			}
		}
	}()
	ok := 0
	for range 50 {
		req, _ := http.NewRequest("GET", "http://svc/", nil)
		resp, err := c.Do(req)
		if err != nil {
			t.Logf("well-behaved client: %v", err)
			continue
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode == 200 {
			ok++
		} else {
			t.Logf("well-behaved client: %s %s", resp.Status, b)
		}
	}
	<-done
	attacker.Close()
	if ok != 50 {
		t.Fatalf("a well-behaved client got %d of 50 answers during the attack, want 50", ok)
	}
	settled(t, goroutines, heap)
	t.Logf("upstream saw %d of 20000 reset requests", up.requests.Load()-51)
}

// HTTP/2 CONTINUATION flood (CVE-2023-45288): endless CONTINUATION frames
// get the connection closed once the header list limit is passed, without
// buffering them; other clients are served.
func TestH2ContinuationFlood(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {})
	sc := startSidecar(t, options{static: map[string][]string{"svc": {up.addr()}}})
	c := h2Client(t, sc.addr)
	get := func(when string) {
		resp, err := c.Get("http://svc/")
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("a well-behaved client %s: %v %v", when, resp, err)
		}
		resp.Body.Close()
	}
	get("before the flood") // the sidecar learns the upstream speaks HTTP/1.1 only
	before := up.requests.Load()
	goroutines, heap := runtime.NumGoroutine(), heapInUse()

	attacker, fr := h2Conn(t, sc.addr)
	defer attacker.Close()
	closed := make(chan struct{})
	go func() { io.Copy(io.Discard, attacker); close(closed) }()
	if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: requestHeaders("svc", 0), EndStream: true}); err != nil {
		t.Fatal(err)
	}
	pad := requestHeaders("svc", 100)[len(requestHeaders("svc", 0)):]
	sent := 0
	for sent < 64<<20 { // up to 64 MiB of header block
		if err := fr.WriteContinuation(1, false, pad); err != nil {
			break
		}
		sent += len(pad)
	}
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatalf("the server still reads CONTINUATION frames after %d bytes", sent)
	}
	t.Logf("connection closed after %d KiB of CONTINUATION frames", sent>>10)
	if sent >= 64<<20 {
		t.Fatal("the server read 64 MiB of header block without closing the connection")
	}
	get("after the flood")
	if n := up.requests.Load() - before; n != 1 {
		t.Fatalf("upstream saw %d requests from the flood on, want only the well-behaved one", n)
	}
	settled(t, goroutines, heap)
}

// h2Client speaks h2c with prior knowledge to the sidecar.
func h2Client(t *testing.T, addr string) *http.Client {
	t.Helper()
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	tr := &http.Transport{Protocols: &p, DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, addr)
	}}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 10 * time.Second}
}

// settled waits for the sidecar's goroutines to come back near where they
// were and checks the heap did not keep the attack.
func settled(t *testing.T, goroutines int, heap uint64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for runtime.NumGoroutine() > goroutines+10 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > goroutines+10 {
		t.Fatalf("%d goroutines after the attack, %d before", n, goroutines)
	}
	if h := heapInUse(); h > heap+32<<20 {
		t.Fatalf("heap in use %d MiB after the attack, %d MiB before", h>>20, heap>>20)
	}
}

// An HTTP/2 client calling a service whose instances speak only HTTP/1.1
// is served: the sidecar notices the endpoint answered its HTTP/2 preface
// in HTTP/1.x and sends the requests (which the endpoint never saw) over
// HTTP/1.1, including the ones in flight when it found out.
func TestH2ClientToHTTP1Upstream(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, r.Proto+" "+r.Method) })
	sc := startSidecar(t, options{static: map[string][]string{"svc": {up.addr()}}})
	c := h2Client(t, sc.addr)
	var wg sync.WaitGroup
	errs := make(chan string, 20)
	for range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := c.Post("http://svc/", "text/plain", strings.NewReader("x"))
			if err != nil {
				errs <- err.Error()
				return
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 || string(b) != "HTTP/1.1 POST" {
				errs <- resp.Status + " " + string(b)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Errorf("HTTP/2 request to an HTTP/1.1 upstream: %s", e)
	}
}

// HTTP/2 requests with connection-specific header fields, or TE other than
// "trailers", are malformed (RFC 9113, 8.2.2): 400, never forwarded.
func TestH2MalformedHeaderFieldsRejected(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {})
	sc := startSidecar(t, options{static: map[string][]string{"svc": {up.addr()}}})
	for _, f := range [][2]string{{"connection", "keep-alive"}, {"keep-alive", "5"}, {"upgrade", "websocket"},
		{"transfer-encoding", "chunked"}, {"te", "gzip"}} {
		c, fr := h2Conn(t, sc.addr)
		var buf bytes.Buffer
		enc := hpack.NewEncoder(&buf)
		for _, hf := range []hpack.HeaderField{{Name: ":method", Value: "GET"}, {Name: ":scheme", Value: "http"},
			{Name: ":authority", Value: "svc"}, {Name: ":path", Value: "/"}, {Name: f[0], Value: f[1]}} {
			enc.WriteField(hf)
		}
		if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: buf.Bytes(), EndStream: true, EndHeaders: true}); err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		status := ""
		dec := hpack.NewDecoder(4096, func(hf hpack.HeaderField) {
			if hf.Name == ":status" {
				status = hf.Value
			}
		})
		for status == "" {
			frame, err := fr.ReadFrame()
			if err != nil {
				break // a reset connection also refuses it
			}
			if h, ok := frame.(*http2.HeadersFrame); ok && h.StreamID == 1 {
				dec.Write(h.HeaderBlockFragment())
			}
		}
		c.Close()
		if status != "400" && status != "" {
			t.Errorf("HTTP/2 request with %s: %s: got status %s, want 400", f[0], f[1], status)
		}
	}
	if n := up.requests.Load(); n != 0 {
		t.Fatalf("upstream saw %d malformed HTTP/2 requests, want 0", n)
	}
}

// A client that opens streams and never reads their answers holds at most
// a bounded window of each in the sidecar: the upstream's answers (16 MiB
// each, over HTTP/2) wait at the upstream, not in the sidecar's memory.
func TestH2UnreadAnswersStayBounded(t *testing.T) {
	chunk := bytes.Repeat([]byte("x"), 64<<10)
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	up := &http.Server{Protocols: &p, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		for range 256 { // 16 MiB, written as fast as the window lets
			if _, err := w.Write(chunk); err != nil {
				return
			}
		}
	})}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go up.Serve(ln)
	defer up.Close()
	sc := startSidecar(t, options{static: map[string][]string{"big": {ln.Addr().String()}}})
	heap, goroutines := heapInUse(), runtime.NumGoroutine()

	c, fr := h2Conn(t, sc.addr)
	fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0}) // read nothing
	const streams = 64
	for i := range streams {
		var buf bytes.Buffer
		enc := hpack.NewEncoder(&buf)
		for _, f := range []hpack.HeaderField{{Name: ":method", Value: "GET"}, {Name: ":scheme", Value: "http"},
			{Name: ":authority", Value: "big"}, {Name: ":path", Value: "/big"}} {
			enc.WriteField(f)
		}
		if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: uint32(2*i + 1), BlockFragment: buf.Bytes(), EndStream: true, EndHeaders: true}); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(2 * time.Second) // the upstream writes what the windows let it
	during := heapInUse()
	c.Close()
	t.Logf("heap in use %d MiB before, %d MiB with %d unread 16 MiB answers", heap>>20, during>>20, streams)
	if during > heap+48<<20 {
		t.Errorf("heap grew by %d MiB with %d streams left unread, want a bounded window each", (during-heap)>>20, streams)
	}
	settled(t, goroutines, heap)
}

// What an HTTP/2 client gets wrong is its own fault, never the upstream's:
// a body shorter than its content-length and a header list larger than
// the endpoint takes are answered 400, are not retried, and do not open
// the breaker for everyone else (25 of each, then a good request).
func TestH2ClientFaultsAreNotTheUpstreams(t *testing.T) {
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	var hits atomic.Int64
	up := &http.Server{Protocols: &p, MaxHeaderBytes: 4 << 10, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		io.Copy(io.Discard, r.Body)
		io.WriteString(w, "ok")
	})}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go up.Serve(ln)
	defer up.Close()
	sc := startSidecar(t, options{static: map[string][]string{"h2": {ln.Addr().String()}},
		policies: "service: h2\ncircuitBreaker: {consecutiveFailures: 5}\n"})

	short := func() (int, string) {
		c, fr := h2Conn(t, sc.addr)
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		var buf bytes.Buffer
		enc := hpack.NewEncoder(&buf)
		for _, f := range [][2]string{{":method", "PUT"}, {":scheme", "http"}, {":authority", "h2"}, {":path", "/"}, {"content-length", "10"}} {
			enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
		}
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: buf.Bytes(), EndHeaders: true})
		fr.WriteData(1, true, []byte("hello"))
		status, reason := 0, ""
		dec := hpack.NewDecoder(4096, func(hf hpack.HeaderField) {
			switch hf.Name {
			case ":status":
				status, _ = strconv.Atoi(hf.Value)
			case "x-sidecar-error":
				reason = hf.Value
			}
		})
		for status == 0 {
			f, err := fr.ReadFrame()
			if err != nil {
				return 0, err.Error()
			}
			switch f := f.(type) {
			case *http2.HeadersFrame:
				dec.Write(f.HeaderBlockFragment())
			case *http2.RSTStreamFrame:
				return 0, "reset " + f.ErrCode.String()
			}
		}
		return status, reason
	}
	client := h2Client(t, sc.addr)
	big := func() (int, string) {
		req, _ := http.NewRequest("GET", "http://h2/", nil)
		req.Header.Set("X-Big", strings.Repeat("a", 6000))
		resp, err := client.Do(req)
		if err != nil {
			return 0, err.Error()
		}
		resp.Body.Close()
		return resp.StatusCode, resp.Header.Get("X-Sidecar-Error")
	}
	for name, send := range map[string]func() (int, string){"short body": short, "header list over the endpoint's limit": big} {
		for i := range 25 {
			if status, reason := send(); status != http.StatusBadRequest || reason != "bad_request" {
				t.Fatalf("%s #%d: %d %q, want 400 bad_request", name, i, status, reason)
			}
		}
	}
	resp, err := client.Get("http://h2/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("a good request after the faulty ones: %d %s, want 200 (the breaker closed)", resp.StatusCode, resp.Header.Get("X-Sidecar-Error"))
	}
	if n := hits.Load(); n > 26 {
		t.Errorf("the upstream was sent %d requests, want at most the 25 short bodies and the good one (none retried)", n)
	}
}
