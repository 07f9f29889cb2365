// Package upstream is the sidecar's side towards endpoints: the pooled
// transport both proxies send through (HTTP/1.1 on connections the calling
// goroutine owns; HTTP/2 through x/net/http2, with a fallback for
// endpoints that only speak HTTP/1.1), the rules of connection reuse and
// the limits on answers, the errors that tell a connect failure, a reset
// and a broken answer apart, and the helpers of sending a request again
// (Rewound, HasIdempotencyKey).
package upstream

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/netip"
	"net/textproto"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/http/httpguts"
	"golang.org/x/net/http2"

	"github.com/sidecar-mesh/sidecar/internal/ascii"
	"github.com/sidecar-mesh/sidecar/internal/clip"
	"github.com/sidecar-mesh/sidecar/internal/rawio"
	"github.com/sidecar-mesh/sidecar/internal/readahead"
	"github.com/sidecar-mesh/sidecar/pkg/downstream"
	"github.com/sidecar-mesh/sidecar/pkg/panics"
)

// Transport is the sidecar's HTTP/1.1 client: a synchronous, pooled
// http.RoundTripper. It is safe for concurrent use; the zero value is not
// usable, call NewTransport.
//
// Why not http.Transport: it runs a reader and a writer goroutine per
// connection and hands every request and response across channels, which on
// a 2-core pod cost the proxy more than half its throughput (see docs/design.md). It
// also replays idempotent requests on dead pooled connections behind the
// caller's back. Here the calling goroutine writes the request and reads the
// response itself, on a connection it owns until the response body is done;
// only a request body that is not already in memory is written from a second
// goroutine, so a slow upload never blocks reading an early response.
//
// A request that fails on a reused idle connection before any response byte
// arrived is sent again once, on a new connection, when that is safe: the
// method is idempotent, or nothing of the request reached the wire. That is
// connection management, not a retry, and happens at most once per call.
type Transport struct {
	dialer net.Dialer
	dial   func(ctx context.Context, network, addr string) (net.Conn, error)
	// dialName, when set (TransportConfig.RefuseResolved), dials the
	// addresses that are host names in dial's place (checkedDial).
	dialName              func(ctx context.Context, network, addr string) (net.Conn, error)
	handshake             func(ctx context.Context, c net.Conn, addr string) (net.Conn, error)
	responseHeaderTimeout time.Duration
	idleConnTimeout       time.Duration
	maxIdlePerHost        int
	maxHeaderBytes        int64

	pools sync.Map // endpoint address -> *hostPool
	// h2 carries requests that came in over HTTP/2 (gRPC above all) as
	// HTTP/2 with prior knowledge, multiplexed on the connections of
	// h2pool: it makes and runs them, sendH2 picks them.
	h2     *http2.Transport
	h2pool *h2Pool
	// h1Only remembers endpoints that answered the HTTP/2 preface in
	// HTTP/1.x (address -> time.Time until which to believe it): they get
	// HTTP/2 requests other than gRPC over HTTP/1.1.
	h1Only sync.Map

	stopSweep chan struct{}
	sweepDone chan struct{}
	closeOnce sync.Once
}

var _ http.RoundTripper = (*Transport)(nil)

// TransportConfig configures a Transport. Zero fields take the defaults named.
type TransportConfig struct {
	// DialTimeout bounds a TCP connect to an endpoint. Default 1s.
	DialTimeout time.Duration
	// ResponseHeaderTimeout bounds the wait for response headers once the
	// request is written. Default 15s.
	ResponseHeaderTimeout time.Duration
	// IdleConnTimeout closes pooled connections idle this long. Default 30s,
	// below the keep-alive timeout of common servers, so the pool rarely
	// holds a connection the server already closed.
	IdleConnTimeout time.Duration
	// MaxIdleConnsPerHost bounds the pool per endpoint. Default 256.
	MaxIdleConnsPerHost int
	// MaxResponseHeaderBytes bounds a response's status line and header
	// block (each interim 1xx response's too; for HTTP/2, the header list).
	// Over it the response is refused with a *BadResponseError and the
	// connection closed (for HTTP/2, the stream reset, or the connection
	// closed when the block goes on past the limit). Default 64 KiB, as
	// Envoy's 60 KiB.
	MaxResponseHeaderBytes int
	// DialContext, when set, replaces the TCP dialer (tests count dials with
	// it). DialTimeout still bounds it.
	DialContext func(ctx context.Context, network, addr string) (net.Conn, error)
	// Handshake, when set, runs on each new connection once connected,
	// under the same connect timeout (the mesh's TLS handshake); the
	// connection it returns carries the requests. It closes c when it
	// fails; its error is the connect failure's cause.
	Handshake func(ctx context.Context, c net.Conn, addr string) (net.Conn, error)
	// RefuseResolved, when set, is asked about each address a host name
	// resolved to, before a connection is made to it, and returns why
	// none may be ("" to allow it): a name can resolve to another address
	// when dialed than when it was checked (DNS rebinding). A refused
	// connection is a *ConnectError whose cause is a *RefusedAddrError
	// (the TCP dialer tries the name's other addresses first). An address
	// that is an IP literal is never asked: the caller chose it.
	// With DialContext, it is asked after the connection is made, about
	// its remote address (a connection whose remote address is not an IP
	// address and port is not asked about), and the connection closed.
	// It may be called from several goroutines at once.
	RefuseResolved func(netip.AddrPort) string
}

// NewTransport returns a Transport.
func NewTransport(cfg TransportConfig) *Transport {
	if cfg.DialTimeout <= 0 {
		cfg.DialTimeout = time.Second
	}
	if cfg.ResponseHeaderTimeout <= 0 {
		cfg.ResponseHeaderTimeout = 15 * time.Second
	}
	if cfg.IdleConnTimeout <= 0 {
		cfg.IdleConnTimeout = 30 * time.Second
	}
	if cfg.MaxIdleConnsPerHost <= 0 {
		cfg.MaxIdleConnsPerHost = 256
	}
	if cfg.MaxResponseHeaderBytes <= 0 {
		cfg.MaxResponseHeaderBytes = DefaultMaxResponseHeaderBytes
	}
	t := &Transport{
		dialer:                net.Dialer{Timeout: cfg.DialTimeout, KeepAlive: 30 * time.Second},
		dial:                  cfg.DialContext,
		handshake:             cfg.Handshake,
		responseHeaderTimeout: cfg.ResponseHeaderTimeout,
		idleConnTimeout:       cfg.IdleConnTimeout,
		maxIdlePerHost:        cfg.MaxIdleConnsPerHost,
		maxHeaderBytes:        int64(cfg.MaxResponseHeaderBytes),
	}
	if t.dial == nil {
		t.dial = t.dialer.DialContext
	}
	if cfg.RefuseResolved != nil {
		t.dialName = checkedDial(t.dialer, cfg.DialContext, cfg.RefuseResolved)
	}
	// The HTTP/2 transport's receive windows are set through a net/http
	// Transport, the only way x/net takes them; that Transport carries no
	// request. x/net's default of 4 MiB a stream let an endpoint's answers
	// pile up unread for as long as the client does not read them: a peer
	// that opened 64 streams and never read grew the sidecar by 280 MB.
	// Envoy bounds a stream's buffer at 1 MiB.
	h1 := &http.Transport{HTTP2: &http.HTTP2Config{
		MaxReceiveBufferPerStream:     h2StreamWindow,
		MaxReceiveBufferPerConnection: h2ConnWindow,
	}}
	h2, err := http2.ConfigureTransports(h1)
	if err != nil {
		panic("upstream: " + err.Error()) // only when h1 has HTTP/2 already: never
	}
	// Requests are sent on the pool's connections (sendH2), never through
	// h2.RoundTrip: h2 is given no dialer, nor AllowHTTP.
	t.h2pool = &h2Pool{t: t}
	h2.ConnPool = t.h2pool
	h2.IdleConnTimeout = cfg.IdleConnTimeout
	h2.MaxHeaderListSize = uint32(min(cfg.MaxResponseHeaderBytes, 1<<30))
	// A proxy passes encodings through as they are: no Accept-Encoding of
	// its own, no decompressing behind the client's back.
	h2.DisableCompression = true
	// A connection that goes quiet is pinged; no answer closes it, so
	// streams fail over instead of hanging on a dead peer. Not more often
	// than gRPC servers allow by default (a ping per 5 minutes, else they
	// close the connection with ENHANCE_YOUR_CALM, every stream on it).
	h2.ReadIdleTimeout = h2PingInterval
	h2.PingTimeout = 15 * time.Second
	t.h2 = h2
	t.stopSweep, t.sweepDone = make(chan struct{}), make(chan struct{})
	go t.sweep()
	return t
}

// h2RequestHeaderListTooLarge is the text of x/net/http2's error for a
// request whose header list is over the endpoint's
// SETTINGS_MAX_HEADER_LIST_SIZE (internal to x/net).
const h2RequestHeaderListTooLarge = "request header list larger than peer's advertised limit"

// ErrRequestHeadersTooLarge is the cause of the *downstream.ClientError for
// a request whose header list is larger than the endpoint takes.
var ErrRequestHeadersTooLarge = errors.New("request header list larger than the endpoint takes")

// The HTTP/2 transport's bounds: how much of an answer an endpoint may
// send ahead of the client's reading, per stream (what bounds the memory
// a stream nobody reads holds), and per connection, kept large: a
// connection's window comes back only as its streams are read, so one as
// small as a few streams' windows let a few unread streams stall every
// other stream to the endpoint; and how long a connection may be quiet
// before it is pinged (grpc-go's servers refuse pings more often than
// every 5 minutes by default).
const (
	h2StreamWindow = 256 << 10
	h2ConnWindow   = 1 << 30
	h2PingInterval = 5*time.Minute + 30*time.Second
)

// Close stops the idle sweeper and closes every pooled connection. The
// Transport must not be used after.
func (t *Transport) Close() {
	t.closeOnce.Do(func() {
		close(t.stopSweep)
		<-t.sweepDone
	})
	t.CloseIdleConnections()
	t.h2pool.closeAll()
}

// sweep closes pooled connections idle past IdleConnTimeout and forgets the
// pools of endpoints no longer used, so neither file descriptors nor pools
// pile up for endpoints that went away.
func (t *Transport) sweep() {
	defer close(t.sweepDone)
	tick := time.NewTicker(max(t.idleConnTimeout/2, time.Second))
	defer tick.Stop()
	for {
		select {
		case <-t.stopSweep:
			return
		case <-tick.C:
		}
		cutoff := time.Now().Add(-t.idleConnTimeout)
		t.pools.Range(func(k, v any) bool {
			p := v.(*hostPool)
			var stale []*persistConn
			p.mu.Lock()
			keep := p.idle[:0]
			for _, pc := range p.idle {
				if pc.idleAt.Before(cutoff) {
					stale = append(stale, pc)
				} else {
					keep = append(keep, pc)
				}
			}
			clear(p.idle[len(keep):])
			p.idle = keep
			unused := len(keep) == 0 && p.lastUsed.Before(cutoff)
			p.mu.Unlock()
			for _, pc := range stale {
				_ = pc.conn.Close()
			}
			if unused {
				t.pools.CompareAndDelete(k, p)
			}
			return true
		})
	}
}

// ConnectError reports that no connection to an endpoint could be made:
// nothing of the request was sent, so retrying it elsewhere is always safe.
type ConnectError struct {
	Addr string
	Err  error
}

func (e *ConnectError) Error() string { return "connect " + e.Addr + ": " + e.Err.Error() }
func (e *ConnectError) Unwrap() error { return e.Err }

// DefaultMaxResponseHeaderBytes is TransportConfig.MaxResponseHeaderBytes'
// default.
const DefaultMaxResponseHeaderBytes = 64 << 10

// max1xxResponses bounds the interim responses read before the final one,
// as net/http's transport does: an endpoint that sends them without end
// never answers.
const max1xxResponses = 5

// BadResponseError reports a response the sidecar refuses to pass on: it
// breaks HTTP's framing or a limit (header size, interim responses). It
// comes wrapped in an *UpstreamError; the connection it came on is closed.
type BadResponseError struct{ Reason string }

func (e *BadResponseError) Error() string { return "bad response: " + e.Reason }

// maxReason bounds a BadResponseError's reason, which may quote what the
// endpoint sent (a header line of any length and any bytes).
const maxReason = 200

// badResponse is the error for a response refused for reason.
func badResponse(reason string) *BadResponseError {
	return &BadResponseError{Reason: clip.String(reason, maxReason)}
}

// ErrResponseHeaderTimeout is returned when an endpoint took longer than the
// response header timeout to answer.
var ErrResponseHeaderTimeout = errors.New("timeout awaiting response headers")

// UpstreamError reports a failure on an established upstream connection.
type UpstreamError struct {
	Addr string
	Op   string // "write request", "read response"
	// Written reports whether any byte of the request may have reached the
	// endpoint.
	Written bool
	Err     error
}

func (e *UpstreamError) Error() string {
	return e.Op + " " + e.Addr + ": " + e.Err.Error()
}
func (e *UpstreamError) Unwrap() error { return e.Err }

// maxInlineBody is the largest in-memory request body written by the calling
// goroutine instead of a writer goroutine.
const maxInlineBody = 64 << 10

// RoundTrip implements http.RoundTripper: Send with the transport's
// DialTimeout.
func (t *Transport) RoundTrip(req *http.Request) (*http.Response, error) { return t.Send(req, 0) }

// Send sends req to the endpoint in its URL host, giving up on a new
// connection after connectTimeout (0: the transport's DialTimeout); a
// connection taken from the pool is not affected.
func (t *Transport) Send(req *http.Request, connectTimeout time.Duration) (*http.Response, error) {
	if req.URL.Scheme != "http" {
		CloseBody(req)
		return nil, fmt.Errorf("outbound transport: unsupported scheme %q", req.URL.Scheme)
	}
	if req.ProtoMajor == 2 {
		return t.roundTripH2(req, connectTimeout)
	}
	addr := req.URL.Host
	if _, _, err := net.SplitHostPort(addr); err != nil {
		addr = net.JoinHostPort(addr, "80")
	}
	upgrade := isUpgrade(req)
	cur := req
	for fresh := upgrade; ; fresh = true {
		pc, err := t.getConn(req.Context(), addr, fresh, connectTimeout)
		if err != nil {
			CloseBody(cur)
			return nil, err
		}
		resp, err := pc.roundTrip(cur, upgrade)
		if err == nil {
			return resp, nil
		}
		if !fresh && pc.reused && pc.noResponse && req.Context().Err() == nil && safeToResend(cur, err) {
			if r, ok := Rewound(cur); ok {
				cur = r // stale pooled connection: once more on a new one
				continue
			}
		}
		CloseBody(cur)
		return nil, err
	}
}

// roundTripH2 sends a request that came in over HTTP/2 upstream in HTTP/2
// (h2c). Failures are classified as for HTTP/1.1: a *ConnectError when no
// connection could be had, or when the endpoint provably did not process
// the request (REFUSED_STREAM, a GOAWAY beyond its stream: see sendH2), an
// *UpstreamError once the request may have reached the endpoint.
func (t *Transport) roundTripH2(req *http.Request, connectTimeout time.Duration) (*http.Response, error) {
	if !IsGRPC(req) && t.speaksOnlyHTTP1(req.URL.Host) {
		return t.Send(asHTTP1(req), connectTimeout)
	}
	resp, err := t.sendH2(limit1xx(filterTrailers(req)), connectTimeout)
	if err == nil {
		if resp.StatusCode < 100 || resp.StatusCode > 599 {
			// An HTTP/2 :status is whatever the endpoint wrote; no answer
			// to the client can carry one outside the classes HTTP
			// defines (net/http's writer panics past 999).
			resp.Body.Close()
			return nil, &UpstreamError{Addr: req.URL.Host, Op: "http2 round trip", Written: true,
				Err: badResponse(":status " + strconv.Itoa(resp.StatusCode) + " is not an HTTP status")}
		}
		return resp, nil
	}
	var ce *ConnectError
	var se http2.StreamError
	var conn http2.ConnectionError
	switch {
	case strings.Contains(err.Error(), h2RequestHeaderListTooLarge):
		// Nothing was sent: the request is larger than the endpoint said
		// it takes. The client's to fix (400), not the endpoint's failure
		// to retry or count.
		return nil, &downstream.ClientError{Err: ErrRequestHeadersTooLarge}
	case errors.Is(err, errHTTP1Peer) && !IsGRPC(req):
		// The endpoint answered the connection preface in HTTP/1.x, before
		// any request was written: this one goes over HTTP/1.1.
		return t.Send(asHTTP1(req), connectTimeout)
	case errors.As(err, &ce):
		return nil, ce
	case errors.As(err, &se) && se.Cause == errTooMany1xx:
		// The stream was reset; the connection serves others.
		return nil, &UpstreamError{Addr: req.URL.Host, Op: "http2 round trip", Written: true,
			Err: &BadResponseError{Reason: errTooMany1xx.Error()}}
	case errors.As(err, &se) && se.Cause != nil && se.Cause.Error() == h2HeaderListTooLarge:
		return nil, &UpstreamError{Addr: req.URL.Host, Op: "http2 round trip", Written: true,
			Err: &BadResponseError{Reason: "response header list larger than " + strconv.FormatInt(t.maxHeaderBytes, 10) + " bytes"}}
	case errors.As(err, &conn):
		// x/net/http2's client makes a ConnectionError only of what it
		// read (a GOAWAY from the endpoint is a GoAwayError): the endpoint
		// broke HTTP/2, and the connection is closed. A header block far
		// over MaxHeaderListSize ends here (a field longer than it is a
		// COMPRESSION_ERROR, CONTINUATION frames past it a PROTOCOL_ERROR),
		// not in a stream error.
		return nil, &UpstreamError{Addr: req.URL.Host, Op: "http2 round trip", Written: true,
			Err: &BadResponseError{Reason: "HTTP/2 " + http2.ErrCode(conn).String() + " in what the endpoint sent (a header list over " +
				strconv.FormatInt(t.maxHeaderBytes, 10) + " bytes, or broken framing)"}}
	case req.Context().Err() != nil:
		return nil, req.Context().Err()
	}
	return nil, &UpstreamError{Addr: req.URL.Host, Op: "http2 round trip", Written: true, Err: err}
}

// h2HeaderListTooLarge is the cause of the stream error x/net/http2 ends a
// stream with when a response's header list is over MaxHeaderListSize
// within a frame's worth of its encoding (HPACK's indexing inflates it); the
// stream is reset and the connection serves others. x/net exports no error
// value to compare with: the attack suite's HTTP/2 upstream table
// (internal/attacktest) fails if the text changes.
const h2HeaderListTooLarge = "http2: response header list larger than advertised limit"

var errTooMany1xx = errors.New("more than " + strconv.Itoa(max1xxResponses) + " interim (1xx) responses")

// limit1xx is req with a trace that ends its stream at the interim
// response past max1xxResponses, as the HTTP/1.1 side does: x/net/http2
// bounds only their total size.
func limit1xx(req *http.Request) *http.Request {
	n := 0
	trace := &httptrace.ClientTrace{Got1xxResponse: func(int, textproto.MIMEHeader) error {
		// Called from the connection's read loop, one frame at a time.
		if n++; n > max1xxResponses {
			return errTooMany1xx
		}
		return nil
	}}
	return req.WithContext(httptrace.WithClientTrace(req.Context(), trace))
}

// h1OnlyFor is how long an endpoint that answered HTTP/2 in HTTP/1.x is
// believed to: an address may later belong to another instance.
const h1OnlyFor = 10 * time.Minute

func (t *Transport) speaksOnlyHTTP1(addr string) bool {
	v, ok := t.h1Only.Load(addr)
	return ok && time.Now().Before(v.(time.Time))
}

// asHTTP1 is req to be sent in HTTP/1.1.
func asHTTP1(req *http.Request) *http.Request {
	r := *req
	r.Proto, r.ProtoMajor, r.ProtoMinor = "HTTP/1.1", 1, 1
	return &r
}

var errHTTP1Peer = errors.New("the endpoint speaks HTTP/1.x, not HTTP/2 with prior knowledge")

// dialH2 opens a connection for the HTTP/2 transport and finds out, before
// the transport sends any request on it, whether the endpoint speaks
// HTTP/2 with prior knowledge: it sends the connection preface and reads
// the first frame header back, within the connect timeout. An HTTP/2
// server answers with a SETTINGS frame on stream 0. Anything else (an
// HTTP/1.x error, the bare HTML page Python's http.server and the
// development servers of Flask and Django send) marks the endpoint
// HTTP/1.1-only and fails the dial with errHTTP1Peer:
// nothing of any request was sent. The transport then gets a connection
// that swallows its own copy of the preface and hands back the bytes read.
func (t *Transport) dialH2(ctx context.Context, addr string, timeout time.Duration) (net.Conn, error) {
	c, err := t.Dial(ctx, addr, timeout)
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(cmp.Or(timeout, t.dialer.Timeout))
	_ = c.SetDeadline(deadline)
	head := make([]byte, 9) // a frame header
	n := 0
	if _, err = io.WriteString(c, http2.ClientPreface); err == nil {
		n, err = io.ReadFull(c, head)
	}
	_ = c.SetDeadline(time.Time{})
	settings := n == len(head) && http2.FrameType(head[3]) == http2.FrameSettings &&
		head[5]&0x7f == 0 && head[6] == 0 && head[7] == 0 && head[8] == 0
	switch {
	case n == 0 && errors.Is(err, io.EOF):
		// A close without a word says nothing of the protocol (an
		// instance restarting, a listener at its limit): a connect
		// failure, the endpoint not marked.
		_ = c.Close()
		return nil, &ConnectError{Addr: addr, Err: errors.New("closed at the HTTP/2 connection preface")}
	case !settings && (err == nil || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)):
		_ = c.Close()
		t.h1Only.Store(addr, time.Now().Add(h1OnlyFor))
		return nil, &ConnectError{Addr: addr, Err: errHTTP1Peer}
	case err != nil:
		_ = c.Close()
		return nil, &ConnectError{Addr: addr, Err: fmt.Errorf("HTTP/2 connection preface: %w", err)}
	}
	return &primedConn{Conn: c, read: head[:n], skip: []byte(http2.ClientPreface)}, nil
}

// primedConn is a connection whose first bytes were already read: they are
// given back first. For the HTTP/2 transport its preface was already sent
// too: the transport's own is swallowed (skip). The fast path (h1.go) uses
// it with bytes read ahead alone.
type primedConn struct {
	net.Conn
	read []byte // read ahead, for the transport's reader goroutine
	skip []byte // what is left of the preface to swallow, for its writer
}

func (c *primedConn) Read(p []byte) (int, error) { return readahead.Read(&c.read, c.Conn, p) }

func (c *primedConn) Write(p []byte) (int, error) {
	if len(c.skip) > 0 {
		k := min(len(c.skip), len(p))
		if !bytes.Equal(p[:k], c.skip[:k]) {
			return 0, errors.New("http2: unexpected connection preface")
		}
		c.skip = c.skip[k:]
		if k == len(p) {
			return k, nil
		}
		n, err := c.Conn.Write(p[k:])
		return k + n, err
	}
	return c.Conn.Write(p)
}

// Dial opens a new TCP connection to addr within timeout (0: the
// DialTimeout). A failure is a *ConnectError: nothing was sent.
func (t *Transport) Dial(ctx context.Context, addr string, timeout time.Duration) (net.Conn, error) {
	timeout = cmp.Or(timeout, t.dialer.Timeout)
	dctx, cancel := context.WithTimeout(ctx, timeout)
	dial := t.dial
	if t.dialName != nil && !isIPLiteral(addr) {
		dial = t.dialName
	}
	c, err := dial(dctx, "tcp", addr)
	if err == nil && t.handshake != nil {
		c, err = t.handshake(dctx, c, addr)
	}
	cancel()
	if err != nil {
		if ctx.Err() == nil && errors.Is(err, context.DeadlineExceeded) {
			// The connect timeout, not the request's deadline: a connect
			// failure, which must not read as the request timing out.
			timedOut := fmt.Errorf("%w after %v", ErrConnectTimeout, timeout)
			if te := (*TLSError)(nil); errors.As(err, &te) {
				err = &TLSError{Addr: te.Addr, Err: timedOut}
			} else {
				err = timedOut
			}
		}
		return nil, &ConnectError{Addr: addr, Err: err}
	}
	return c, nil
}

// ErrConnectTimeout is a *ConnectError's cause when the endpoint did not
// accept the connection within the connect timeout.
var ErrConnectTimeout = errors.New("connect timeout")

// safeToResend reports whether a request that failed on a reused connection
// with err, before any response byte, may be sent again.
func safeToResend(req *http.Request, err error) bool {
	var ue *UpstreamError
	if !errors.As(err, &ue) || errors.Is(err, ErrResponseHeaderTimeout) {
		return false
	}
	return !ue.Written || isIdempotent(req)
}

// Resendable reports whether req, which failed with err on a reused
// connection before any byte of the answer came, may be sent again on a
// new one: the endpoint may have closed the connection as it sat idle.
func Resendable(req *http.Request, err error) bool { return safeToResend(req, err) }

// CloseIdleConnections closes every pooled connection.
func (t *Transport) CloseIdleConnections() {
	t.pools.Range(func(k, v any) bool {
		p := v.(*hostPool)
		p.mu.Lock()
		idle := p.idle
		p.idle = nil
		p.mu.Unlock()
		for _, pc := range idle {
			_ = pc.conn.Close()
		}
		return true
	})
}

