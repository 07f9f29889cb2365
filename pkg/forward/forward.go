// Package forward is what both proxies do with a request they accepted:
// forward it (Forwarder: hop-by-hop headers, X-Forwarded-*, trailers,
// flushes, protocol upgrades) and, when they can't, answer it themselves
// (errors.go: the reasons of DESIGN.md, Refuse and LocalReply, which make
// every LocalError, and WriteError, which answers HTTP and gRPC clients).
package forward

import (
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/downstream"
	"golang.org/x/net/http/httpguts"
)

// Forwarder sends one request from the app through a RoundTripper chain and
// copies the answer back. It does what net/http/httputil.ReverseProxy does
// for a proxy (hop-by-hop headers, X-Forwarded-*, trailers, streaming
// flushes, protocol upgrades) without its per-request copies of the request
// and its headers, which cost a third of the sidecar's allocations: the
// inbound request is the handler's to prepare, and its header map is edited
// in place before any layer sees it.
//
// The zero value is not usable: OnError is required. Safe for concurrent
// use.
type Forwarder struct {
	// OnError answers the client when the request could not be sent or
	// answered.
	OnError func(w http.ResponseWriter, r *http.Request, err error)
	// WriteTimeout bounds every wait to write the answer to the client
	// (as Envoy's stream_idle_timeout bounds a stream its client does not
	// read): a client that stops reading, say one that pipelines requests
	// and never reads their answers, loses its connection then, rather
	// than holding a slot of the proxy and a connection to the upstream
	// for as long as it likes; so does a side of an upgraded connection.
	// A stream that is only quiet is not cut: the time counts while a
	// write waits. Zero: no bound.
	WriteTimeout time.Duration
}

// writeDeadline keeps the client's write deadline WriteTimeout ahead of
// the answer's writes. On HTTP/1 the deadline bounds only writes under
// way, so it is set when the answer starts and moved on as its body is
// written, no more often than a quarter of the timeout (each move is a
// timer change). On HTTP/2 a deadline resets the stream when it passes,
// writing or not, so it is set before each write and lifted after it: an
// answer whose upstream is quiet for long (a stream, a slow body) is not
// cut for it.
type writeDeadline struct {
	rc      *http.ResponseController // the answer's, also for its flushes
	timeout time.Duration
	h2      bool
	set     time.Time // when the deadline was last set; zero: not set
}

// before is called before a write of the answer.
func (d *writeDeadline) before(now time.Time) {
	if d.timeout <= 0 || !d.set.IsZero() && now.Sub(d.set) < d.timeout/4 {
		return
	}
	d.set = now
	_ = d.rc.SetWriteDeadline(now.Add(d.timeout))
}

// after is called once a write of the answer returned.
func (d *writeDeadline) after() {
	if d.timeout > 0 && d.h2 && !d.set.IsZero() {
		d.set = time.Time{}
		_ = d.rc.SetWriteDeadline(time.Time{})
	}
}

// Hop-by-hop headers (RFC 9110, 7.6.1) plus the ones proxies traditionally
// drop, as net/http/httputil lists them.
var hopHeaders = []string{
	"Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate",
	"Proxy-Authorization", "Te", "Trailer", "Transfer-Encoding", "Upgrade",
}

// Shared header values; the transport only reads them.
var (
	xfProto    = []string{"http"}
	teTrailers = []string{"trailers"}
)

// Forward proxies r through to: the prepared request goes to addr, a fixed
// destination (the app, an allow-listed host:port), or, with addr empty,
// to wherever to sends it (a call to a service picks an endpoint per
// attempt).
func (f *Forwarder) Forward(w http.ResponseWriter, r *http.Request, to http.RoundTripper, addr string) {
	out, upgrade := Prepare(r, addr)

	resp, err := to.RoundTrip(out)
	deadline := writeDeadline{rc: http.NewResponseController(w), timeout: f.WriteTimeout, h2: r.ProtoMajor == 2}
	if err != nil {
		deadline.before(time.Now())
		f.OnError(w, r, downstream.Cause(r, err))
		return
	}
	if resp.StatusCode == http.StatusSwitchingProtocols {
		f.upgraded(w, r, resp, upgrade)
		return
	}
	h := w.Header()
	PrepareAnswer(resp)
	for k, vv := range resp.Header {
		h[k] = vv
	}
	flush := IsStream(resp)
	deadline.before(time.Now())
	w.WriteHeader(resp.StatusCode)
	if flush && resp.Header.Get("Grpc-Status") == "" {
		// A stream's headers go out at once: a bidi client may wait for
		// them before it sends, a watch shows its metadata before the
		// first event. (A gRPC trailers-only answer must stay one frame.)
		_ = deadline.rc.Flush()
	}
	deadline.after()
	err = copyBody(w, resp.Body, flush, &deadline)
	resp.Body.Close()
	if err != nil {
		// Too late for an error page: cut the connection so the client
		// sees the response is incomplete.
		panic(http.ErrAbortHandler)
	}
	for k, vv := range resp.Trailer {
		// Framing, routing and authentication fields (Content-Length,
		// Host, Authorization, ...) are not allowed in a trailer (RFC
		// 9110, 6.5.1): a client that merged them would be misled.
		if httpguts.ValidTrailerHeader(k) {
			h[http.TrailerPrefix+k] = vv
		}
	}
}

