package outbound_test

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"sync"
	"testing"
	"time"
)

// rawAll sends payload on one connection and reads every response until the
// connection ends; it returns "status reason path-echo" lines.
func rawAll(t *testing.T, addr, payload string) []string {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	io.WriteString(c, payload)
	br := bufio.NewReader(c)
	var out []string
	for {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			return out
		}
		b, _ := io.ReadAll(resp.Body)
		out = append(out, resp.Status+" ["+resp.Header.Get("X-Sidecar-Error")+"] "+string(b))
	}
}

type recorder struct {
	mu    sync.Mutex
	paths []string
}

func (r *recorder) handler(w http.ResponseWriter, req *http.Request) {
	b, _ := io.ReadAll(req.Body)
	r.mu.Lock()
	r.paths = append(r.paths, req.Method+" "+req.URL.Path+" body="+string(b))
	r.mu.Unlock()
	io.WriteString(w, "upstream saw "+req.Method+" "+req.URL.Path)
}
func (r *recorder) get() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.paths...)
}

const smuggle = "POST /smuggled HTTP/1.1\r\nHost: svc\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"

// Regression: a header block that starts with "PRI * HTTP/2.0\r\n" anywhere in the
// stream switches the check to passthrough for the rest of the connection.
func TestPRIRequestDoesNotDisableFramingCheck(t *testing.T) {
	for name, prefix := range map[string]string{
		"first":      "",
		"mid-stream": "GET /a HTTP/1.1\r\nHost: svc\r\n\r\n",
	} {
		t.Run(name, func(t *testing.T) {
			rec := &recorder{}
			up := newUpstream(t, rec.handler)
			sc := startSidecar(t, options{static: map[string][]string{"svc": {up.addr()}}})
			out := rawAll(t, sc.addr, prefix+"PRI * HTTP/2.0\r\nHost: svc\r\n\r\n"+smuggle)
			t.Logf("client got: %q", out)
			t.Logf("upstream saw: %q", rec.get())
			for _, p := range rec.get() {
				if p == "POST /smuggled body=" {
					t.Errorf("CL+TE request reached the upstream")
				}
			}
		})
	}
}

// Regression: after a POST, net/http discards up to 4 leading CR/LF bytes; the check
// queues a verdict for each of them, so verdicts shift by one.
func TestCRLFAfterPOSTKeepsVerdictsInStep(t *testing.T) {
	rec := &recorder{}
	up := newUpstream(t, rec.handler)
	sc := startSidecar(t, options{static: map[string][]string{"svc": {up.addr()}}})
	out := rawAll(t, sc.addr, "POST /a HTTP/1.1\r\nHost: svc\r\nContent-Length: 1\r\n\r\nx\r\n"+smuggle)
	t.Logf("client got: %q", out)
	if len(out) != 2 || out[1][:3] != "400" {
		t.Errorf("second response should be 400 bad_request")
	}
}

// Regression: OPTIONS * is answered by net/http itself, the handler never takes its
// verdict.
func TestOptionsStarKeepsVerdictsInStep(t *testing.T) {
	rec := &recorder{}
	up := newUpstream(t, rec.handler)
	sc := startSidecar(t, options{static: map[string][]string{"svc": {up.addr()}}})
	out := rawAll(t, sc.addr, "OPTIONS * HTTP/1.1\r\nHost: svc\r\n\r\n"+smuggle)
	t.Logf("client got: %q", out)
	if len(out) != 2 || out[1][:3] != "400" {
		t.Errorf("second response should be 400 bad_request")
	}
}

// Regression: net/http ignores Transfer-Encoding on HTTP/1.0; the check treats it as
// chunked. The request is forwarded with its body dropped.
func TestHTTP10TransferEncodingRejected(t *testing.T) {
	rec := &recorder{}
	up := newUpstream(t, rec.handler)
	sc := startSidecar(t, options{static: map[string][]string{"svc": {up.addr()}}})
	out := rawAll(t, sc.addr, "POST /ten HTTP/1.0\r\nHost: svc\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
	t.Logf("client got: %q", out)
	t.Logf("upstream saw: %q", rec.get())
	if len(rec.get()) != 0 {
		t.Errorf("HTTP/1.0 request with Transfer-Encoding reached the upstream")
	}
}

// Regression: chunk line "5 ;ext": the check accepts it, net/http rejects it (it trims
// whitespace before cutting the extension).
func TestChunkExtensionWhitespaceRejected(t *testing.T) {
	rec := &recorder{}
	up := newUpstream(t, rec.handler)
	sc := startSidecar(t, options{static: map[string][]string{"svc": {up.addr()}}})
	out := rawAll(t, sc.addr, "POST /ext HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n5 ;a=b\r\nhello\r\n0\r\n\r\n")
	if len(out) != 1 || out[0][:3] != "400" || len(rec.get()) != 0 {
		t.Fatalf("client got %q, upstream saw %q; want one 400 and nothing forwarded", out, rec.get())
	}
}
