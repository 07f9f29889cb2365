package upstream

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"slices"
	"sync"
	"time"

	"golang.org/x/net/http2"
)

// h2Pool holds the HTTP/2 transport's connections, per endpoint. It is the
// http2.Transport's ConnPool, so that x/net tells it of a connection that
// closed or got a GOAWAY (MarkDead); but the Transport takes connections
// from it itself and sends on them with ClientConn.RoundTrip (sendH2),
// never through http2.Transport.RoundTrip, whose loop sends a request the
// endpoint refused (REFUSED_STREAM, a GOAWAY beyond its stream) to the
// same endpoint again, and again after waits of 1s, 2s, 4s..., while the
// call's deadline runs out. Safe for concurrent use; the zero value is not
// usable (it needs its Transport).
type h2Pool struct {
	t *Transport

	mu      sync.Mutex                     // guards conns, addrs, dialing, and streams' reservation
	conns   map[string][]*http2.ClientConn // endpoint address -> its connections
	addrs   map[*http2.ClientConn]string   // the other way round, for MarkDead
	dialing map[string]*h2Dial             // endpoint address -> the dial under way
}

var _ http2.ClientConnPool = (*h2Pool)(nil)

// h2Dial is a new connection being made to an endpoint: the requests that
// want one while it is under way wait for it rather than dial one each.
type h2Dial struct {
	done chan struct{} // closed once cc or err is set
	cc   *http2.ClientConn
	err  error
	// abandoned is set when the dial failed because the request that made
	// it went away: the endpoint is not to blame, a waiting request dials
	// again.
	abandoned bool
}

// GetClientConn implements http2.ClientConnPool: a connection to addr with
// a stream reserved for req.
func (p *h2Pool) GetClientConn(req *http.Request, addr string) (*http2.ClientConn, error) {
	cc, _, err := p.get(req.Context(), addr, 0)
	return cc, err
}

// get returns a connection to addr with a stream reserved: a pooled one
// with room, else a new one, dialled through dialH2 (which finds out the
// endpoints that speak only HTTP/1.x) within connectTimeout (0: the
// DialTimeout). Requests that find none while a dial to addr is under way
// wait for it. dialled reports that the connection was made for this
// request.
func (p *h2Pool) get(ctx context.Context, addr string, connectTimeout time.Duration) (cc *http2.ClientConn, dialled bool, err error) {
	redialled := false
	for {
		p.mu.Lock()
		for _, cc := range p.conns[addr] {
			if cc.ReserveNewRequest() {
				p.mu.Unlock()
				return cc, false, nil
			}
		}
		d := p.dialing[addr]
		mine := d == nil
		if mine {
			d = &h2Dial{done: make(chan struct{})}
			if p.dialing == nil {
				p.dialing = map[string]*h2Dial{}
			}
			p.dialing[addr] = d
		}
		p.mu.Unlock()
		if mine {
			p.dial(ctx, addr, connectTimeout, d)
		} else {
			select {
			case <-d.done:
			case <-ctx.Done():
				return nil, false, ctx.Err()
			}
		}
		switch {
		case d.err != nil && !mine && d.abandoned && ctx.Err() == nil:
			continue
		case d.err != nil:
			return nil, false, d.err
		}
		p.mu.Lock()
		reserved := d.cc.ReserveNewRequest()
		p.mu.Unlock()
		if reserved {
			return d.cc, mine, nil
		}
		if st := d.cc.State(); st.Closed || st.Closing {
			// It went before this request had a stream of it: another
			// request's stream may have ended it (an answer that broke
			// HTTP/2 closes the connection). Once more on a new one;
			// dialling on would only loop on an endpoint that closes
			// every connection.
			if !redialled {
				redialled = true
				continue
			}
			return nil, false, &ConnectError{Addr: addr, Err: errH2ClosedAtOnce}
		}
		// Its streams were taken by the requests that waited with this
		// one: look again.
	}
}

var errH2ClosedAtOnce = errors.New("the endpoint closed the new HTTP/2 connection (or sent GOAWAY on it) before any request")

// dial makes d's connection, adds it to the pool and wakes the requests
// waiting for it.
func (p *h2Pool) dial(ctx context.Context, addr string, connectTimeout time.Duration, d *h2Dial) {
	c, err := p.t.dialH2(ctx, addr, connectTimeout)
	if err == nil {
		d.cc, err = p.t.h2.NewClientConn(c)
		if err != nil {
			_ = c.Close()
			err = &ConnectError{Addr: addr, Err: fmt.Errorf("HTTP/2 connection preface: %w", err)}
		} else if err = p.settled(ctx, d.cc, connectTimeout); err != nil {
			_ = d.cc.Close()
			d.cc = nil
			err = &ConnectError{Addr: addr, Err: fmt.Errorf("HTTP/2 connection preface: %w", err)}
		}
	}
	d.err, d.abandoned = err, err != nil && ctx.Err() != nil
	p.mu.Lock()
	delete(p.dialing, addr)
	if err == nil {
		if p.conns == nil {
			p.conns, p.addrs = map[string][]*http2.ClientConn{}, map[*http2.ClientConn]string{}
		}
		p.conns[addr] = append(p.conns[addr], d.cc)
		p.addrs[d.cc] = addr
	}
	p.mu.Unlock()
	close(d.done)
}