// hostPool holds idle connections to one endpoint, newest last.
type hostPool struct {
	mu       sync.Mutex // guards idle and lastUsed
	idle     []*persistConn
	lastUsed time.Time
}

func (t *Transport) pool(addr string) *hostPool {
	if p, ok := t.pools.Load(addr); ok {
		return p.(*hostPool)
	}
	p, _ := t.pools.LoadOrStore(addr, &hostPool{})
	return p.(*hostPool)
}

func (t *Transport) getConn(ctx context.Context, addr string, fresh bool, connectTimeout time.Duration) (*persistConn, error) {
	if !fresh {
		p := t.pool(addr)
		for {
			p.mu.Lock()
			n := len(p.idle)
			if n == 0 {
				p.mu.Unlock()
				break
			}
			pc := p.idle[n-1]
			p.idle[n-1] = nil
			p.idle = p.idle[:n-1]
			p.mu.Unlock()
			// A pooled connection must have nothing to read: any byte
			// there (a server's close, a body longer than it said, a body
			// to a HEAD, a response nobody asked for) would be read as the
			// next request's answer. One non-blocking peek sees it, as
			// net/http's read kept pending on idle connections does.
			if time.Since(pc.idleAt) > t.idleConnTimeout || !rawio.Alive(pc.conn) {
				_ = pc.conn.Close()
				continue
			}
			pc.reused = true
			return pc, nil
		}
	}
	c, err := t.Dial(ctx, addr, connectTimeout)
	if err != nil {
		return nil, err
	}
	c = rawio.Wrap(c)
	pc := &persistConn{t: t, addr: addr, conn: c, bw: bufio.NewWriterSize(c, 4096)}
	pc.head.conn, pc.head.left = c, -1
	pc.br = bufio.NewReaderSize(&pc.head, 4096)
	pc.abortIO = func() { _ = pc.conn.SetDeadline(aLongTimeAgo) }
	return pc, nil
}

func (t *Transport) putIdle(pc *persistConn) {
	p := t.pool(pc.addr)
	pc.idleAt = time.Now()
	p.mu.Lock()
	p.lastUsed = pc.idleAt
	if len(p.idle) < t.maxIdlePerHost {
		p.idle = append(p.idle, pc)
		p.mu.Unlock()
		return
	}
	p.mu.Unlock()
	_ = pc.conn.Close()
}

// persistConn is one upstream connection, owned by one request at a time.
type persistConn struct {
	t      *Transport
	addr   string
	conn   net.Conn
	head   headLimiter // what br reads the connection through
	br     *bufio.Reader
	bw     *bufio.Writer
	idleAt time.Time
	reused bool
	// noResponse is set while no byte of a response has been read in the
	// current round trip.
	noResponse bool

	hdrMu      sync.Mutex // guards headerDone and the header deadline
	headerDone bool

	// abortIO wakes any blocked read or write: what a request's end
	// (client gone, deadline) does to the round trip in progress. Made
	// once per connection, not once per request.
	abortIO func()
}

func (pc *persistConn) roundTrip(req *http.Request, upgrade bool) (*http.Response, error) {
	ctx := req.Context()
	pc.noResponse = true
	pc.headerDone = false
	// Cancellation (client gone, deadline) aborts any blocked I/O.
	stop := context.AfterFunc(ctx, pc.abortIO)
	var bw *bodyWriter
	fail := func(err error) (*http.Response, error) {
		stop()
		_ = pc.conn.Close()
		if bw != nil {
			_ = bw.abort()
		}
		if downstream.IsClientErr(err) {
			return nil, err // a client read error also cancels ctx: keep the cause
		}
		if ctxErr := ctx.Err(); ctxErr != nil {
			return nil, ctxErr
		}
		return nil, err
	}

	if err := WriteRequestHead(pc.bw, req); err != nil {
		return fail(err)
	}
	switch {
	case !hasBody(req):
		if err := pc.bw.Flush(); err != nil {
			// A partial request is nothing an endpoint can act on.
			return fail(&UpstreamError{Addr: pc.addr, Op: "write request", Err: err})
		}
		pc.startHeaderTimeout(ctx)
	case req.GetBody != nil && req.ContentLength >= 0 && req.ContentLength <= maxInlineBody:
		if err := pc.writeBody(req); err != nil {
			if downstream.IsClientErr(err) {
				return fail(err)
			}
			return fail(&UpstreamError{Addr: pc.addr, Op: "write request", Written: true, Err: err})
		}
		pc.startHeaderTimeout(ctx)
	default:
		bw = &bodyWriter{req: req, done: make(chan error, 1)}
		go func(bw *bodyWriter) { // a parameter: a captured bw would live on the heap for every request
			sent := false
			defer func() {
				if v := recover(); v != nil {
					panics.Report("transport.body", v)
					if !sent {
						bw.done <- errWriterPanicked
					}
					_ = pc.conn.SetDeadline(aLongTimeAgo)
				}
			}()
			err := pc.writeBody(req)
			if err == nil {
				// Before the result is sent: once it is, the connection
				// may already carry the next request.
				pc.startHeaderTimeout(ctx)
			}
			sent = true
			bw.done <- err
			if err != nil {
				// Wake the reader: the request can't be completed (and
				// the connection is never reused).
				_ = pc.conn.SetDeadline(aLongTimeAgo)
			}
		}(bw)
	}

	resp, err := pc.readResponse(req)
	pc.endHeaderTimeout(ctx)
	if err != nil {
		if bw != nil {
			var werr error
			if errors.Is(ctx.Err(), context.Canceled) {
				// net/http cancels on any client read error: the writer is
				// returning too (its reads and writes both fail now), with
				// the error that says why.
				werr = bw.wait()
			} else {
				werr, _ = bw.poll()
			}
			if werr != nil && downstream.IsClientErr(werr) {
				return fail(werr)
			}
			if werr != nil {
				return fail(&UpstreamError{Addr: pc.addr, Op: "write request", Written: true, Err: werr})
			}
		}
		if isTimeout(err) && ctx.Err() == nil {
			return fail(&UpstreamError{Addr: pc.addr, Op: "read response", Written: true, Err: ErrResponseHeaderTimeout})
		}
		return fail(&UpstreamError{Addr: pc.addr, Op: "read response", Written: true, Err: err})
	}

	if resp.StatusCode == http.StatusSwitchingProtocols {
		if !upgrade {
			resp.Body.Close()
			return fail(&UpstreamError{Addr: pc.addr, Op: "read response", Written: true,
				Err: errors.New("101 Switching Protocols to a request that asked for no upgrade")})
		}
		stop()
		resp.Body = &upgradedConn{pc: pc}
		return resp, nil
	}
	body := &responseBody{pc: pc, body: resp.Body, stop: stop, writer: bw,
		reusable: !resp.Close && !req.Close && !upgrade}
	if resp.Body == http.NoBody {
		body.finish(true)
		return resp, nil
	}
	resp.Body = body
	return resp, nil
}

