package forward_test

import (
	"bufio"
	"io"
	"net/http"
	"net/http/httptest"
	"net/textproto"
	"slices"
	"strings"
	"testing"

	"github.com/sidecar-mesh/sidecar/internal/attacktest"
	"github.com/sidecar-mesh/sidecar/pkg/forward"
)

// hopByHop are the headers that never cross a proxy (RFC 9110 7.6.1, and
// the ones net/http/httputil drops).
var hopByHop = []string{"Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate",
	"Proxy-Authorization", "Te", "Trailer", "Transfer-Encoding", "Upgrade"}

// added is what an observer (the inbound tracing one) adds to a request
// before it is forwarded.
var added = map[string]string{"Traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "X-Sidecar-Test": "kept"}

// FuzzForwardHeaders holds the header sanitizer to its job, on both the
// request going upstream and the response coming back, for any header
// blocks a client and an upstream send:
//   - no hop-by-hop header crosses, except the Connection/Upgrade pair of
//     a protocol upgrade (never h2c) and "TE: trailers";
//   - no header the Connection header names crosses, unless the sidecar
//     itself sets it (X-Forwarded-*) or an observer added it after
//     RemoveConnectionOptions;
//   - X-Forwarded-For ends with the client's address, X-Forwarded-Proto
//     is "http";
//   - every other header crosses unchanged;
//   - RemoveConnectionOptions is idempotent.
func FuzzForwardHeaders(f *testing.F) {
	for _, s := range attacktest.Seeds() {
		_, block, _ := strings.Cut(s.Request, "\r\n")
		f.Add(block, "Connection: X-Up, close\r\nX-Up: 1\r\nKeep-Alive: timeout=5\r\nContent-Type: text/plain\r\n\r\n")
	}
	f.Add("Connection: Upgrade\r\nUpgrade: websocket\r\nTE: trailers, deflate\r\n\r\n", "Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
	f.Add("Connection: te, traceparent, connection\r\nTe: trailers\r\nX-A: 1\r\nX-Forwarded-Host: h\r\n\r\n", "Trailer: X-T\r\nProxy-Connection: x\r\n\r\n")
	f.Fuzz(func(t *testing.T, reqBlock, respBlock string) {
		reqH, ok := parseBlock(reqBlock)
		if !ok {
			return
		}
		respH, ok := parseBlock(respBlock)
		if !ok {
			return
		}
		orig := reqH.Clone()
		delete(orig, "Expect") // the sidecar sends the body at once and drops it

		once := reqH.Clone()
		forward.RemoveConnectionOptions(once)
		twice := once.Clone()
		forward.RemoveConnectionOptions(twice)
		if !equalHeaders(once, twice) {
			t.Fatalf("RemoveConnectionOptions is not idempotent: %v, then %v", once, twice)
		}

		// As the inbound proxy does: options removed, then the observer
		// adds its headers, then Forward.
		forward.RemoveConnectionOptions(reqH)
		for k, v := range added {
			reqH[k] = []string{v}
		}
		r := httptest.NewRequest("GET", "http://svc/", nil)
		r.Header, r.RemoteAddr = reqH, "10.1.2.3:4567"
		var sent http.Header
		fw := &forward.Forwarder{
			OnError: func(w http.ResponseWriter, _ *http.Request, err error) { t.Fatalf("Forward failed: %v", err) },
		}
		upstream := roundTripFunc(func(out *http.Request) (*http.Response, error) {
			sent = out.Header.Clone()
			return &http.Response{StatusCode: 200, Header: respH.Clone(), Body: io.NopCloser(strings.NewReader("ok"))}, nil
		})
		rec := httptest.NewRecorder()
		fw.Forward(rec, r, upstream, "127.0.0.1:9")

		upgrade := upgradeOf(orig)
		sidecarSets := map[string]bool{"X-Forwarded-For": true, "X-Forwarded-Proto": true, "X-Forwarded-Host": true}
		for k := range added {
			sidecarSets[k] = true
		}
		if upgrade != "" {
			sidecarSets["Connection"], sidecarSets["Upgrade"] = true, true
		}
		if trailersAsked(orig) {
			sidecarSets["Te"] = true
		}
		checkCrossed(t, "request", orig, sent, sidecarSets)
		if got := sent.Values("X-Forwarded-For"); len(got) != 1 || !strings.HasSuffix(got[0], "10.1.2.3") {
			t.Errorf("request: X-Forwarded-For %q, want one value ending with the client's 10.1.2.3", got)
		}
		if got := sent.Values("X-Forwarded-Proto"); len(got) != 1 || got[0] != "http" {
			t.Errorf("request: X-Forwarded-Proto %q, want http", got)
		}
		for k, v := range added {
			if got := sent.Values(k); len(got) != 1 || got[0] != v {
				t.Errorf("request: %s %q, the observer added %q", k, got, v)
			}
		}
		if upgrade != "" && (sent.Get("Upgrade") != upgrade || sent.Get("Connection") != "Upgrade") {
			t.Errorf("request: upgrade to %q sent as Connection %q Upgrade %q", upgrade, sent.Get("Connection"), sent.Get("Upgrade"))
		}
		if te := sent.Values("Te"); len(te) > 0 && (len(te) != 1 || te[0] != "trailers") {
			t.Errorf("request: TE %q, want none or \"trailers\"", te)
		}

		checkCrossed(t, "response", respH, rec.Header(), nil)
	})
}

// checkCrossed checks what crossed the proxy (after) against what arrived
// (before): hop-by-hop headers and those before's Connection names are
// gone unless the proxy sets them (sets); every other header is unchanged.
func checkCrossed(t *testing.T, what string, before, after http.Header, sets map[string]bool) {
	t.Helper()
	named := map[string]bool{}
	for _, v := range before["Connection"] {
		for _, n := range strings.Split(v, ",") {
			if n = strings.TrimSpace(n); n != "" {
				named[http.CanonicalHeaderKey(n)] = true
			}
		}
	}
	for k := range after {
		if sets[k] {
			continue
		}
		if slices.Contains(hopByHop, k) {
			t.Errorf("%s: hop-by-hop header %s %q crossed", what, k, after[k])
		}
		if named[k] {
			t.Errorf("%s: %s crossed although Connection named it", what, k)
		}
	}
	for k, vv := range before {
		if sets[k] || named[k] || slices.Contains(hopByHop, k) {
			continue
		}
		if !slices.Equal(after[k], vv) {
			t.Errorf("%s: %s %q arrived as %q", what, k, vv, after[k])
		}
	}
}

// parseBlock reads a header block as net/http's server reads one; ok is
// false for what it would refuse.
func parseBlock(block string) (http.Header, bool) {
	if !strings.HasSuffix(block, "\r\n\r\n") {
		block += "\r\n\r\n"
	}
	mh, err := textproto.NewReader(bufio.NewReader(strings.NewReader(block))).ReadMIMEHeader()
	if err != nil {
		return nil, false
	}
	h := http.Header(mh)
	delete(h, "Host") // the server moves it to Request.Host
	delete(h, "Content-Length")
	return h, true
}

func upgradeOf(h http.Header) string {
	if !headerHasToken(h["Connection"], "upgrade") || headerHasToken(h["Upgrade"], "h2c") {
		return ""
	}
	return h.Get("Upgrade")
}

func trailersAsked(h http.Header) bool { return headerHasToken(h["Te"], "trailers") }

func headerHasToken(vv []string, token string) bool {
	for _, v := range vv {
		for _, t := range strings.Split(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), token) {
				return true
			}
		}
	}
	return false
}

func equalHeaders(a, b http.Header) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if !slices.Equal(v, b[k]) {
			return false
		}
	}
	return true
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }
