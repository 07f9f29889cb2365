package downstream

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestParseFraming(t *testing.T) {
	cases := []struct {
		name, block string
		want        framing
		bad         string
	}{
		{"no body", "GET / HTTP/1.1\r\nHost: a\r\n\r\n", framing{}, ""},
		{"content-length", "POST / HTTP/1.1\r\nContent-Length: 12\r\n\r\n", framing{length: 12}, ""},
		{"chunked any case", "POST / HTTP/1.1\r\ntransfer-encoding: Chunked\r\n\r\n", framing{chunked: true}, ""},
		{"equal duplicates", "POST / HTTP/1.1\r\nContent-Length: 3\r\ncontent-length: 3\r\n\r\n", framing{length: 3}, ""},
		{"CL and TE", "POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", framing{}, "both Content-Length and Transfer-Encoding"},
		{"differing CL", "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", framing{}, "conflicting Content-Length headers"},
		{"CL list", "POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n", framing{}, "invalid Content-Length"},
		{"negative CL", "POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", framing{}, "invalid Content-Length"},
		{"TE gzip", "POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", framing{}, `unsupported Transfer-Encoding "gzip, chunked"`},
		{"two TE", "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", framing{}, "more than one Transfer-Encoding header"},
		{"space in name", "POST / HTTP/1.1\r\nContent-Length : 3\r\n\r\n", framing{}, `invalid header name "Content-Length "`},
		{"no colon", "POST / HTTP/1.1\r\nContent-Length 3\r\n\r\n", framing{}, "header line without a colon"},
		{"TE in HTTP/1.0", "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", framing{}, "Transfer-Encoding in a request older than HTTP/1.1"},
		{"LF line ends", "POST / HTTP/1.1\nContent-Length: 2\n\n", framing{length: 2}, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, bad := parseFraming([]byte(tc.block))
			if bad != tc.bad || (bad == "" && (got.chunked != tc.want.chunked || got.length != tc.want.length)) {
				t.Fatalf("parseFraming(%q) = %+v, %q; want %+v, %q", tc.block, got, bad, tc.want, tc.bad)
			}
		})
	}
}

func TestParseChunkSize(t *testing.T) {
	for line, want := range map[string]int64{"0": 0, "a": 10, "FF": 255, "10;name=v": 16, "1;x ": 1, "7fffffffffffffff": 1<<63 - 1} {
		if got, ok := ParseChunkSize([]byte(line)); !ok || got != want {
			t.Errorf("ParseChunkSize(%q) = %d, %v; want %d", line, got, ok, want)
		}
	}
	for _, line := range []string{"", "g", "-1", "0x10", "ffffffffffffffff", "12345678901234567"} {
		if got, ok := ParseChunkSize([]byte(line)); ok {
			t.Errorf("ParseChunkSize(%q) = %d, ok; want rejected", line, got)
		}
	}
}

// framedConn runs the framing check over a scripted client stream and
// returns what net/http would read and the verdicts queued.
func framedConn(t *testing.T, input string, readSize int) (string, []Verdict, error) {
	t.Helper()
	client, server := net.Pipe()
	go func() {
		io.WriteString(client, input)
		client.Close()
	}()
	fc := &framingConn{Conn: server, maxHeader: 1 << 16}
	defer fc.Close()
	var out strings.Builder
	buf := make([]byte, readSize)
	var err error
	for {
		var n int
		n, err = fc.Read(buf)
		out.WriteString(string(buf[:n]))
		if err != nil {
			break
		}
	}
	return out.String(), fc.verdicts, err
}

// The check hands net/http the stream unchanged, whatever the read sizes.
func TestFramingConnPassesValidStream(t *testing.T) {
	stream := "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello" +
		"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nT: v\r\n\r\n" +
		"GET /c HTTP/1.1\r\nHost: x\r\n\r\n"
	for _, size := range []int{1, 2, 7, 4096} {
		got, verdicts, err := framedConn(t, stream, size)
		if err != io.EOF || got != stream {
			t.Fatalf("read size %d: got %q, %v; want the stream unchanged and EOF", size, got, err)
		}
		if len(verdicts) != 3 {
			t.Fatalf("read size %d: %d verdicts, want 3", size, len(verdicts))
		}
		for _, v := range verdicts {
			if v.Reason != "" {
				t.Fatalf("read size %d: verdict %q on a valid stream", size, v.Reason)
			}
		}
	}
}

func TestFramingConnReplacesBadBlock(t *testing.T) {
	stream := "GET /a HTTP/1.1\r\nHost: x\r\n\r\n" +
		"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n"
	got, verdicts, _ := framedConn(t, stream, 4096)
	want := "GET /a HTTP/1.1\r\nHost: x\r\n\r\n" + string(placeholder)
	if got != want {
		t.Fatalf("net/http would read %q, want %q", got, want)
	}
	if len(verdicts) != 2 || verdicts[0].Reason != "" || verdicts[1].Reason == "" {
		t.Fatalf("verdicts %+v, want a pass then a rejection", verdicts)
	}
}