// startHeaderTimeout starts the response header timeout once the request is
// written, unless the response has already begun.
func (pc *persistConn) startHeaderTimeout(ctx context.Context) {
	pc.hdrMu.Lock()
	defer pc.hdrMu.Unlock()
	if pc.headerDone {
		return
	}
	_ = pc.conn.SetReadDeadline(time.Now().Add(pc.t.responseHeaderTimeout))
	if ctx.Err() != nil {
		_ = pc.conn.SetDeadline(aLongTimeAgo) // canceled before the line above
	}
}

// endHeaderTimeout clears it once the response headers are read.
func (pc *persistConn) endHeaderTimeout(ctx context.Context) {
	pc.hdrMu.Lock()
	defer pc.hdrMu.Unlock()
	pc.headerDone = true
	_ = pc.conn.SetReadDeadline(time.Time{})
	if ctx.Err() != nil {
		_ = pc.conn.SetDeadline(aLongTimeAgo) // the cancel may have raced the reset above
	}
}

var errWriterPanicked = errors.New("request body writer failed (a bug: see sidecar_panics_total)")

// bodyWriter is the goroutine that streams a request body not held in
// memory. Its owner always collects its result, so it never outlives the
// round trip's response.
type bodyWriter struct {
	req      *http.Request
	done     chan error
	err      error
	finished bool
}

// wait blocks until the writer returns.
func (w *bodyWriter) wait() error {
	if !w.finished {
		w.err, w.finished = <-w.done, true
	}
	return w.err
}

// poll reports the writer's result if it has returned.
func (w *bodyWriter) poll() (error, bool) {
	if !w.finished {
		select {
		case w.err = <-w.done:
			w.finished = true
		default:
			return nil, false
		}
	}
	return w.err, true
}

// abort stops a writer still running: the upstream connection is already
// closed, and closing the body ends a read waiting on the client.
func (w *bodyWriter) abort() error {
	if _, ok := w.poll(); !ok {
		CloseBody(w.req)
	}
	return w.wait()
}

// readResponse reads the final response, skipping interim 1xx responses
// other than 101, at most max1xxResponses of them. Each response's status
// line and header block may take at most the transport's
// MaxResponseHeaderBytes; a longer one, like any response that does not
// parse, is a *BadResponseError (the caller closes the connection).
func (pc *persistConn) readResponse(req *http.Request) (*http.Response, error) {
	for interim := 0; ; interim++ {
		if _, err := pc.br.Peek(1); err != nil {
			return nil, err
		}
		pc.noResponse = false
		// The reader may fill its buffer past the head: allow that much
		// more through, then count the head's own bytes exactly.
		before := int64(pc.br.Buffered())
		head, _ := pc.br.Peek(int(before))
		if !bytes.Contains(head, headEnd) {
			// The head did not come whole: the reader will reuse its
			// buffer for the rest, so keep a copy of it as it comes.
			pc.head.seen = append(make([]byte, 0, 2*len(head)), head...)
		}
		pc.head.read, pc.head.over, pc.head.left = 0, false, pc.t.maxHeaderBytes+int64(pc.br.Size())
		resp, err := http.ReadResponse(pc.br, req)
		headBytes := before + pc.head.read - int64(pc.br.Buffered())
		pc.head.left = -1
		if pc.head.seen != nil {
			head, pc.head.seen = pc.head.seen, nil
		}
		if err == nil && resp.Close && headBytes <= int64(len(head)) {
			// ReadResponse drops a Connection header that says "close",
			// and with it the names of the other hop-by-hop headers it
			// lists: read them from the head as it came.
			dropConnectionOptions(resp.Header, head[:headBytes])
		}
		switch {
		case err != nil && pc.head.over, err == nil && headBytes > pc.t.maxHeaderBytes:
			if resp != nil {
				resp.Body.Close()
			}
			return nil, &BadResponseError{Reason: "response header larger than " + strconv.FormatInt(pc.t.maxHeaderBytes, 10) + " bytes"}
		case err != nil && !isIOError(err):
			return nil, badResponse(err.Error())
		case err != nil:
			return nil, err
		}
		if resp.StatusCode >= 100 && resp.StatusCode < 200 && resp.StatusCode != http.StatusSwitchingProtocols {
			if interim == max1xxResponses {
				return nil, &BadResponseError{Reason: errTooMany1xx.Error()}
			}
			continue
		}
		return resp, nil
	}
}

// headEnd ends a head whose lines end in CRLF.
var headEnd = []byte("\r\n\r\n")

// dropConnectionOptions deletes from h the headers that the Connection
// fields of the raw response head name, continuation lines (obs-fold, which
// ReadResponse joins to the field they follow) included.
func dropConnectionOptions(h http.Header, head []byte) {
	inConnection := false
	for len(head) > 0 {
		line := head
		if i := bytes.IndexByte(head, '\n'); i >= 0 {
			line, head = head[:i], head[i+1:]
		} else {
			head = nil
		}
		value := line
		if len(line) == 0 || line[0] != ' ' && line[0] != '\t' {
			var name []byte
			var ok bool
			name, value, ok = bytes.Cut(line, []byte(":"))
			inConnection = ok && ascii.EqualFold(bytes.TrimSpace(name), "connection")
		}
		if !inConnection {
			continue
		}
		for _, opt := range bytes.Split(value, []byte(",")) {
			if opt = bytes.TrimSpace(opt); len(opt) > 0 {
				h.Del(string(opt))
			}
		}
	}
}

// isIOError reports whether err came from reading the connection (closed,
// reset, timed out) rather than from what was read.
func isIOError(err error) bool {
	var ne net.Error
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.As(err, &ne) ||
		errors.Is(err, net.ErrClosed) || errors.Is(err, os.ErrDeadlineExceeded)
}

// headLimiter is the connection as the response reader sees it: while a
// response head is read, it lets at most left bytes through and counts
// them; otherwise (left < 0) it is the connection itself. It keeps a
// header line of any length from growing the reader without bound.
type headLimiter struct {
	conn net.Conn
	left int64  // bytes that may still be read; < 0: no limit
	read int64  // bytes read under the limit
	over bool   // the limit was reached
	seen []byte // when not nil, what was read under the limit is appended
}

var errHeadTooLarge = errors.New("response header too large")