// Prepare makes the request Forward sends for r, to addr (empty: wherever
// the RoundTripper sends it), and the protocol r asks to upgrade to, if
// any: hop-by-hop headers removed (TE: trailers kept for gRPC), an upgrade
// kept (never h2c's), X-Forwarded-For, -Proto and -Host set, Expect
// dropped. r's header map is edited in place; the request is a shallow
// copy with its own URL.
func Prepare(r *http.Request, addr string) (out *http.Request, upgrade string) {
	upgrade = upgradeType(r.Header)
	if httpguts.HeaderValuesContainsToken(r.Header["Upgrade"], "h2c") {
		// An h2c upgrade would turn the connection into an HTTP/2 tunnel
		// to the upstream, past every check here ("h2c smuggling"). It
		// goes on as a plain request; h2c is served with prior knowledge.
		upgrade = ""
	}
	// gRPC and other trailer users ask for trailers with "TE: trailers".
	trailers := httpguts.HeaderValuesContainsToken(r.Header["Te"], "trailers")
	removeHopByHop(r.Header)
	if upgrade != "" {
		r.Header["Connection"] = []string{"Upgrade"}
		r.Header["Upgrade"] = []string{upgrade}
	}
	if trailers {
		r.Header["Te"] = teTrailers
	}
	vals := make([]string, 2) // X-Forwarded-For's and -Host's, in one allocation
	if ip, _, err := net.SplitHostPort(r.RemoteAddr); err == nil {
		if prior, ok := r.Header["X-Forwarded-For"]; ok {
			ip = strings.Join(prior, ", ") + ", " + ip
		}
		vals[0] = ip
		r.Header["X-Forwarded-For"] = vals[0:1:1]
	}
	r.Header["X-Forwarded-Proto"] = xfProto
	if _, ok := r.Header["X-Forwarded-Host"]; !ok {
		vals[1] = r.Host
		r.Header["X-Forwarded-Host"] = vals[1:2:2]
	}
	// The body is sent right away; an interim 100 from upstream is skipped.
	delete(r.Header, "Expect")

	out = CopyRequest(r)
	out.URL.Scheme, out.URL.Host = "http", addr
	out.RequestURI = ""
	out.Close = false
	if r.ContentLength == 0 {
		out.Body = nil // a 0-length body is no body for the transport
	}
	return out, upgrade
}

// PrepareAnswer readies an upstream's answer for the client, as Forward
// passes it on: its hop-by-hop headers removed, and the trailers it
// announced announced again (those a trailer may be).
func PrepareAnswer(resp *http.Response) {
	removeHopByHop(resp.Header)
	if len(resp.Trailer) > 0 {
		names := make([]string, 0, len(resp.Trailer))
		for k := range resp.Trailer {
			if httpguts.ValidTrailerHeader(k) {
				names = append(names, k)
			}
		}
		if len(names) > 0 {
			resp.Header["Trailer"] = []string{strings.Join(names, ", ")}
		}
	}
}

// IsStream reports whether resp is a stream, as far as its headers tell:
// a body whose length they do not give (chunked, ended by the close, or
// HTTP/2 without content-length), an event stream (text/event-stream) or
// a gRPC answer. A stream's pieces are passed on as they come, and the
// outbound chain bounds it by its silence rather than by the request's
// timeout; an answer of known length is neither.
func IsStream(resp *http.Response) bool {
	if resp.ContentLength == -1 {
		return true
	}
	ct := resp.Header.Get("Content-Type")
	return strings.HasPrefix(ct, "text/event-stream") || strings.HasPrefix(ct, "application/grpc")
}

// CopyRequest returns a shallow copy of r with a copy of its URL, in one
// allocation: the copy's URL can be changed without touching r's.
func CopyRequest(r *http.Request) *http.Request {
	c := &struct {
		r http.Request
		u url.URL
	}{r: *r, u: *r.URL}
	c.r.URL = &c.u
	return &c.r
}

// copyBufPool holds the buffers responses are copied through.
var copyBufPool = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