func TestFramingConnBadChunk(t *testing.T) {
	got, _, err := framedConn(t, "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\nxy\r\n0\r\n\r\n", 4096)
	if err != ErrBadFraming {
		t.Fatalf("error %v, want ErrBadFraming", err)
	}
	if strings.Contains(got, "2\n") {
		t.Fatalf("the malformed chunk line reached net/http: %q", got)
	}
}

func TestHTTP2PrefacePassesThrough(t *testing.T) {
	preface := "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00"
	got, verdicts, _ := framedConn(t, preface, 3)
	if got != preface || len(verdicts) != 0 {
		t.Fatalf("h2 preface: got %q with %d verdicts, want it unchanged and none", got, len(verdicts))
	}
}

func TestListenPortInUse(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	_, err = Listen("outbound", ln.Addr().String(), http.NotFoundHandler(), Limits{}, nil)
	if err == nil || !strings.Contains(err.Error(), "already in use") || !strings.Contains(err.Error(), ln.Addr().String()) {
		t.Fatalf("Listen on a taken port: %v; want an 'already in use' error naming the address", err)
	}
}

// A body's failure is its own request's cause: not another stream's on an
// HTTP/2 connection, nor another request's on an HTTP/1 one.
func TestCauseIsTheRequestsOwn(t *testing.T) {
	fc := &framingConn{}
	ctx := context.WithValue(context.Background(), connKey{}, fc)
	fc.bodyErr.Store(&bodyFailure{ctx: ctx, err: &ClientError{Err: ErrBadFraming}})
	for _, major := range []int{1, 2} {
		r := (&http.Request{ProtoMajor: major}).WithContext(ctx)
		got := Cause(r, context.Canceled)
		var ce *ClientError
		if isClient := errors.As(got, &ce); isClient != (major == 1) {
			t.Errorf("HTTP/%d: Cause = %v; want the body's error only for HTTP/1", major, got)
		}
	}
	// Another request of the connection (a later one) is not concerned.
	other := (&http.Request{ProtoMajor: 1}).WithContext(context.WithValue(ctx, connKey{}, fc))
	if got := Cause(other, context.Canceled); got != context.Canceled {
		t.Errorf("another request: Cause = %v; want its own context.Canceled", got)
	}
}

// countingConn counts the reads made on a connection.
type countingConn struct {
	net.Conn
	reads int
}

func (c *countingConn) Read(p []byte) (int, error) {
	c.reads++
	return c.Conn.Read(p)
}

// HTTP/2's server reads each frame's 9-byte header and then its payload:
// past the preface, the check serves such small reads from its buffer, so
// that frames that came together cost one read of the connection, not two
// each.
func TestHTTP2SmallReadsAreBuffered(t *testing.T) {
	frame := func(typ byte, payload string) string {
		n := len(payload)
		return string([]byte{byte(n >> 16), byte(n >> 8), byte(n), typ, 0, 0, 0, 0, 1}) + payload
	}
	frames := frame(1, strings.Repeat("h", 40)) + frame(0, strings.Repeat("d", 1000)) + frame(8, "wndw") + frame(6, "pingping")
	stream := "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, "") + frames
	client, server := net.Pipe()
	go func() {
		// The preface first, as a client sends it before its frames.
		io.WriteString(client, stream[:len(stream)-len(frames)])
		io.WriteString(client, frames)
		client.Close()
	}()
	cc := &countingConn{Conn: server}
	fc := &framingConn{Conn: cc, maxHeader: 1 << 16}
	defer fc.Close()
	var out strings.Builder
	for {
		// As http2.Framer: a header, then the payload it announces.
		var head [24]byte
		want := 9
		if out.Len() == 0 {
			want = 24 // the preface
		}
		if _, err := io.ReadFull(fc, head[:want]); err != nil {
			if err != io.EOF {
				t.Fatalf("read: %v", err)
			}
			break
		}
		out.Write(head[:want])
		if want == 9 {
			payload := make([]byte, int(head[0])<<16|int(head[1])<<8|int(head[2]))
			if _, err := io.ReadFull(fc, payload); err != nil {
				t.Fatalf("read payload: %v", err)
			}
			out.Write(payload)
		}
	}
	if out.String() != stream {
		t.Fatalf("read %q, want the stream unchanged", out.String())
	}
	// The preface and the frames each came in one write: a read for the
	// preface, one for the frames, one for the end.
	if cc.reads > 3 {
		t.Fatalf("%d reads of the connection, want 3: the preface, the 4 frames, the end", cc.reads)
	}
}