// settled waits, within the connect timeout, until the endpoint's
// SETTINGS are known on cc: the first request then keeps to the endpoint's
// limits (the size of a header list, the streams at once), where one sent
// before them is refused in ways that read as the endpoint failing (a
// header list over its limit closed the connection with
// COMPRESSION_ERROR, answered 502 instead of 400). An endpoint sends its
// SETTINGS first, so the answer to a PING comes after them: one round
// trip for each new connection. An endpoint that does not answer the PING
// in time gets its requests anyway, as it did before the wait; an error is
// the connection failing, or ctx ending.
func (p *h2Pool) settled(ctx context.Context, cc *http2.ClientConn, connectTimeout time.Duration) error {
	pctx, cancel := context.WithTimeout(ctx, cmp.Or(connectTimeout, p.t.dialer.Timeout))
	defer cancel()
	err := cc.Ping(pctx)
	if err != nil && ctx.Err() == nil && errors.Is(err, context.DeadlineExceeded) {
		if st := cc.State(); !st.Closed && !st.Closing {
			return nil
		}
	}
	return err
}

// MarkDead implements http2.ClientConnPool: x/net calls it when cc closed
// or got a GOAWAY; it takes no new streams.
func (p *h2Pool) MarkDead(cc *http2.ClientConn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	addr, ok := p.addrs[cc]
	if !ok {
		return
	}
	delete(p.addrs, cc)
	list := slices.DeleteFunc(p.conns[addr], func(c *http2.ClientConn) bool { return c == cc })
	if len(list) == 0 {
		delete(p.conns, addr)
	} else {
		p.conns[addr] = list
	}
}

// closeAll closes every connection of the pool, a stream on it or not:
// the transport is closing, and a connection still carrying a stream that
// ended a moment ago must not outlive it.
func (p *h2Pool) closeAll() {
	p.mu.Lock()
	var all []*http2.ClientConn
	for addr, list := range p.conns {
		all = append(all, list...)
		delete(p.conns, addr)
	}
	clear(p.addrs)
	p.mu.Unlock()
	for _, cc := range all {
		_ = cc.Close()
	}
}

// Errors of x/net/http2's client, not exported, that say a request was not
// processed: the connection went (closed, or a GOAWAY) before its stream
// opened, or a GOAWAY named a last stream before it. The tests of
// h2Unprocessed fail when a text changes.
const (
	h2GotGoAway          = "http2: Transport received Server's graceful shutdown GOAWAY"
	h2ConnUnusable       = "http2: client conn not usable"
	h2ConnNotEstablished = "http2: client conn could not be established"
)

// h2Unprocessed returns why err, from ClientConn.RoundTrip, shows that the
// endpoint did not process the request (RFC 9113, 8.7), or "" when it
// does not; refused is set for a REFUSED_STREAM, the endpoint's own word
// on this request.
func h2Unprocessed(err error) (why string, refused bool) {
	var se http2.StreamError
	switch {
	case errors.As(err, &se) && se.Code == http2.ErrCodeRefusedStream:
		return "the endpoint refused the HTTP/2 stream (REFUSED_STREAM), the request unprocessed", true
	}
	switch err.Error() {
	case h2GotGoAway:
		return "the endpoint's GOAWAY came before it processed the request", false
	case h2ConnUnusable, h2ConnNotEstablished:
		return "the HTTP/2 connection went before the request's stream opened", false
	}
	return "", false
}

// sendH2 sends req on a connection of the pool. A request the endpoint
// did not process is a *ConnectError, for the chain to send elsewhere:
// nothing of it was acted on. Only when the connection was not made for
// this request and it went (a GOAWAY: the endpoint restarting, or closing
// connections at an age) is the request sent once more, at once, on
// another, as a request on a stale HTTP/1.1 connection is: that is
// connection management, not the endpoint failing. A REFUSED_STREAM is
// never sent again here: the endpoint said no to this request.
func (t *Transport) sendH2(req *http.Request, connectTimeout time.Duration) (*http.Response, error) {
	addr := req.URL.Host
	if _, _, err := net.SplitHostPort(addr); err != nil {
		addr = net.JoinHostPort(addr, "80")
	}
	for again := false; ; again = true {
		cc, dialled, err := t.h2pool.get(req.Context(), addr, connectTimeout)
		switch {
		case err == nil:
		case !again:
			// The body is left as it is: an endpoint found to speak only
			// HTTP/1.x gets the request over HTTP/1.1 (roundTripH2).
			return nil, err
		case errors.Is(err, errHTTP1Peer):
			// The fallback would send the first try's body, which is
			// spent: the chain is to send the request again.
			CloseBody(req)
			return nil, &ConnectError{Addr: addr, Err: errors.New("the endpoint answered in HTTP/1.x when the request was sent again")}
		default:
			CloseBody(req)
			return nil, err
		}
		resp, err := cc.RoundTrip(req)
		if err == nil {
			return resp, nil
		}
		if err.Error() == h2ConnNotEstablished {
			// Closed before its first stream: x/net keeps such a
			// connection for a while so that one request hears of it.
			t.h2pool.MarkDead(cc)
		}
		why, refused := h2Unprocessed(err)
		if why == "" {
			return nil, err
		}
		if !refused && !dialled && !again && req.Context().Err() == nil {
			if r, ok := Rewound(req); ok {
				req = r
				continue
			}
		}
		return nil, &ConnectError{Addr: addr, Err: fmt.Errorf("%s: %w", why, err)}
	}
}
