package attacktest

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/forward"
)

// This half of the suite turns the table around: the upstream is the
// attacker. An HTTP/1.1 connection carries no request ids, so a proxy that
// reuses a connection holding bytes nobody asked for hands one client's
// answer to another; and a proxy that reads an upstream's answer without
// limits can be made to hold any amount of memory.

// Misbehaviour is one way an upstream breaks HTTP in its answers.
type Misbehaviour struct {
	Name string
	// Class groups them: desync (bytes nobody asked for), hop-by-hop,
	// size, interim, framing, syntax.
	Class string
	// Method is the clients' method; "" is GET, "HEAD/GET" alternates.
	Method string
	// Answer returns what the upstream writes for the request tagged tag:
	// answer, then stray (bytes past the end of the answer, or nothing).
	Answer func(method, tag string) (answer, stray string)
	// Split, when not "", is where the answer is cut in two writes a moment
	// apart, so that its head does not come in one read.
	Split string
	// Bad marks an answer the listener must refuse: 502
	// upstream_bad_response. Otherwise every answer a client gets is its
	// own.
	Bad bool
}

// Hidden is the header an answer's Connection header names (hop-by-hop):
// a client that gets it got what was meant for the listener alone.
const Hidden = "X-Internal"

// Poison is the response stray bytes carry: whoever gets it got an answer
// meant for nobody.
const Poison = "HTTP/1.1 200 OK\r\nX-Tag: poison\r\nContent-Length: 6\r\n\r\nPOISON"

func tagged(status int, tag, extra string) string {
	body := "tag=" + tag
	return fmt.Sprintf("HTTP/1.1 %d %s\r\nX-Tag: %s\r\nContent-Length: %d\r\n%s\r\n%s", status, http.StatusText(status), tag, len(body), extra, body)
}

func headOnly(status int, tag string) string {
	return fmt.Sprintf("HTTP/1.1 %d %s\r\nX-Tag: %s\r\n\r\n", status, http.StatusText(status), tag)
}

// Misbehaviours is the upstream side's table.
func Misbehaviours() []Misbehaviour {
	return []Misbehaviour{
		// desync: the answer is fine, then bytes follow that would be read
		// as the next request's answer.
		{Name: "HEAD answered with a body", Class: "desync", Method: "HEAD/GET", Answer: func(m, tag string) (string, string) {
			if m == http.MethodHead {
				return fmt.Sprintf("HTTP/1.1 200 OK\r\nX-Tag: %s\r\nContent-Length: %d\r\n\r\n", tag, len(Poison)), Poison
			}
			return tagged(200, tag, ""), ""
		}},
		{Name: "body longer than its Content-Length", Class: "desync", Answer: func(_, tag string) (string, string) {
			return tagged(200, tag, ""), "\r\n" + Poison
		}},
		{Name: "unsolicited response", Class: "desync", Answer: func(_, tag string) (string, string) {
			return tagged(200, tag, ""), Poison
		}},
		{Name: "204 with a body", Class: "desync", Answer: func(_, tag string) (string, string) {
			return headOnly(204, tag), Poison
		}},
		{Name: "304 with a body", Class: "desync", Answer: func(_, tag string) (string, string) {
			return headOnly(304, tag), Poison
		}},
		{Name: "bytes after the last chunk", Class: "desync", Answer: func(_, tag string) (string, string) {
			body := "tag=" + tag
			return fmt.Sprintf("HTTP/1.1 200 OK\r\nX-Tag: %s\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n", tag, len(body), body), Poison
		}},
		{Name: "Content-Length and chunked", Class: "framing", Answer: func(_, tag string) (string, string) {
			body := "tag=" + tag
			return fmt.Sprintf("HTTP/1.1 200 OK\r\nX-Tag: %s\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n", tag, len(body), body), Poison
		}},

		// hop-by-hop: the answer names Hidden in its Connection header,
		// however the head comes; the client must not get it.
		{Name: "Connection-named header", Class: "hop-by-hop", Answer: func(_, tag string) (string, string) {
			return tagged(200, tag, "Connection: "+Hidden+"\r\n"+Hidden+": secret\r\n"), ""
		}},
		{Name: "Connection: close and a named header", Class: "hop-by-hop", Answer: func(_, tag string) (string, string) {
			return tagged(200, tag, "Connection: close, "+Hidden+"\r\n"+Hidden+": secret\r\n"), ""
		}},
		{Name: "Connection: close and a named header in an 8 KiB head", Class: "hop-by-hop", Answer: func(_, tag string) (string, string) {
			return tagged(200, tag, "X-Pad: "+strings.Repeat("p", 8<<10)+"\r\nConnection: close, "+Hidden+"\r\n"+Hidden+": secret\r\n"), ""
		}},
		{Name: "Connection: close and a named header in a head split across writes", Class: "hop-by-hop",
			Split: "Connection: close, " + Hidden + "\r\n", Answer: func(_, tag string) (string, string) {
				return tagged(200, tag, "Connection: close, "+Hidden+"\r\n"+Hidden+": secret\r\n"), ""
			}},
		{Name: "Connection: close and a named header on a continuation line", Class: "hop-by-hop", Answer: func(_, tag string) (string, string) {
			return tagged(200, tag, "Connection: close,\r\n "+Hidden+"\r\n"+Hidden+": secret\r\n"), ""
		}},

		// Answers the listener must refuse, closing the connection.
		{Name: "1 MiB header line", Class: "size", Bad: true, Answer: func(_, tag string) (string, string) {
			return tagged(200, tag, bigHeaders().line), ""
		}},
		{Name: "20,000 small headers", Class: "size", Bad: true, Answer: func(_, tag string) (string, string) {
			return tagged(200, tag, bigHeaders().many), ""
		}},
		{Name: "a header line without end", Class: "size", Bad: true, Answer: func(_, tag string) (string, string) {
			return "HTTP/1.1 200 OK\r\nX-Tag: " + tag + "\r\nX-Endless: " + bigHeaders().endless, ""
		}},
		{Name: "100 interim responses", Class: "interim", Bad: true, Answer: func(_, tag string) (string, string) {
			return strings.Repeat("HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n", 100) + tagged(200, tag, ""), ""
		}},
		{Name: "two Content-Lengths", Class: "framing", Bad: true, Answer: func(_, tag string) (string, string) {
			return "HTTP/1.1 200 OK\r\nX-Tag: " + tag + "\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc", ""
		}},
		{Name: "unknown Transfer-Encoding", Class: "framing", Bad: true, Answer: func(_, tag string) (string, string) {
			return "HTTP/1.1 200 OK\r\nX-Tag: " + tag + "\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", ""
		}},
		{Name: "Content-Length not a number", Class: "framing", Bad: true, Answer: func(_, tag string) (string, string) {
			return "HTTP/1.1 200 OK\r\nX-Tag: " + tag + "\r\nContent-Length: 1e3\r\n\r\nabc", ""
		}},
		{Name: "status not a number", Class: "syntax", Bad: true, Answer: func(_, tag string) (string, string) {
			return "HTTP/1.1 2OO OK\r\nX-Tag: " + tag + "\r\nContent-Length: 0\r\n\r\n", ""
		}},
		{Name: "not HTTP at all", Class: "syntax", Bad: true, Answer: func(_, tag string) (string, string) {
			return "SSH-2.0-OpenSSH_9.2\r\n", ""
		}},
		{Name: "header line without a colon", Class: "syntax", Bad: true, Answer: func(_, tag string) (string, string) {
			return "HTTP/1.1 200 OK\r\nX-Tag: " + tag + "\r\nno colon here\r\nContent-Length: 0\r\n\r\n", ""
		}},
	}
}

// bigHeaders are the size cases' headers, built once.
var bigHeaders = sync.OnceValue(func() (h struct{ line, many, endless string }) {
	h.line = "X-Big: " + strings.Repeat("a", 1<<20) + "\r\n"
	var b strings.Builder
	for i := range 20000 {
		b.WriteString("X-H" + strconv.Itoa(i) + ": v\r\n")
	}
	h.many = b.String()
	h.endless = strings.Repeat("b", 2<<20)
	return h
})

// MisbehavingUpstream answers every request with m, writing the answer and
// its stray bytes in one write, or, when Late is set, the stray bytes only
// once the client has its answer (Delivered), reporting them written on
// StrayWritten. Safe for concurrent use.
type MisbehavingUpstream struct {
	m    Misbehaviour
	ln   net.Listener
	wg   sync.WaitGroup
	Late bool
	// Delivered is sent to by the client once it has its answer, when Late.
	Delivered chan struct{}
	// StrayWritten receives after each late write of stray bytes.
	StrayWritten chan struct{}
	answered     atomic.Int64
	conns        atomic.Int64
}

