// Package attacktest is the attack suite both proxy listeners are held to:
// one table (Cases) of raw HTTP/1.1 requests a hostile or broken client
// sends (request smuggling, malformed framing, oversized and slow
// requests, hop-by-hop abuse, SSRF through Host headers and absolute-form
// URLs, IP literals, CONNECT) with the answer each listener must give and
// how many requests may reach what is behind it. pkg/outbound and
// pkg/inbound run the table against their listeners on loopback (Run), in
// front of a counting Upstream, with a Decoy that nothing may ever reach.
package attacktest

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/downstream"
	"github.com/sidecar-mesh/sidecar/pkg/forward"
)

// Limits are the listener limits Run expects: timeouts short enough that
// the slow clients of the table are cut off within the test.
var Limits = downstream.Limits{ReadHeaderTimeout: 300 * time.Millisecond, BodyReadTimeout: 300 * time.Millisecond}

// Listener names the listener under attack.
type Listener int

const (
	// Outbound is the app's outbound port (15001): it routes by service
	// name; Run's service "svc" is the Upstream.
	Outbound Listener = iota
	// Inbound is the inbound port (15006): every request goes to the app,
	// the Upstream, whatever its Host.
	Inbound
)

func (l Listener) String() string {
	if l == Inbound {
		return "inbound"
	}
	return "outbound"
}

// Request is what the Upstream received.
type Request struct {
	Method, URI, Host string
	Header            http.Header
	Body              string
	// Complete is set once the body was read to its end without error.
	Complete bool
}

// Upstream is a real HTTP server on loopback that records every request it
// is handed and answers 200 "upstream". Safe for concurrent use.
type Upstream struct {
	srv *httptest.Server
	mu  sync.Mutex // guards got
	got []*Request
}

// NewUpstream starts an Upstream that stops when t ends.
func NewUpstream(t testing.TB) *Upstream {
	t.Helper()
	u := &Upstream{}
	u.srv = httptest.NewServer(http.HandlerFunc(u.serve))
	t.Cleanup(u.srv.Close)
	return u
}

func (u *Upstream) serve(w http.ResponseWriter, r *http.Request) {
	if r.Method == "PRI" && r.RequestURI == "*" {
		// The transport's HTTP/2 preface, which net/http's HTTP/1 server
		// hands on as a request: no request of a client's.
		w.WriteHeader(http.StatusHTTPVersionNotSupported)
		return
	}
	req := &Request{Method: r.Method, URI: r.RequestURI, Host: r.Host, Header: r.Header.Clone()}
	u.mu.Lock()
	u.got = append(u.got, req)
	u.mu.Unlock()
	body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	u.mu.Lock()
	req.Body, req.Complete = string(body), err == nil
	u.mu.Unlock()
	if err != nil {
		return
	}
	_, _ = io.WriteString(w, "upstream")
}

// Addr is the Upstream's host:port.
func (u *Upstream) Addr() string { return u.srv.Listener.Addr().String() }

// Requests returns copies of the requests received so far, in order.
func (u *Upstream) Requests() []Request {
	u.mu.Lock()
	defer u.mu.Unlock()
	out := make([]Request, len(u.got))
	for i, r := range u.got {
		out[i] = *r
	}
	return out
}

// Want is one listener's expected answer to a Case.
type Want struct {
	// Status of the first response; 0: the connection is closed without
	// any response.
	Status int
	// Reason is the x-sidecar-error header of the first response; ""
	// requires it absent (net/http itself or the upstream answered).
	Reason string
	// Responses is how many responses come back before the connection
	// ends; 0 means 1 (none when Status is 0).
	Responses int
	// Forwarded is how many requests the Upstream received complete.
	Forwarded int
	// Partial allows one request to reach the Upstream with its body cut
	// short (a streamed body whose client stalled): never complete.
	Partial bool
	// Check inspects the requests the Upstream received for the case and
	// says what is wrong, or "".
	Check func(got []Request, tg Target) string
}

// Step is one write of a slow client, followed by a pause.
type Step struct {
	Write string
	Pause time.Duration
}

// Case is one attack and what each listener must answer.
type Case struct {
	Name string
	// Class groups cases: smuggling, framing, bare-lf, obs-fold, size,
	// slow, hop-by-hop, ssrf, connect.
	Class string
	// Request is written at once. "{decoy}", "{decoyip}" and
	// "{decoyport}" stand for the Decoy's address.
	Request string
	// Steps, when set, are written instead of Request, each followed by
	// its pause.
	Steps   []Step
	Out, In Want
}

// Target is a listener under attack.
type Target struct {
	Listener Listener
	// Addr is the listener's host:port.
	Addr string
	// Upstream is behind the listener: the service "svc" (outbound) or
	// the app (inbound).
	Upstream *Upstream
	// Decoy must never receive a request: the cases aim at its address.
	Decoy *Upstream
	// Added maps the headers the listener adds to every forwarded request
	// to their values; no client header may remove them.
	Added map[string]string
}

// Result is one case's outcome on a listener, for the suite's report.
type Result struct {
	Case      string
	Class     string
	Status    int
	Reason    string
	Responses int
	Forwarded int
}

