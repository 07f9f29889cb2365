package attacktest

import (
	"fmt"
	"strings"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/forward"
)

// head joins request lines with CRLF and ends the header block.
func head(lines ...string) string { return strings.Join(lines, "\r\n") + "\r\n\r\n" }

// smuggled follows every request whose framing is rejected: were the
// listener to lose track of the framing, it would serve this one too.
const smuggled = "GET /smuggled HTTP/1.1\r\nHost: svc\r\n\r\n"

// second follows an accepted request of unusual framing on the same
// connection: it is answered only if the first one's end was found right.
const second = "GET /second HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n"

// The answers most cases expect.
var (
	badRequest = Want{Status: 400, Reason: forward.ReasonBadRequest}
	notAllowed = Want{Status: 403, Reason: forward.ReasonNotAllowed}
	unknown    = Want{Status: 503, Reason: forward.ReasonUnknownService}
	served     = Want{Status: 200, Forwarded: 1}
	// toApp is the inbound answer to a request aimed elsewhere: the
	// inbound port only ever reaches its app.
	toApp = Want{Status: 200, Forwarded: 1}
	// twoServed is an unusual but unambiguous framing, then `second`.
	twoServed = Want{Status: 200, Responses: 2, Forwarded: 2, Check: bodyThenSecond}
	// streamedThenRefused is the inbound answer to a fault in a chunked
	// body after its first chunk: the inbound port streams bodies, so the
	// app has the headers and the first chunk when the fault is read; its
	// request is cut off there (never complete) and the client gets 400.
	streamedThenRefused = Want{Status: 400, Reason: forward.ReasonBadRequest, Partial: true}
)

// goAnswers is a request net/http refuses before any handler runs: its own
// status, no x-sidecar-error.
func goAnswers(status int) Want { return Want{Status: status} }

// withCheck returns w that also runs check.
func withCheck(w Want, check func([]Request, Target) string) Want {
	w.Check = check
	return w
}

func bodyThenSecond(got []Request, _ Target) string {
	if len(got) != 2 || got[0].Body != "hello" || got[1].URI != "/second" {
		return "want the body \"hello\" then GET /second, got " + describe(got)
	}
	return ""
}

// header checks one header of the request the upstream received.
func header(name, want string) func([]Request, Target) string {
	return func(got []Request, _ Target) string {
		if len(got) != 1 {
			return "want one request, got " + describe(got)
		}
		if v := strings.Join(got[0].Header.Values(name), ", "); v != want {
			return fmt.Sprintf("the upstream got %s %q, want %q", name, v, want)
		}
		return ""
	}
}

// addedKept checks that every header the listener adds arrived with the
// listener's value, whatever the client's Connection header named.
func addedKept(got []Request, tg Target) string {
	if len(got) != 1 {
		return "want one request, got " + describe(got)
	}
	for name, want := range tg.Added {
		if v := strings.Join(got[0].Header.Values(name), ", "); v != want {
			return fmt.Sprintf("the upstream got %s %q, want the listener's %q", name, v, want)
		}
	}
	return ""
}

func all(checks ...func([]Request, Target) string) func([]Request, Target) string {
	return func(got []Request, tg Target) string {
		for _, c := range checks {
			if msg := c(got, tg); msg != "" {
				return msg
			}
		}
		return ""
	}
}

