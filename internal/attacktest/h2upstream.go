package attacktest

import (
	"bytes"
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// H2Misbehaviour is one way an HTTP/2 upstream breaks the limits on
// answers. Requests that come in over HTTP/2 go upstream over HTTP/2, where
// x/net/http2, not the sidecar's own reader, reads the answer: the limits
// must hold there too.
type H2Misbehaviour struct {
	Name string
	// Interim is the number of 103 responses sent before the final one.
	Interim int
	// Fields are the final response's header fields after :status and
	// x-tag, each sent whole (never indexed).
	Fields [][2]string
	// Indexed are more, indexed: a field sent again costs a byte.
	Indexed [][2]string
	// Status is the final response's :status; "": 200.
	Status string
	// Bad marks an answer the listener must refuse with 502
	// upstream_bad_response, resetting the stream.
	Bad bool
	// Whole marks a Bad answer refused once it had come whole: there is
	// no stream left to reset.
	Whole bool
}

// H2Misbehaviours is the HTTP/2 upstream table.
func H2Misbehaviours() []H2Misbehaviour {
	many := make([][2]string, 2000)
	for i := range many {
		many[i] = [2]string{"x-h" + strconv.Itoa(i), strings.Repeat("v", 100)}
	}
	return []H2Misbehaviour{
		{Name: "well-formed"},
		{Name: "three interim responses", Interim: 3},
		{Name: "1 MiB header field in HEADERS and CONTINUATION frames", Bad: true,
			Fields: [][2]string{{"x-big", strings.Repeat("a", 1<<20)}}},
		{Name: "2,000 header fields of 100 bytes", Bad: true, Fields: many},
		{Name: "100 KiB header list from one frame by HPACK indexing", Bad: true,
			Indexed: slices.Repeat([][2]string{{"x-rep", strings.Repeat("r", 4000)}}, 25)},
		{Name: "100 interim responses", Interim: 100, Bad: true},
		{Name: ":status of four digits", Status: "2000", Bad: true, Whole: true},
		{Name: ":status of one digit", Status: "2", Bad: true, Whole: true},
	}
}

// H2MisbehavingUpstream speaks h2c with prior knowledge through a raw
// framer, answering every request with m, and counts the streams the
// listener reset. Safe for concurrent use.
type H2MisbehavingUpstream struct {
	m        H2Misbehaviour
	ln       net.Listener
	wg       sync.WaitGroup
	answered atomic.Int64
	resets   atomic.Int64 // streams the listener reset
	dropped  atomic.Int64 // streams open when the listener closed their connection
	conns    atomic.Int64
}

// NewH2MisbehavingUpstream starts an upstream on loopback that stops when t
// ends.
func NewH2MisbehavingUpstream(t testing.TB, m H2Misbehaviour) *H2MisbehavingUpstream {
	t.Helper()
	return newH2MisbehavingUpstream(t, m, nil)
}

// newH2MisbehavingUpstream is NewH2MisbehavingUpstream, serving over TLS
// with serverTLS when set (ALPN h2: a mesh endpoint's).
func newH2MisbehavingUpstream(t testing.TB, m H2Misbehaviour, serverTLS *tls.Config) *H2MisbehavingUpstream {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if serverTLS != nil {
		ln = tls.NewListener(ln, serverTLS)
	}
	u := &H2MisbehavingUpstream{m: m, ln: ln}
	var mu sync.Mutex // guards conns
	conns := map[net.Conn]bool{}
	u.wg.Add(1)
	go func() {
		defer u.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns[c] = true
			mu.Unlock()
			u.conns.Add(1)
			u.wg.Add(1)
			go func() {
				defer u.wg.Done()
				u.serve(c)
				mu.Lock()
				delete(conns, c)
				mu.Unlock()
				c.Close()
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		u.wg.Wait()
	})
	return u
}

// Addr is the upstream's host:port.
func (u *H2MisbehavingUpstream) Addr() string { return u.ln.Addr().String() }

func (u *H2MisbehavingUpstream) serve(c net.Conn) {
	preface := make([]byte, len(http2.ClientPreface))
	if _, err := io.ReadFull(c, preface); err != nil || string(preface) != http2.ClientPreface {
		return
	}
	fr := http2.NewFramer(c, c)
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	if err := fr.WriteSettings(); err != nil {
		return
	}
	var block bytes.Buffer
	enc := hpack.NewEncoder(&block)
	open := map[uint32]bool{} // streams answered and neither ended nor reset by the listener
	defer func() { u.dropped.Add(int64(len(open))) }()
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
		case *http2.RSTStreamFrame:
			if open[f.StreamID] {
				u.resets.Add(1)
				delete(open, f.StreamID)
			}
		case *http2.GoAwayFrame:
			return
		case *http2.MetaHeadersFrame:
			u.answered.Add(1)
			if u.m.Bad {
				open[f.StreamID] = true
			}
			err = u.answer(fr, enc, &block, f.StreamID, headerValue(f, "x-tag"))
		}
		if err != nil {
			return
		}
	}
}