// Run runs every case against tg, each as a subtest, then checks that the
// Decoy saw nothing, that no smuggled request reached the Upstream, and
// that the Upstream's count is the sum of the cases'. It logs one line per
// case: "attack: <listener>: <class>: <case>: <status> <reason>,
// forwarded N".
func Run(t *testing.T, tg Target) {
	want := 0
	for _, c := range Cases() {
		w := c.want(tg.Listener)
		want += w.Forwarded
		t.Run(c.Class+"/"+c.Name, func(t *testing.T) {
			res := c.run(t, tg, w)
			t.Logf("attack: %s: %s: %s: %d %s, forwarded %d", tg.Listener, c.Class, c.Name, res.Status, orNone(res.Reason), res.Forwarded)
		})
	}
	// A request smuggled past the listener would arrive after the answers.
	time.Sleep(100 * time.Millisecond)
	if got := tg.Decoy.Requests(); len(got) != 0 {
		t.Errorf("the decoy received %d requests, want 0: first %s %s Host %s", len(got), got[0].Method, got[0].URI, got[0].Host)
	}
	complete := 0
	for _, r := range tg.Upstream.Requests() {
		if strings.Contains(r.URI, "smuggled") {
			t.Errorf("a smuggled request reached the upstream: %s %s", r.Method, r.URI)
		}
		if r.Complete {
			complete++
		}
	}
	if complete != want {
		t.Errorf("the upstream received %d complete requests over the suite, the table allows %d", complete, want)
	}
}

func orNone(s string) string {
	if s == "" {
		return "(no x-sidecar-error)"
	}
	return s
}

func (c Case) want(l Listener) Want {
	if l == Inbound {
		return c.In
	}
	return c.Out
}

// run sends the case on a new connection, reads every response until the
// connection ends, and checks them and the Upstream against w.
func (c Case) run(t *testing.T, tg Target, w Want) Result {
	t.Helper()
	repl := strings.NewReplacer("{decoy}", tg.Decoy.Addr(), "{decoyip}", host(tg.Decoy.Addr()), "{decoyport}", port(tg.Decoy.Addr()))
	steps := c.Steps
	if steps == nil {
		steps = []Step{{Write: c.Request}}
	}
	before := len(tg.Upstream.Requests())
	conn, err := net.Dial("tcp", tg.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	wrote := make(chan struct{})
	go func() {
		defer close(wrote)
		for _, s := range steps {
			// A write after the listener gave up fails: that is the point.
			if _, err := io.WriteString(conn, repl.Replace(s.Write)); err != nil {
				return
			}
			if s.Pause > 0 {
				time.Sleep(s.Pause) // the slow client's own pace
			}
		}
	}()
	var resps []*http.Response
	br := bufio.NewReader(conn)
	var readErr error
	for {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			readErr = err
			break
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		resps = append(resps, resp)
	}
	<-wrote
	if errors.Is(readErr, os.ErrDeadlineExceeded) {
		t.Errorf("the connection was still open after 10s (%d responses)", len(resps))
	}

	if w.Partial {
		// The cut-off request reaches the upstream on its own time.
		time.Sleep(200 * time.Millisecond)
	}
	res := Result{Case: c.Name, Class: c.Class, Responses: len(resps)}
	if len(resps) > 0 {
		res.Status, res.Reason = resps[0].StatusCode, resps[0].Header.Get(forward.ErrorHeader)
	}
	got := tg.Upstream.Requests()[before:]
	partial := 0
	for _, r := range got {
		if r.Complete {
			res.Forwarded++
		} else {
			partial++
		}
	}
	wantResponses := w.Responses
	if wantResponses == 0 && w.Status != 0 {
		wantResponses = 1
	}
	if res.Status != w.Status || res.Reason != w.Reason || res.Responses != wantResponses {
		t.Errorf("%s: got %d responses, the first %d x-sidecar-error %q; want %d, the first %d %q",
			tg.Listener, res.Responses, res.Status, res.Reason, wantResponses, w.Status, w.Reason)
	}
	if res.Forwarded != w.Forwarded {
		t.Errorf("%s: the upstream received %d complete requests, want %d: %s", tg.Listener, res.Forwarded, w.Forwarded, describe(got))
	}
	if partial > 1 || (partial == 1 && !w.Partial) {
		t.Errorf("%s: the upstream received %d requests with their body cut short: %s", tg.Listener, partial, describe(got))
	}
	if w.Check != nil {
		if msg := w.Check(got, tg); msg != "" {
			t.Errorf("%s: %s", tg.Listener, msg)
		}
	}
	return res
}

func describe(rs []Request) string {
	var b strings.Builder
	for i, r := range rs {
		if i > 0 {
			b.WriteString("; ")
		}
		fmt.Fprintf(&b, "%s %s Host %q body %.20q complete %v", r.Method, r.URI, r.Host, r.Body, r.Complete)
	}
	if b.Len() == 0 {
		return "none"
	}
	return b.String()
}

func host(addr string) string { h, _, _ := net.SplitHostPort(addr); return h }
func port(addr string) string { _, p, _ := net.SplitHostPort(addr); return p }
