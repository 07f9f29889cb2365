package attacktest

import (
	"bytes"
	"io"
	"net"
	"strconv"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/sidecar-mesh/sidecar/pkg/forward"
)

// H2Case is one HTTP/2 request made of header fields no client library
// would send: net/http's HTTP/2 server checks less than its HTTP/1 one
// (methods, :authority), so the listener must.
type H2Case struct {
	Name string
	// Fields are the request's header fields, pseudo-fields first; ":method",
	// ":scheme", ":authority" and ":path" default to GET, http, svc and /.
	Fields [][2]string
	// Out and In are the status each listener answers; 0: the stream or
	// connection is reset without an answer. Forwarded is implied: a 200
	// reached the Upstream, anything else did not.
	Out, In int
	// GoAnswers marks a request net/http's HTTP/2 server refuses itself,
	// before any handler: its 400 has no x-sidecar-error.
	GoAnswers bool
}

// H2Cases is the HTTP/2 table.
func H2Cases() []H2Case {
	return []H2Case{
		{Name: "method with a space and a path", Fields: [][2]string{{":method", "GET /admin?x="}}, Out: 400, In: 400},
		{Name: "method with a tab", Fields: [][2]string{{":method", "GET\tX"}}, Out: 400, In: 400},
		{Name: "authority with a Consul path", Fields: [][2]string{{":authority", "a/../../../kv/sidecar/policies/web"}}, Out: 400, In: 400},
		{Name: "authority with a space", Fields: [][2]string{{":authority", "svc evil"}}, Out: 400, In: 400},
		{Name: "authority percent-encoded", Fields: [][2]string{{":authority", "svc%2f..%2fkv"}}, Out: 400, In: 200},
		{Name: "transfer_encoding lookalike", Fields: [][2]string{{"transfer_encoding", "chunked"}}, Out: 400, In: 400},
		{Name: "content_length lookalike", Fields: [][2]string{{"content_length", "0"}}, Out: 400, In: 400},
		{Name: "x_forwarded_for lookalike", Fields: [][2]string{{"x_forwarded_for", "10.0.0.1"}}, Out: 400, In: 400},
		{Name: "keep_alive lookalike", Fields: [][2]string{{"keep_alive", "5"}}, Out: 400, In: 400},
		{Name: "connection field", Fields: [][2]string{{"connection", "keep-alive"}}, Out: 400, In: 400, GoAnswers: true},
		{Name: "te other than trailers", Fields: [][2]string{{"te", "gzip"}}, Out: 400, In: 400, GoAnswers: true},
		{Name: "path with a request line in its query", Fields: [][2]string{{":path", "/public?x /admin HTTP/1.1"}}, Out: 400, In: 400},
		{Name: "path with a fragment", Fields: [][2]string{{":path", "/a?b#frag"}}, Out: 400, In: 400},
		{Name: "path with a tab", Fields: [][2]string{{":path", "/a\tb"}}, Out: 0, In: 0}, // net/http resets the stream itself
		{Name: "path with a byte past ASCII", Fields: [][2]string{{":path", "/caf\xc3\xa9"}}, Out: 400, In: 400},
		{Name: "path * for GET", Fields: [][2]string{{":path", "*"}}, Out: 400, In: 400},
		{Name: "well-formed", Out: 200, In: 200},
		{Name: "well-formed with an escaped query", Fields: [][2]string{{":path", "/a?q=x%20y&r=%23"}}, Out: 200, In: 200},
	}
}

// RunH2 sends every H2Case to tg on its own connection and checks the
// status and that only the requests answered 200 reached the Upstream.
func RunH2(t *testing.T, tg Target) {
	for _, c := range H2Cases() {
		t.Run(c.Name, func(t *testing.T) {
			want := c.Out
			if tg.Listener == Inbound {
				want = c.In
			}
			before := len(tg.Upstream.Requests())
			status, reason := H2Exchange(t, tg.Addr, c.Fields)
			got := len(tg.Upstream.Requests()) - before
			t.Logf("h2 attack: %s: %s: status %d %s, forwarded %d", tg.Listener, c.Name, status, orNone(reason), got)
			if status != want {
				t.Errorf("%s: status %d, want %d", tg.Listener, status, want)
			}
			// The sidecar's own 400, not an upstream's answer to what was
			// forwarded.
			if want == 400 && !c.GoAnswers && reason != forward.ReasonBadRequest {
				t.Errorf("%s: x-sidecar-error %q, want %q", tg.Listener, reason, forward.ReasonBadRequest)
			}
			if wantFwd := btoi(want == 200); got != wantFwd {
				t.Errorf("%s: the upstream received %d requests, want %d", tg.Listener, got, wantFwd)
			}
		})
	}
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// H2Exchange sends one request with fields on a new h2c connection and
// returns the answer's status and x-sidecar-error, status 0 when the
// stream or connection ended without an answer.
func H2Exchange(t *testing.T, addr string, fields [][2]string) (status int, reason string) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	fr := http2.NewFramer(c, c)
	if err := fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	pseudo := map[string]string{":method": "GET", ":scheme": "http", ":authority": "svc", ":path": "/"}
	var regular [][2]string
	for _, f := range fields {
		if _, ok := pseudo[f[0]]; ok {
			pseudo[f[0]] = f[1]
		} else {
			regular = append(regular, f)
		}
	}
	var buf bytes.Buffer
	enc := hpack.NewEncoder(&buf)
	for _, name := range []string{":method", ":scheme", ":authority", ":path"} {
		_ = enc.WriteField(hpack.HeaderField{Name: name, Value: pseudo[name]})
	}
	for _, f := range regular {
		_ = enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
	}
	if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: buf.Bytes(), EndStream: true, EndHeaders: true}); err != nil {
		t.Fatal(err)
	}
	dec := hpack.NewDecoder(4096, func(hf hpack.HeaderField) {
		switch hf.Name {
		case ":status":
			status, _ = strconv.Atoi(hf.Value)
		case "x-sidecar-error":
			reason = hf.Value
		}
	})
	for status == 0 {
		frame, err := fr.ReadFrame()
		if err != nil {
			return 0, ""
		}
		switch f := frame.(type) {
		case *http2.HeadersFrame:
			if f.StreamID == 1 {
				_, _ = dec.Write(f.HeaderBlockFragment())
			}
		case *http2.RSTStreamFrame:
			if f.StreamID == 1 {
				return 0, ""
			}
		case *http2.GoAwayFrame:
			return 0, ""
		case *http2.SettingsFrame:
			if !f.IsAck() {
				_ = fr.WriteSettingsAck()
			}
		}
	}
	return status, reason
}