// copyBody streams the response body, flushing after each read when the
// response is a stream, with the write deadline moved on as it goes.
func copyBody(w http.ResponseWriter, body io.Reader, flush bool, deadline *writeDeadline) error {
	bp := copyBufPool.Get().(*[]byte)
	defer copyBufPool.Put(bp)
	buf := *bp
	for {
		n, err := body.Read(buf)
		if n > 0 {
			deadline.before(time.Now())
			if _, werr := w.Write(buf[:n]); werr != nil {
				return werr
			}
			if flush {
				if ferr := deadline.rc.Flush(); ferr != nil {
					return ferr
				}
			}
			deadline.after()
		}
		if err == io.EOF {
			// What is still buffered goes out once the handler returns:
			// under the deadline too.
			deadline.before(time.Now())
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// upgraded finishes a 101 Switching Protocols: the client connection is
// taken over and spliced to the upstream one.
func (f *Forwarder) upgraded(w http.ResponseWriter, r *http.Request, resp *http.Response, reqUpgrade string) {
	backConn, ok := resp.Body.(io.ReadWriteCloser)
	respUpgrade := upgradeType(resp.Header)
	if !ok || reqUpgrade == "" || !strings.EqualFold(reqUpgrade, respUpgrade) {
		resp.Body.Close()
		f.OnError(w, r, Refuse(ReasonUpstreamReset, "", "upstream switched to protocol "+respUpgrade+" when "+reqUpgrade+" was asked for"))
		return
	}
	removeHopByHop(resp.Header)
	conn, brw, err := http.NewResponseController(downstream.HijackAware(w, r)).Hijack()
	if err != nil {
		backConn.Close()
		f.OnError(w, r, Refuse(ReasonBadRequest, "", "protocol upgrade needs HTTP/1.1"))
		return
	}
	resp.Header["Connection"] = []string{"Upgrade"}
	resp.Header["Upgrade"] = []string{respUpgrade}
	resp.Body = nil
	if err := resp.Write(brw); err != nil || brw.Flush() != nil {
		conn.Close()
		backConn.Close()
		return
	}
	Splice(conn, brw.Reader, backConn, f.WriteTimeout)
}

func upgradeType(h http.Header) string {
	if !httpguts.HeaderValuesContainsToken(h["Connection"], "Upgrade") {
		return ""
	}
	return h.Get("Upgrade")
}

// RemoveConnectionOptions deletes the headers r's Connection header names
// (RFC 9110, 7.6.1) and leaves in Connection only the tokens Forward reads
// itself (Upgrade, TE). Call it before adding headers of your own to a
// request you then Forward: a client's "Connection: traceparent" can no
// longer delete them, as it can with httputil.ReverseProxy's Director
// (golang/go#50580).
func RemoveConnectionOptions(h http.Header) {
	vv, ok := h["Connection"]
	if !ok {
		return
	}
	var keep []string
	for _, v := range vv {
		for _, name := range strings.Split(v, ",") {
			if name = strings.TrimSpace(name); name == "" {
				continue
			}
			switch k := http.CanonicalHeaderKey(name); k {
			case "Upgrade", "Te":
				keep = append(keep, k)
			case "Connection":
			default:
				delete(h, k)
			}
		}
	}
	if len(keep) == 0 {
		delete(h, "Connection")
		return
	}
	h["Connection"] = []string{strings.Join(keep, ", ")}
}

// removeHopByHop deletes the hop-by-hop headers and those the Connection
// header names.
func removeHopByHop(h http.Header) {
	for _, v := range h["Connection"] {
		for _, name := range strings.Split(v, ",") {
			if name = strings.TrimSpace(name); name != "" {
				delete(h, http.CanonicalHeaderKey(name))
			}
		}
	}
	for _, name := range hopHeaders {
		delete(h, name)
	}
}

// Splice copies both ways until both directions end, then closes both.
func Splice(client net.Conn, clientBuf io.Reader, upstream io.ReadWriteCloser, writeTimeout time.Duration) {
	done := make(chan struct{}, 2)
	// A side that ends cleanly is half-closed, so that the other may
	// still answer; a copy that failed (a write that timed out, a reset)
	// ends the tunnel, or the other copy would wait on for ever.
	end := func(err error, to io.Closer) {
		if err != nil {
			_ = client.Close()
			_ = upstream.Close()
		} else {
			closeWrite(to)
		}
		done <- struct{}{}
	}
	go func() {
		_, err := io.Copy(progressWriter(upstream, writeTimeout), clientBuf)
		end(err, upstream)
	}()
	go func() {
		_, err := io.Copy(progressWriter(client, writeTimeout), upstream)
		end(err, client)
	}()
	<-done
	<-done
	_ = client.Close()
	_ = upstream.Close()
}

// deadlineWriter bounds each write to its connection by timeout: a side
// of a tunnel that stops reading ends it then, rather than holding it (and
// what it holds: a slot, a connection to the app) for ever.
type deadlineWriter struct {
	c       writeDeadliner
	timeout time.Duration
}

// writeDeadliner is a writer with a write deadline (a net.Conn).
type writeDeadliner interface {
	io.Writer
	SetWriteDeadline(time.Time) error
}

func (d deadlineWriter) Write(p []byte) (int, error) {
	_ = d.c.SetWriteDeadline(time.Now().Add(d.timeout))
	return d.c.Write(p)
}

// progressWriter is w with each write bounded by timeout, when w has a
// write deadline and timeout is set; else w.
func progressWriter(w io.Writer, timeout time.Duration) io.Writer {
	if c, ok := w.(writeDeadliner); ok && timeout > 0 {
		return deadlineWriter{c: c, timeout: timeout}
	}
	return w
}

func closeWrite(c io.Closer) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
		return
	}
	_ = c.Close()
}