// NewMisbehavingUpstream starts an upstream on loopback that stops when t ends.
func NewMisbehavingUpstream(t testing.TB, m Misbehaviour, late bool) *MisbehavingUpstream {
	t.Helper()
	return newMisbehavingUpstream(t, m, late, nil)
}

// newMisbehavingUpstream is NewMisbehavingUpstream, serving over TLS with
// serverTLS when set (a mesh endpoint's mutual TLS).
func newMisbehavingUpstream(t testing.TB, m Misbehaviour, late bool, serverTLS *tls.Config) *MisbehavingUpstream {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if serverTLS != nil {
		ln = tls.NewListener(ln, serverTLS)
	}
	u := &MisbehavingUpstream{m: m, ln: ln, Late: late, Delivered: make(chan struct{}), StrayWritten: make(chan struct{})}
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
func (u *MisbehavingUpstream) Addr() string { return u.ln.Addr().String() }

func (u *MisbehavingUpstream) serve(c net.Conn) {
	br := bufio.NewReader(c)
	for {
		req, err := http.ReadRequest(br)
		if err != nil {
			return
		}
		_, _ = io.Copy(io.Discard, req.Body)
		answer, stray := u.m.Answer(req.Method, req.Header.Get("X-Tag"))
		u.answered.Add(1)
		if i := strings.Index(answer, u.m.Split); u.m.Split != "" && i >= 0 {
			i += len(u.m.Split)
			if _, err := io.WriteString(c, answer[:i]); err != nil {
				return
			}
			time.Sleep(5 * time.Millisecond) // for the listener to read the first part alone
			answer = answer[i:]
		}
		if !u.Late || stray == "" {
			if _, err := io.WriteString(c, answer+stray); err != nil {
				return
			}
			continue
		}
		if _, err := io.WriteString(c, answer); err != nil {
			return
		}
		<-u.Delivered
		_, err = io.WriteString(c, stray)
		u.StrayWritten <- struct{}{}
		if err != nil {
			return
		}
	}
}

// Tally counts what the clients got.
type Tally struct {
	Own        int // answers carrying the client's own tag
	Mismatch   int // answers carrying another tag, or the poison
	Bad        int // 502 upstream_bad_response
	Other      int // anything else (another local error, a failed request)
	Leaked     int // answers carrying Hidden, whatever else they are
	FirstMiss  string
	FirstOther string
}

func (t Tally) String() string {
	s := fmt.Sprintf("own %d, mismatched %d, upstream_bad_response %d, other %d, %s leaked %d", t.Own, t.Mismatch, t.Bad, t.Other, Hidden, t.Leaked)
	if t.FirstOther != "" {
		s += " (first other: " + t.FirstOther + ")"
	}
	return s
}

// Call sends one tagged request through the listener at addr with client
// and tallies the answer.
func Call(client *http.Client, addr, method, tag string, tl *Tally, mu *sync.Mutex) {
	req, _ := http.NewRequest(method, "http://"+addr+"/t/"+tag, nil)
	req.Host = "svc"
	req.Header.Set("X-Tag", tag)
	resp, err := client.Do(req)
	var body []byte
	if err == nil {
		body, err = io.ReadAll(resp.Body)
		resp.Body.Close()
	}
	mu.Lock()
	defer mu.Unlock()
	if err == nil && resp.Header.Get(Hidden) != "" {
		tl.Leaked++
	}
	switch {
	case err != nil:
		tl.Other++
		if tl.FirstOther == "" {
			tl.FirstOther = err.Error()
		}
	case resp.Header.Get(forward.ErrorHeader) == "upstream_bad_response" && resp.StatusCode == http.StatusBadGateway:
		tl.Bad++
	case resp.Header.Get(forward.ErrorHeader) != "":
		tl.Other++
		if tl.FirstOther == "" {
			tl.FirstOther = fmt.Sprintf("%d %s %.200s", resp.StatusCode, resp.Header.Get(forward.ErrorHeader), body)
		}
	case resp.Header.Get("X-Tag") != tag || (method == http.MethodGet && resp.StatusCode == 200 && string(body) != "tag="+tag):
		tl.Mismatch++
		if tl.FirstMiss == "" {
			tl.FirstMiss = fmt.Sprintf("%s for tag %s: %d X-Tag %q body %.40q", method, tag, resp.StatusCode, resp.Header.Get("X-Tag"), body)
		}
	default:
		tl.Own++
	}
}

// RunUpstream holds a listener to the upstream table: start must return the
// address of a listener whose upstream (service "svc" on the outbound, the
// app on the inbound) is at upstreamAddr. For each misbehaviour it runs
// clients × perClient tagged requests at once, stray bytes written with the
// answer, and then a sequence of requests whose stray bytes arrive once the
// client has its answer; no client may ever get another's answer, and a Bad
// answer must be refused with 502 upstream_bad_response every time.
func RunUpstream(t *testing.T, l Listener, start func(t *testing.T, upstreamAddr string) string, clients, perClient int) {
	RunUpstreamTLS(t, l, nil, start, clients, perClient)
}

// RunUpstreamTLS is RunUpstream with the misbehaving upstreams serving over
// TLS with serverTLS (nil: plaintext): the table as a mesh endpoint plays
// it, its stray bytes reaching the listener's connection as TLS records.
func RunUpstreamTLS(t *testing.T, l Listener, serverTLS *tls.Config, start func(t *testing.T, upstreamAddr string) string, clients, perClient int) {
	for _, m := range Misbehaviours() {
		t.Run(m.Class+"/"+m.Name, func(t *testing.T) {
			u := newMisbehavingUpstream(t, m, false, serverTLS)
			addr := start(t, u.Addr())
			tr := &http.Transport{MaxIdleConnsPerHost: clients, DisableCompression: true}
			defer tr.CloseIdleConnections()
			client := &http.Client{Transport: tr, Timeout: 10 * time.Second}
			n := perClient
			switch {
			case m.Bad:
				n = min(n, 10) // each is refused the same way; the large ones are slow to send
			case m.Class == "hop-by-hop":
				n = min(n, 25) // most close their connection: one dial per answer
			}
			var tl Tally
			var mu sync.Mutex
			var wg sync.WaitGroup
			for c := range clients {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := range n {
						Call(client, addr, method(m, i), strconv.Itoa(c)+"-"+strconv.Itoa(i), &tl, &mu)
					}
				}()
			}
			wg.Wait()
			total := clients * n
			t.Logf("upstream attack: %s: %s: %s: %s (%d upstream connections for %d answers)", l, m.Class, m.Name, tl, u.conns.Load(), u.answered.Load())
			check(t, m, tl, total)
			if c, a := u.conns.Load(), u.answered.Load(); m.Bad && c != a {
				t.Errorf("%d upstream connections for %d refused answers; want one each (a connection that carried a refused answer is closed, never reused)", c, a)
			}

			if m.Bad || t.Failed() {
				return
			}
			// The stray bytes come once the client has its answer, before
			// the next request: only a check at reuse sees them.
			lu := newMisbehavingUpstream(t, m, true, serverTLS)
			laddr := start(t, lu.Addr())
			var seq Tally
			for i := range 20 {
				mth := method(m, i)
				Call(client, laddr, mth, "late-"+strconv.Itoa(i), &seq, &mu)
				if _, stray := m.Answer(mth, ""); stray != "" {
					select {
					case lu.Delivered <- struct{}{}:
						<-lu.StrayWritten
					case <-time.After(10 * time.Second):
						t.Fatalf("request %d never reached the upstream: %s", i, seq)
					}
				}
			}
			t.Logf("upstream attack: %s: %s: %s, stray bytes late: %s", l, m.Class, m.Name, seq)
			check(t, m, seq, 20)
		})
	}
}

func method(m Misbehaviour, i int) string {
	switch {
	case m.Method == "HEAD/GET" && i%2 == 0:
		return http.MethodHead
	case m.Method == "" || m.Method == "HEAD/GET":
		return http.MethodGet
	}
	return m.Method
}

func check(t *testing.T, m Misbehaviour, tl Tally, total int) {
	t.Helper()
	if tl.Mismatch != 0 {
		t.Errorf("%d of %d clients got an answer that was not theirs; first: %s", tl.Mismatch, total, tl.FirstMiss)
	}
	if tl.Leaked != 0 {
		t.Errorf("%d of %d clients got %s, named in the upstream's Connection header", tl.Leaked, total, Hidden)
	}
	if m.Bad && tl.Bad != total {
		t.Errorf("%s; want all %d answered 502 upstream_bad_response", tl, total)
	}
	if !m.Bad && tl.Own != total {
		t.Errorf("%s; want all %d answered with their own answer", tl, total)
	}
}