// Cases is the attack table: every case with what each listener answers.
func Cases() []Case {
	chunked := head("POST / HTTP/1.1", "Host: svc", "Transfer-Encoding: chunked")
	post := func(lines ...string) string {
		return head(append([]string{"POST / HTTP/1.1", "Host: svc"}, lines...)...)
	}
	get := func(lines ...string) string {
		return head(append([]string{"GET / HTTP/1.1"}, append(lines, "Connection: close")...)...)
	}
	big := strings.Repeat("a", 70<<10)
	many := strings.Repeat("X-Many: 0123456789abcdef\r\n", 3000)
	slowHeader := []Step{{Write: "GET / HTTP/1.1\r\nHost: svc\r\n", Pause: 100 * time.Millisecond}}
	for i := range 10 {
		slowHeader = append(slowHeader, Step{Write: fmt.Sprintf("X-Slow-%d: x\r\n", i), Pause: 100 * time.Millisecond})
	}
	movingBody := []Step{{Write: post("Content-Length: 5", "Connection: close"), Pause: 100 * time.Millisecond}}
	for _, b := range "hello" {
		movingBody = append(movingBody, Step{Write: string(b), Pause: 100 * time.Millisecond})
	}
	hop := func(w Want) Want { return withCheck(w, addedKept) }

	return []Case{
		// Request smuggling: two framings in one request.
		{Name: "CL.TE", Class: "smuggling", Request: post("Content-Length: 6", "Transfer-Encoding: chunked") + "0\r\n\r\nG" + smuggled, Out: badRequest, In: badRequest},
		{Name: "TE.CL", Class: "smuggling", Request: post("Transfer-Encoding: chunked", "Content-Length: 3") + "8\r\nSMUGGLED\r\n0\r\n\r\n" + smuggled, Out: badRequest, In: badRequest},
		{Name: "TE.TE xchunked", Class: "smuggling", Request: post("Transfer-Encoding: chunked", "Transfer-Encoding: xchunked") + "0\r\n\r\n" + smuggled, Out: badRequest, In: badRequest},
		{Name: "CL.CL differing", Class: "smuggling", Request: post("Content-Length: 5", "Content-Length: 6") + "hello!" + smuggled, Out: badRequest, In: badRequest},
		{Name: "CL.CL identical", Class: "smuggling", Request: post("Content-Length: 5", "Content-Length: 5") + "hello" + second, Out: twoServed, In: twoServed},
		{Name: "Content_Length lookalike", Class: "smuggling", Request: post("Content_Length: 5") + "hello" + smuggled, Out: badRequest, In: badRequest},
		{Name: "Transfer_Encoding lookalike", Class: "smuggling", Request: post("Transfer_Encoding: chunked") + "0\r\n\r\n" + smuggled, Out: badRequest, In: badRequest},
		{Name: "X_Forwarded_For lookalike", Class: "hop-by-hop", Request: get("Host: svc", "X_Forwarded_For: 10.0.0.1"), Out: badRequest, In: badRequest},
		{Name: "Keep_Alive lookalike", Class: "hop-by-hop", Request: get("Host: svc", "keep_alive: timeout=5"), Out: badRequest, In: badRequest},
		{Name: "Proxy_Authorization lookalike", Class: "hop-by-hop", Request: get("Host: svc", "Proxy_Authorization: Basic YTpi"), Out: badRequest, In: badRequest},
		{Name: "TE in HTTP/1.0", Class: "smuggling", Request: "POST / HTTP/1.0\r\nHost: svc\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n" + smuggled, Out: badRequest, In: badRequest},

		// Transfer-Encoding and Content-Length values.
		{Name: "TE chunked, identity", Class: "framing", Request: post("Transfer-Encoding: chunked, identity") + "0\r\n\r\n" + smuggled, Out: badRequest, In: badRequest},
		{Name: "TE identity", Class: "framing", Request: post("Transfer-Encoding: identity") + "0\r\n\r\n" + smuggled, Out: badRequest, In: badRequest},
		{Name: "TE gzip, chunked", Class: "framing", Request: post("Transfer-Encoding: gzip, chunked") + "0\r\n\r\n" + smuggled, Out: badRequest, In: badRequest},
		{Name: "TE with a space before the colon", Class: "framing", Request: post("Transfer-Encoding : chunked") + "0\r\n\r\n" + smuggled, Out: badRequest, In: badRequest},
		{Name: "TE with a vertical tab", Class: "framing", Request: post("Transfer-Encoding: \vchunked") + "0\r\n\r\n" + smuggled, Out: badRequest, In: badRequest},
		{Name: "CL with a vertical tab", Class: "framing", Request: post("Content-Length: 5\v") + "hello" + smuggled, Out: badRequest, In: badRequest},
		{Name: "TE Chunked in another case", Class: "framing", Request: post("Transfer-Encoding: Chunked") + "5\r\nhello\r\n0\r\n\r\n" + second, Out: twoServed, In: twoServed},
		{Name: "TE with a tab before chunked", Class: "framing", Request: post("Transfer-Encoding:\tchunked") + "5\r\nhello\r\n0\r\n\r\n" + second, Out: twoServed, In: twoServed},
		{Name: "CL list 5, 5", Class: "framing", Request: post("Content-Length: 5, 5") + "hello" + smuggled, Out: badRequest, In: badRequest},
		{Name: "CL with a plus sign", Class: "framing", Request: post("Content-Length: +5") + "hello" + smuggled, Out: badRequest, In: badRequest},
		{Name: "CL in hex", Class: "framing", Request: post("Content-Length: 0x5") + "hello" + smuggled, Out: badRequest, In: badRequest},
		{Name: "CL negative", Class: "framing", Request: post("Content-Length: -5") + "hello" + smuggled, Out: badRequest, In: badRequest},
		{Name: "CL of 20 digits", Class: "framing", Request: post("Content-Length: 18446744073709551621") + "hello" + smuggled, Out: badRequest, In: badRequest},
		{Name: "chunk size in 17 hex digits", Class: "framing", Request: chunked + "10000000000000005\r\nhello\r\n0\r\n\r\n" + smuggled, Out: badRequest, In: badRequest},
		{Name: "chunk size with a space before the extension", Class: "framing", Request: chunked + "5 ;x=y\r\nhello\r\n0\r\n\r\n" + smuggled, Out: badRequest, In: badRequest},

		// Bare LF where chunked framing needs CRLF; bare CR and NUL.
		{Name: "bare LF in a chunk-size line", Class: "bare-lf", Request: chunked + "5\nhello\r\n0\r\n\r\n" + smuggled, Out: badRequest, In: badRequest},
		{Name: "bare LF after chunk data", Class: "bare-lf", Request: chunked + "5\r\nhello\n0\r\n\r\n" + smuggled, Out: badRequest, In: streamedThenRefused},
		{Name: "bare LF ending the last chunk", Class: "bare-lf", Request: chunked + "0\n\r\n" + smuggled, Out: badRequest, In: badRequest},
		{Name: "bare LF ending a trailer", Class: "bare-lf", Request: chunked + "0\r\nX-T: v\n\r\n" + smuggled, Out: badRequest, In: badRequest},
		// RFC 9112 2.2 lets a recipient take LF for CRLF in the header
		// block, as net/http and the check both do: the request is
		// unambiguous, and goes upstream with CRLF.
		{Name: "bare LF line ends in the header block", Class: "bare-lf", Request: "GET /lf HTTP/1.1\nHost: svc\nConnection: close\n\n",
			Out: withCheck(served, uriIs("/lf")), In: withCheck(toApp, uriIs("/lf"))},
		{Name: "bare CR in a header value", Class: "bare-lf", Request: get("Host: svc", "X-A: a\rb"), Out: goAnswers(400), In: goAnswers(400)},
		{Name: "NUL in a header value", Class: "bare-lf", Request: get("Host: svc", "X-A: a\x00b"), Out: goAnswers(400), In: goAnswers(400)},

		// Obsolete line folding: net/http folds it silently; the check
		// refuses it, in headers and trailers.
		{Name: "obs-fold in a header", Class: "obs-fold", Request: get("Host: svc", "X-A: b", " c"), Out: badRequest, In: badRequest},
		{Name: "obs-fold with a tab", Class: "obs-fold", Request: get("Host: svc", "X-A: b", "\tc"), Out: badRequest, In: badRequest},
		{Name: "obs-fold continuing Transfer-Encoding", Class: "obs-fold", Request: post("Transfer-Encoding:", " chunked") + "0\r\n\r\n" + smuggled, Out: badRequest, In: badRequest},
		{Name: "obs-fold continuing Host", Class: "obs-fold", Request: get("Host: ", " svc"), Out: badRequest, In: badRequest},
		{Name: "obs-fold in a trailer", Class: "obs-fold", Request: chunked + "5\r\nhello\r\n0\r\nX-T: a\r\n b\r\n\r\n" + smuggled, Out: badRequest, In: streamedThenRefused},

		// Size limits: net/http answers 431 for a header block over
		// MaxHeaderBytes, the request line included.
		{Name: "oversized request line", Class: "size", Request: "GET /" + big + " HTTP/1.1\r\nHost: svc\r\n\r\n", Out: goAnswers(431), In: goAnswers(431)},
		{Name: "oversized header", Class: "size", Request: get("Host: svc", "X-Big: "+big), Out: goAnswers(431), In: goAnswers(431)},
		{Name: "3000 headers", Class: "size", Request: "GET / HTTP/1.1\r\nHost: svc\r\n" + many + "\r\n", Out: goAnswers(431), In: goAnswers(431)},

		// Slow clients: a header block past ReadHeaderTimeout is cut off
		// without an answer; a body that stalls past BodyReadTimeout gets
		// 408; one that keeps moving is served.
		{Name: "slowloris header", Class: "slow", Steps: slowHeader, Out: Want{}, In: Want{}},
		{Name: "stalled body", Class: "slow", Steps: []Step{{Write: post("Content-Length: 10") + "hel", Pause: time.Second}},
			Out: Want{Status: 408, Reason: forward.ReasonRequestTimeout}, In: Want{Status: 408, Reason: forward.ReasonRequestTimeout, Partial: true}},
		{Name: "body that keeps moving", Class: "slow", Steps: movingBody, Out: withCheck(served, header("Content-Length", "5")), In: toApp},

		// Hop-by-hop abuse: a client's Connection header names headers
		// the listener adds; they must still arrive, with its values.
		{Name: "Connection names X-Forwarded-*", Class: "hop-by-hop", Request: get("Host: svc", "Connection: X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host",
			"X-Forwarded-For: 6.6.6.6", "X-Forwarded-Proto: https", "X-Forwarded-Host: evil"),
			Out: hop(withCheck(served, header("X-Forwarded-Host", "svc"))), In: hop(withCheck(toApp, header("X-Forwarded-Host", "svc")))},
		{Name: "Connection names Traceparent", Class: "hop-by-hop", Request: get("Host: svc", "Connection: Traceparent",
			"Traceparent: 00-11111111111111111111111111111111-2222222222222222-01"), Out: hop(served), In: hop(toApp)},
		{Name: "Connection names Content-Length", Class: "hop-by-hop", Request: post("Connection: Content-Length, close", "Content-Length: 5") + "hello" + smuggled,
			Out: hop(withCheck(served, header("Content-Length", "5"))), In: hop(withCheck(toApp, header("Content-Length", "5")))},
		{Name: "Connection names Transfer-Encoding", Class: "hop-by-hop", Request: post("Connection: Transfer-Encoding, close", "Transfer-Encoding: chunked") + "5\r\nhello\r\n0\r\n\r\n" + smuggled,
			Out: hop(served), In: hop(toApp)},
		{Name: "Connection names Host", Class: "hop-by-hop", Request: get("Host: svc", "Connection: Host"), Out: hop(served), In: hop(toApp)},
		{Name: "proxy credentials not forwarded", Class: "hop-by-hop", Request: get("Host: svc", "Proxy-Authorization: Basic c2VjcmV0", "Keep-Alive: timeout=5"),
			Out: withCheck(served, all(header("Proxy-Authorization", ""), header("Keep-Alive", ""))),
			In:  withCheck(toApp, all(header("Proxy-Authorization", ""), header("Keep-Alive", "")))},
		// An h2c upgrade would make an HTTP/2 tunnel to the upstream past
		// the listener ("h2c smuggling"): sent on as a plain request.
		{Name: "h2c upgrade", Class: "hop-by-hop", Request: get("Host: svc", "Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c", "HTTP2-Settings: AAMAAABkAAQAAP__"),
			Out: withCheck(served, all(header("Upgrade", ""), header("Http2-Settings", ""))),
			In:  withCheck(toApp, all(header("Upgrade", ""), header("Http2-Settings", "")))},

		// SSRF through the authority: the outbound port reaches services
		// by name only. The inbound port reaches its app only.
		{Name: "absolute URL to an IP", Class: "ssrf", Request: head("GET http://{decoy}/ HTTP/1.1", "Host: {decoy}", "Connection: close"), Out: notAllowed, In: toApp},
		{Name: "absolute URL to localhost", Class: "ssrf", Request: head("GET http://localhost:{decoyport}/ HTTP/1.1", "Host: localhost:{decoyport}", "Connection: close"), Out: unknown, In: toApp},
		{Name: "absolute URL with a Consul path", Class: "ssrf", Request: head("GET http://a%2f..%2f..%2fkv%2fsidecar/ HTTP/1.1", "Host: a%2f..%2f..%2fkv%2fsidecar", "Connection: close"), Out: goAnswers(400), In: goAnswers(400)},
		{Name: "Host with a percent-encoded path", Class: "ssrf", Request: get("Host: svc%2f..%2fkv"), Out: badRequest, In: toApp},
		{Name: "Host localhost", Class: "ssrf", Request: get("Host: localhost:{decoyport}"), Out: unknown, In: toApp},
		{Name: "Host 169.254.169.254", Class: "ssrf", Request: get("Host: 169.254.169.254"), Out: notAllowed, In: toApp},
		{Name: "absolute URL to 169.254.169.254, Host the service", Class: "ssrf", Request: head("GET http://169.254.169.254/latest/meta-data/ HTTP/1.1", "Host: svc", "Connection: close"), Out: notAllowed, In: toApp},
		// RFC 9112 3.2.2: the absolute URL wins over the Host header.
		{Name: "absolute URL to the service, Host 169.254.169.254", Class: "ssrf", Request: head("GET http://svc/ HTTP/1.1", "Host: 169.254.169.254", "Connection: close"),
			Out: withCheck(served, hostIs("svc")), In: withCheck(toApp, hostIs("svc"))},
		// RFC 9110 4.2.4: userinfo hides the real authority.
		{Name: "userinfo before an IP", Class: "ssrf", Request: head("GET http://svc@{decoy}/ HTTP/1.1", "Host: svc", "Connection: close"), Out: badRequest, In: withCheck(toApp, uriIs("/"))},
		{Name: "userinfo naming an IP before the service", Class: "ssrf", Request: head("GET http://{decoy}@svc/ HTTP/1.1", "Host: svc", "Connection: close"), Out: badRequest, In: withCheck(toApp, uriIs("/"))},
		// net/http refuses '@' in a Host header.
		{Name: "Host with userinfo", Class: "ssrf", Request: get("Host: svc@{decoy}"), Out: goAnswers(400), In: goAnswers(400)},
		{Name: "percent-encoded IP in the URL", Class: "ssrf", Request: head("GET http://%31%32%37.0.0.1:{decoyport}/ HTTP/1.1", "Host: svc"), Out: goAnswers(400), In: goAnswers(400)},
		{Name: "percent-encoded Host", Class: "ssrf", Request: get("Host: %31%32%37.0.0.1:{decoyport}"), Out: badRequest, In: toApp},
		{Name: "IP with a trailing dot", Class: "ssrf", Request: get("Host: {decoyip}.:{decoyport}"), Out: notAllowed, In: toApp},
		{Name: "IP as a Consul name", Class: "ssrf", Request: get("Host: {decoyip}.service.consul:{decoyport}"), Out: notAllowed, In: toApp},
		{Name: "service with a trailing dot", Class: "ssrf", Request: get("Host: svc."), Out: withCheck(served, hostIs("svc.")), In: toApp},
		{Name: "service with the decoy's port", Class: "ssrf", Request: get("Host: svc:{decoyport}"), Out: served, In: toApp},
		{Name: "IPv4 as one decimal number", Class: "ssrf", Request: get("Host: 2130706433:{decoyport}"), Out: unknown, In: toApp},
		{Name: "IPv4 in hex", Class: "ssrf", Request: get("Host: 0x7f000001:{decoyport}"), Out: unknown, In: toApp},
		{Name: "IPv4 in short octal", Class: "ssrf", Request: get("Host: 0177.1:{decoyport}"), Out: unknown, In: toApp},
		{Name: "IPv6 loopback", Class: "ssrf", Request: get("Host: [::1]:{decoyport}"), Out: notAllowed, In: toApp},
		{Name: "IPv6 without brackets", Class: "ssrf", Request: get("Host: ::1"), Out: notAllowed, In: toApp},
		{Name: "IPv4-mapped IPv6 URL", Class: "ssrf", Request: head("GET http://[::ffff:{decoyip}]:{decoyport}/ HTTP/1.1", "Host: svc", "Connection: close"), Out: notAllowed, In: toApp},
		{Name: "IPv6 with a zone", Class: "ssrf", Request: get("Host: [fe80::1%25lo]:{decoyport}"), Out: notAllowed, In: toApp},
		{Name: "empty Host", Class: "ssrf", Request: get("Host: "), Out: badRequest, In: toApp},
		{Name: "no Host", Class: "ssrf", Request: get(), Out: goAnswers(400), In: goAnswers(400)},
		{Name: "two Hosts", Class: "ssrf", Request: get("Host: svc", "Host: {decoy}"), Out: goAnswers(400), In: goAnswers(400)},
		{Name: "https in the absolute URL", Class: "ssrf", Request: head("GET https://svc/ HTTP/1.1", "Host: svc", "Connection: close"), Out: badRequest, In: toApp},
		{Name: "percent-encoded CRLF in the path", Class: "ssrf", Request: head("GET /a%0d%0aX-Injected:%201 HTTP/1.1", "Host: svc", "Connection: close"),
			Out: withCheck(served, all(header("X-Injected", ""), uriIs("/a%0d%0aX-Injected:%201"))),
			In:  withCheck(toApp, all(header("X-Injected", ""), uriIs("/a%0d%0aX-Injected:%201")))},

		// CONNECT: never a tunnel unless the target is allow-listed.
		{Name: "CONNECT to an IP", Class: "connect", Request: head("CONNECT {decoy} HTTP/1.1", "Host: {decoy}", "Connection: close"), Out: notAllowed, In: notAllowed},
		// A tunnel to a known service is served as a connection to the
		// outbound port; this one carries nothing and ends.
		{Name: "CONNECT to the service", Class: "connect", Request: head("CONNECT svc:80 HTTP/1.1", "Host: svc:80", "Connection: close"), Out: Want{Status: 200}, In: notAllowed},
		{Name: "CONNECT to localhost", Class: "connect", Request: head("CONNECT localhost:{decoyport} HTTP/1.1", "Host: localhost:{decoyport}", "Connection: close"), Out: unknown, In: notAllowed},
		{Name: "CONNECT to a Consul path", Class: "connect", Request: head("CONNECT svc%2f..%2fkv:80 HTTP/1.1", "Host: svc%2f..%2fkv:80", "Connection: close"), Out: goAnswers(400), In: goAnswers(400)},
	}
}