func (l *headLimiter) Read(p []byte) (int, error) {
	if l.left < 0 {
		return l.conn.Read(p)
	}
	if l.left == 0 {
		l.over = true
		return 0, errHeadTooLarge
	}
	if int64(len(p)) > l.left {
		p = p[:l.left]
	}
	n, err := l.conn.Read(p)
	l.left -= int64(n)
	l.read += int64(n)
	if l.seen != nil {
		l.seen = append(l.seen, p[:n]...)
	}
	return n, err
}

func hasBody(req *http.Request) bool { return req.Body != nil && req.Body != http.NoBody }

// HeadWriter is what a request head is written to: a *bufio.Writer, a
// *bytes.Buffer.
type HeadWriter interface {
	io.Writer
	io.ByteWriter
	io.StringWriter
}

// WriteRequestHead writes req's request line and header block, as the
// transport sends them: the Host first, the header fields but the framing
// ones, then the framing the body needs (Content-Length, or chunked with
// the forwardable trailers announced), and Connection: close when req.Close.
func WriteRequestHead(w HeadWriter, req *http.Request) error {
	w.WriteString(req.Method)
	w.WriteByte(' ')
	w.WriteString(req.URL.RequestURI())
	w.WriteString(" HTTP/1.1\r\nHost: ")
	host := req.Host
	if host == "" {
		host = req.URL.Host
	}
	if !httpguts.ValidHostHeader(host) {
		return fmt.Errorf("invalid Host %q", host)
	}
	w.WriteString(host)
	w.WriteString("\r\n")
	for k, vv := range req.Header {
		switch k {
		case "Host", "Content-Length", "Transfer-Encoding", "Trailer":
			continue
		}
		if !httpguts.ValidHeaderFieldName(k) {
			return fmt.Errorf("invalid header name %q", k)
		}
		for _, v := range vv {
			if !httpguts.ValidHeaderFieldValue(v) {
				return fmt.Errorf("invalid value for header %q", k)
			}
			w.WriteString(k)
			w.WriteString(": ")
			w.WriteString(v)
			w.WriteString("\r\n")
		}
	}
	switch {
	case hasBody(req) && req.ContentLength > 0:
		w.WriteString("Content-Length: ")
		var b [20]byte
		w.Write(strconv.AppendInt(b[:0], req.ContentLength, 10))
		w.WriteString("\r\n")
	case hasBody(req):
		w.WriteString("Transfer-Encoding: chunked\r\n")
		first := true
		for k := range req.Trailer {
			if !forwardableTrailer(k) {
				continue // never sent
			}
			if first {
				w.WriteString("Trailer: ")
			} else {
				w.WriteString(", ")
			}
			first = false
			w.WriteString(k)
		}
		if !first {
			w.WriteString("\r\n")
		}
	case req.Method == http.MethodPost || req.Method == http.MethodPut || req.Method == http.MethodPatch:
		w.WriteString("Content-Length: 0\r\n")
	}
	if req.Close {
		w.WriteString("Connection: close\r\n")
	}
	_, err := w.WriteString("\r\n")
	return err
}

var copyBufPool = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

// writeBody streams the request body, flushing after every read so that a
// streamed upload reaches the endpoint as it arrives. It closes the body.
func (pc *persistConn) writeBody(req *http.Request) (err error) {
	defer func() {
		if cerr := req.Body.Close(); err == nil && cerr != nil && downstream.IsClientErr(cerr) {
			err = cerr
		}
	}()
	bp := copyBufPool.Get().(*[]byte)
	defer copyBufPool.Put(bp)
	buf := *bp
	chunked := req.ContentLength <= 0
	var written int64
	for {
		n, rerr := req.Body.Read(buf)
		if n > 0 {
			written += int64(n)
			if !chunked && written > req.ContentLength {
				return errors.New("request body longer than its Content-Length")
			}
			if chunked {
				var h [18]byte
				pc.bw.Write(strconv.AppendInt(h[:0], int64(n), 16))
				pc.bw.WriteString("\r\n")
			}
			pc.bw.Write(buf[:n])
			if chunked {
				pc.bw.WriteString("\r\n")
			}
			if err := pc.bw.Flush(); err != nil {
				return err
			}
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			return rerr
		}
	}
	if !chunked {
		if written != req.ContentLength {
			return fmt.Errorf("request body of %d bytes, Content-Length said %d", written, req.ContentLength)
		}
		return nil
	}
	pc.bw.WriteString("0\r\n")
	for k, vv := range req.Trailer {
		for _, v := range vv {
			if forwardableTrailer(k) && httpguts.ValidHeaderFieldName(k) && httpguts.ValidHeaderFieldValue(v) {
				pc.bw.WriteString(k + ": " + v + "\r\n")
			}
		}
	}
	pc.bw.WriteString("\r\n")
	return pc.bw.Flush()
}

// forwardableTrailer reports whether a request trailer named k is passed
// on: not one a trailer may not carry (RFC 9110, 6.5.1: framing, routing,
// authentication), not one of the fields the proxies set themselves
// (X-Forwarded-*, Forwarded, X-Sidecar-*, the trace context), which an app
// that merges trailers into headers would take as the sidecar's, and no
// name with '_', which CGI-style servers read as its '-' look-alike.
func forwardableTrailer(k string) bool {
	if !httpguts.ValidTrailerHeader(k) || strings.IndexByte(k, '_') >= 0 {
		return false
	}
	c := http.CanonicalHeaderKey(k)
	switch {
	case strings.HasPrefix(c, "X-Forwarded-"), strings.HasPrefix(c, "X-Sidecar-"):
		return false
	}
	switch c {
	case "Forwarded", "Traceparent", "Tracestate", "Baggage", "Grpc-Timeout":
		return false
	}
	return true
}

// filterTrailers keeps req's trailers to the forwardable ones
// (forwardableTrailer) for the HTTP/2 transport, which announces the
// declared names with the request and sends the trailer map as it is once
// the body has ended: the names are dropped now, and what the client's
// trailer brings with the body's end is filtered again then.
func filterTrailers(req *http.Request) *http.Request {
	if len(req.Trailer) == 0 || !hasBody(req) {
		return req
	}
	dropUnforwardable(req.Trailer)
	r := *req
	r.Body = &trailerFilter{ReadCloser: req.Body, trailer: req.Trailer}
	if get := req.GetBody; get != nil {
		r.GetBody = func() (io.ReadCloser, error) {
			b, err := get()
			if err != nil {
				return nil, err
			}
			return &trailerFilter{ReadCloser: b, trailer: req.Trailer}, nil
		}
	}
	return &r
}

