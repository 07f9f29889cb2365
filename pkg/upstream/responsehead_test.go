package upstream

import (
	"bufio"
	"bytes"
	"net/http"
	"reflect"
	"strings"
	"testing"
)

// usualHeads are heads parseUsualHead reads, and heads it must leave to
// net/http's reader.
var usualHeads = []struct {
	head  string
	usual bool
}{
	{"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\n", true},
	{"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", true},
	{"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 007\r\nx-a: 1\r\nX-A: 2\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\n", true},
	{"HTTP/1.1 200\r\nContent-Length: 5\r\nX-Empty:\r\nX-Spaces: \t a b \t\r\n\r\n", true},
	{"HTTP/1.1 404 \r\nContent-Length: 1\r\n\r\n", true},
	{"HTTP/1.1 200 OK\r\nDate: Mon, 07 Dec 2026 23:28:27 GMT\r\nServer: x/1.0 (y)\r\nContent-Length: 1024\r\n\r\n", true},
	{"HTTP/1.1 599 whatever ~!@#$%^&*()\r\nContent-Length: 1\r\n\r\n", true},
	// net/http's.
	{"HTTP/1.1 200 OK\r\n\r\n", false},                                                         // to the close
	{"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", false},                           // chunked
	{"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n", false},               // twice
	{"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\n", false},                                   // sign
	{"HTTP/1.1 200 OK\r\nContent-Length: 2 2\r\n\r\n", false},                                  // space
	{"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n", false},                 // too long
	{"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n", false},               // Connection
	{"HTTP/1.1 200 OK\r\nPragma: no-cache\r\nContent-Length: 2\r\n\r\n", false},                // Pragma
	{"HTTP/1.1 200 OK\r\nTrailer: X\r\nContent-Length: 2\r\n\r\n", false},                      // Trailer
	{"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\n", false},           // Keep-Alive
	{"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", false},                            // no body
	{"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n", false},                          // no body
	{"HTTP/1.1 100 Continue\r\n\r\n", false},                                                   // interim
	{"HTTP/1.1 101 Switching Protocols\r\nContent-Length: 1\r\n\r\n", false},                   // upgrade
	{"HTTP/1.1 199 X\r\nContent-Length: 1\r\n\r\n", false},                                     // interim
	{"HTTP/1.1 600 X\r\nContent-Length: 1\r\n\r\n", false},                                     // out of range
	{"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n", false},                                    // HTTP/1.0
	{"HTTP/1.1  200 OK\r\nContent-Length: 2\r\n\r\n", false},                                   // two spaces
	{"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\n", false},                                   // four digits
	{"HTTP/1.1 20 OK\r\nContent-Length: 2\r\n\r\n", false},                                     // two digits
	{"HTTP/1.1 20\r\n\r\n", false},                                                             // short
	{"HTTP/1.1 200 OK\nContent-Length: 2\n\n", false},                                          // bare LF
	{"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX: a\rb\r\n\r\n", false},                         // bare CR
	{"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX: 1\r\n folded\r\n\r\n", false},                 // obs-fold
	{"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX : 1\r\n\r\n", false},                           // space before colon
	{"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX\r\n\r\n", false},                               // no colon
	{"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n: 1\r\n\r\n", false},                             // no name
	{"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX: caf\xc3\xa9\r\n\r\n", false},                  // not ASCII
	{"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX: a\x00b\r\n\r\n", false},                       // NUL
	{"HTTP/1.1 200 \xffK\r\nContent-Length: 2\r\n\r\n", false},                                 // reason not ASCII
	{"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nextra", false},                               // past the head
	{"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n", false},                                        // not ended
	{"HTTP/1.1 200 OK\r\nX-\xff: 1\r\nContent-Length: 2\r\n\r\n", false},                       // name not a token
	{"HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n", false},                                     // empty length
	{"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: identity\r\n\r\n", false},     // both
	{"HTTP/1.1 200 OK\r\nCONTENT-LENGTH: 2\r\nconnection: keep-alive\r\n\r\n", false},          // Connection
	{"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Tab:\ta\tb\t\r\nX-Mid: a\x7fb\r\n\r\n", false}, // DEL
}

// TestUsualHeadAsNetHTTP: for every head the fast reader reads, its answer
// is net/http's, field for field; the others it leaves to net/http.
func TestUsualHeadAsNetHTTP(t *testing.T) {
	for _, tc := range usualHeads {
		_, ok := parseUsualHead([]byte(tc.head), &http.Request{Method: http.MethodGet})
		if ok != tc.usual {
			t.Errorf("%q: read by the fast reader: %v, want %v", tc.head, ok, tc.usual)
		}
		compareUsualHead(t, []byte(tc.head), http.MethodGet)
	}
	for _, method := range []string{http.MethodHead, http.MethodConnect} {
		if _, ok := parseUsualHead([]byte(usualHeads[0].head), &http.Request{Method: method}); ok {
			t.Errorf("the answer to a %s read by the fast reader", method)
		}
	}
}

// FuzzUsualHead: any head the fast reader reads, net/http reads the same.
func FuzzUsualHead(f *testing.F) {
	for _, tc := range usualHeads {
		f.Add([]byte(tc.head), false)
	}
	f.Fuzz(func(t *testing.T, head []byte, post bool) {
		method := http.MethodGet
		if post {
			method = http.MethodPost
		}
		compareUsualHead(t, head, method)
	})
}

// compareUsualHead fails t when the fast reader reads head other than
// http.ReadResponse does.
func compareUsualHead(t *testing.T, head []byte, method string) {
	t.Helper()
	req := &http.Request{Method: method}
	got, ok := parseUsualHead(head, req)
	if !ok {
		return
	}
	want, err := http.ReadResponse(bufio.NewReader(bytes.NewReader(head)), req)
	if err != nil {
		t.Fatalf("%q: the fast reader read it, net/http refuses it: %v", head, err)
	}
	// ReadResponse reads no further than the head's end.
	type fields struct {
		Status           string
		StatusCode       int
		Proto            string
		ProtoMajor       int
		ProtoMinor       int
		Header           http.Header
		ContentLength    int64
		TransferEncoding []string
		Close            bool
		Uncompressed     bool
		Trailer          http.Header
		NoBody           bool
	}
	of := func(r *http.Response) fields {
		return fields{r.Status, r.StatusCode, r.Proto, r.ProtoMajor, r.ProtoMinor, r.Header, r.ContentLength,
			r.TransferEncoding, r.Close, r.Uncompressed, r.Trailer, r.Body == http.NoBody}
	}
	if g, w := of(got), of(want); !reflect.DeepEqual(g, w) {
		t.Fatalf("%q:\nfast reader: %+v\nnet/http:    %+v", head, g, w)
	}
	if got.Request != req {
		t.Fatalf("%q: the answer's Request is not the request", head)
	}
	if strings.Contains(string(head), "\n\n") {
		t.Fatalf("%q: read with a bare LF", head)
	}
}