func headerValue(f *http2.MetaHeadersFrame, name string) string {
	for _, hf := range f.RegularFields() {
		if hf.Name == name {
			return hf.Value
		}
	}
	return ""
}

// answer writes m's answer on stream id: the interim responses, then the
// final head, cut into CONTINUATION frames when it is larger than a frame,
// then the body.
func (u *H2MisbehavingUpstream) answer(fr *http2.Framer, enc *hpack.Encoder, block *bytes.Buffer, id uint32, tag string) error {
	for range u.m.Interim {
		block.Reset()
		_ = enc.WriteField(hpack.HeaderField{Name: ":status", Value: "103"})
		_ = enc.WriteField(hpack.HeaderField{Name: "link", Value: "</a.css>; rel=preload"})
		if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: block.Bytes(), EndHeaders: true}); err != nil {
			return err
		}
	}
	body := "tag=" + tag
	block.Reset()
	status := u.m.Status
	if status == "" {
		status = "200"
	}
	_ = enc.WriteField(hpack.HeaderField{Name: ":status", Value: status})
	_ = enc.WriteField(hpack.HeaderField{Name: "x-tag", Value: tag})
	_ = enc.WriteField(hpack.HeaderField{Name: "content-length", Value: strconv.Itoa(len(body))})
	for _, f := range u.m.Fields {
		_ = enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1], Sensitive: true})
	}
	for _, f := range u.m.Indexed {
		_ = enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
	}
	const maxFrame = 16 << 10 // the least SETTINGS_MAX_FRAME_SIZE a peer may ask for
	b := block.Bytes()
	first := b[:min(len(b), maxFrame)]
	b = b[len(first):]
	if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: first, EndHeaders: len(b) == 0}); err != nil {
		return err
	}
	for len(b) > 0 {
		chunk := b[:min(len(b), maxFrame)]
		b = b[len(chunk):]
		if err := fr.WriteContinuation(id, len(b) == 0, chunk); err != nil {
			return err
		}
	}
	return fr.WriteData(id, true, []byte(body))
}

// h2cClient speaks h2c with prior knowledge to the listener at addr.
func h2cClient(addr string) (*http.Client, func()) {
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	tr := &http.Transport{Protocols: &p, DisableCompression: true,
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, addr)
		}}
	return &http.Client{Transport: tr, Timeout: 10 * time.Second}, tr.CloseIdleConnections
}

// RunH2Upstream holds a listener to the HTTP/2 upstream table, as
// RunUpstream does to the HTTP/1.1 one: clients × perClient tagged
// requests over h2c, each answered by the upstream with m. Every Bad answer
// must be refused with 502 upstream_bad_response and its stream reset or
// its connection closed;
// every other answer must reach its own client.
func RunH2Upstream(t *testing.T, l Listener, start func(t *testing.T, upstreamAddr string) string, clients, perClient int) {
	RunH2UpstreamTLS(t, l, nil, start, clients, perClient)
}

// RunH2UpstreamTLS is RunH2Upstream with the upstreams serving HTTP/2 over
// TLS with serverTLS (nil: h2c), as mesh endpoints do.
func RunH2UpstreamTLS(t *testing.T, l Listener, serverTLS *tls.Config, start func(t *testing.T, upstreamAddr string) string, clients, perClient int) {
	for _, m := range H2Misbehaviours() {
		t.Run("h2/"+m.Name, func(t *testing.T) {
			u := newH2MisbehavingUpstream(t, m, serverTLS)
			addr := start(t, u.Addr())
			client, closeIdle := h2cClient(addr)
			defer closeIdle()
			n := perClient
			if m.Bad {
				n = min(n, 10) // each is refused the same way; the large ones are slow to send
			}
			var tl Tally
			var mu sync.Mutex
			var wg sync.WaitGroup
			for c := range clients {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := range n {
						Call(client, addr, http.MethodGet, strconv.Itoa(c)+"-"+strconv.Itoa(i), &tl, &mu)
					}
				}()
			}
			wg.Wait()
			total := clients * n
			t.Logf("h2 upstream attack: %s: %s: %s (%d upstream connections, %d answers, %d streams reset, %d dropped with their connection)",
				l, m.Name, tl, u.conns.Load(), u.answered.Load(), u.resets.Load(), u.dropped.Load())
			check(t, Misbehaviour{Bad: m.Bad}, tl, total)
			if !m.Bad || m.Whole {
				return
			}
			// The reset or close may come after the 502: wait for it.
			ended := func() int64 { return u.resets.Load() + u.dropped.Load() }
			deadline := time.Now().Add(5 * time.Second)
			for ended() < u.answered.Load() && time.Now().Before(deadline) {
				time.Sleep(10 * time.Millisecond)
			}
			if e, a := ended(), u.answered.Load(); e != a {
				t.Errorf("of the %d refused streams the upstream answered, %d were reset or closed with their connection; want all", a, e)
			}
		})
	}
}