func dropUnforwardable(h http.Header) {
	for k := range h {
		if !forwardableTrailer(k) {
			delete(h, k)
		}
	}
}

// trailerFilter is a request body that filters its request's trailer map
// once it ends (the server fills the map before the body's EOF).
type trailerFilter struct {
	io.ReadCloser
	trailer http.Header
}

func (f *trailerFilter) Read(p []byte) (int, error) {
	n, err := f.ReadCloser.Read(p)
	if err == io.EOF {
		dropUnforwardable(f.trailer)
	}
	return n, err
}

// responseBody returns the connection to the pool once the body has been
// read to its end, and closes it otherwise.
type responseBody struct {
	pc       *persistConn
	body     io.ReadCloser
	stop     func() bool
	writer   *bodyWriter // nil unless the request body was streamed
	reusable bool
	done     bool
}

func (b *responseBody) Read(p []byte) (int, error) {
	if b.done {
		return 0, io.EOF
	}
	n, err := b.body.Read(p)
	if err == io.EOF {
		b.finish(true)
		return n, io.EOF
	}
	if err != nil {
		b.finish(false)
		return n, &UpstreamError{Addr: b.pc.addr, Op: "read response body", Written: true, Err: err}
	}
	return n, nil
}

func (b *responseBody) Close() error {
	if !b.done {
		b.finish(false)
	}
	return nil
}

func (b *responseBody) finish(complete bool) {
	b.done = true
	stopped := b.stop()
	// Bytes beyond the response (a server that sent more than it framed)
	// would be read as the next request's response: never reuse then.
	reuse := complete && b.reusable && stopped && b.pc.br.Buffered() == 0
	if b.writer != nil {
		if err, ok := b.writer.poll(); !ok || err != nil {
			reuse = false // still uploading (or failed): the connection is spent
		}
	}
	if reuse {
		b.pc.t.putIdle(b.pc)
		return
	}
	_ = b.pc.conn.Close()
	if b.writer != nil {
		_ = b.writer.abort()
	}
}

// upgradedConn is the response body of a 101 Switching Protocols: the raw
// connection, with whatever the reader already buffered.
type upgradedConn struct{ pc *persistConn }

func (u *upgradedConn) Read(p []byte) (int, error)  { return u.pc.br.Read(p) }
func (u *upgradedConn) Write(p []byte) (int, error) { return u.pc.conn.Write(p) }
func (u *upgradedConn) Close() error                { return u.pc.conn.Close() }

func isUpgrade(req *http.Request) bool {
	return req.Header.Get("Upgrade") != "" && httpguts.HeaderValuesContainsToken(req.Header["Connection"], "Upgrade")
}

// isIdempotent follows RFC 9110 and the Idempotency-Key convention, as
// net/http's own replay rule does.
func isIdempotent(req *http.Request) bool {
	switch req.Method {
	case http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace, http.MethodPut, http.MethodDelete:
		return true
	}
	return HasIdempotencyKey(req)
}

// HasIdempotencyKey reports whether the client marked the request as safe
// to repeat.
func HasIdempotencyKey(req *http.Request) bool {
	_, a := req.Header["Idempotency-Key"]
	_, b := req.Header["X-Idempotency-Key"]
	return a || b
}

// Rewound returns a copy of req whose body reads from the start again, if
// it can be had.
func Rewound(req *http.Request) (*http.Request, bool) {
	if !hasBody(req) {
		return req, true
	}
	if req.GetBody == nil {
		return nil, false
	}
	b, err := req.GetBody()
	if err != nil {
		return nil, false
	}
	r := *req
	r.Body = b
	return &r, true
}

func CloseBody(req *http.Request) {
	if req.Body != nil {
		_ = req.Body.Close()
	}
}

// IsGRPC reports whether r is a gRPC call (HTTP/2 with a gRPC content type).
func IsGRPC(r *http.Request) bool {
	return r.ProtoMajor == 2 && strings.HasPrefix(r.Header.Get("Content-Type"), "application/grpc")
}

// aLongTimeAgo is a deadline in the past: set, it ends a blocked read or
// write at once.
var aLongTimeAgo = time.Unix(1, 0)

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// CloseWrite half-closes the upgraded connection, so one direction can end
// while the other still flows.
func (u *upgradedConn) CloseWrite() error {
	if cw, ok := u.pc.conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return u.pc.conn.Close()
}

// headReaderPool holds the readers ParseResponseHead reads heads through.
var headReaderPool = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, 4096) }}

// ParseResponseHead parses head, one whole response head (status line and
// header block through its empty line), as the transport reads one: by
// net/http's rules, with the fields a Connection: close names dropped. The
// response's Body is not to be read (its framing is in ContentLength,
// TransferEncoding and Close; http.NoBody when it has none, as for a HEAD,
// a 204 or a 304). A head that does not parse is a *BadResponseError.
// Interim (1xx) responses are returned like any other: the caller skips
// them, at most MaxInterimResponses.
func ParseResponseHead(head []byte, req *http.Request) (*http.Response, error) {
	if resp, ok := parseUsualHead(head, req); ok {
		return resp, nil
	}
	resp, err := readHead(head, req)
	if err != nil {
		return nil, badResponse(err.Error())
	}
	if resp.Close {
		dropConnectionOptions(resp.Header, head)
	}
	return resp, nil
}

// CutHeadError is what the transport reports for a connection that ended
// after partial, the start of an answer's head and no more: the head's own
// fault when what came already breaks HTTP (a *BadResponseError, as the
// reader finds it at the end), else io.ErrUnexpectedEOF.
func CutHeadError(partial []byte, req *http.Request) error {
	resp, err := readHead(partial, req)
	if err != nil && !isIOError(err) {
		return badResponse(err.Error())
	}
	if resp != nil {
		resp.Body.Close()
	}
	return io.ErrUnexpectedEOF
}

// readHead reads a response head out of head with net/http's reader.
func readHead(head []byte, req *http.Request) (*http.Response, error) {
	br := headReaderPool.Get().(*bufio.Reader)
	br.Reset(bytes.NewReader(head))
	resp, err := http.ReadResponse(br, req)
	br.Reset(nil)
	headReaderPool.Put(br)
	return resp, err
}

// MaxInterimResponses bounds the interim (1xx) responses read before the
// final one.
const MaxInterimResponses = max1xxResponses

// ErrTooManyInterim is the reason of the *BadResponseError for a response
// past MaxInterimResponses interim ones.
var ErrTooManyInterim = errTooMany1xx