func hostIs(want string) func([]Request, Target) string {
	return func(got []Request, _ Target) string {
		if len(got) != 1 || got[0].Host != want {
			return fmt.Sprintf("want one request with Host %q, got %s", want, describe(got))
		}
		return ""
	}
}

func uriIs(want string) func([]Request, Target) string {
	return func(got []Request, _ Target) string {
		if len(got) != 1 || got[0].URI != want {
			return fmt.Sprintf("want one request for %q, got %s", want, describe(got))
		}
		return ""
	}
}

// seedDecoy stands for the decoy's address in Seeds.
const seedDecoy = "127.0.0.1:8080"

// Seed is one case's request for a fuzz target's seed corpus.
type Seed struct {
	// Request is the whole request, the decoy's address filled in.
	Request string
	// Method, Target and Host are from its request line and Host header.
	Method, Target, Host string
}

// Seeds returns the requests of the cases written at once, the decoy
// filled in as 127.0.0.1:8080, for seed corpora.
func Seeds() []Seed {
	repl := strings.NewReplacer("{decoy}", seedDecoy, "{decoyip}", host(seedDecoy), "{decoyport}", port(seedDecoy))
	var out []Seed
	for _, c := range Cases() {
		if c.Request == "" {
			continue
		}
		s := Seed{Request: repl.Replace(c.Request)}
		line, rest, _ := strings.Cut(s.Request, "\r\n")
		if f := strings.Fields(line); len(f) == 3 {
			s.Method, s.Target = f[0], f[1]
		}
		for _, l := range strings.Split(rest, "\r\n") {
			if h, ok := strings.CutPrefix(l, "Host: "); ok {
				s.Host = h
				break
			}
		}
		out = append(out, s)
	}
	return out
}
