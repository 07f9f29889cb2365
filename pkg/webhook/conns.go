package webhook

import (
	"context"
	"crypto/tls"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// connGuard bounds the webhook's connections: at most max in all and
// perClient from one source address. A connection that would pass a bound
// takes the place of a quiet one: idle (between requests; a new one, in
// its TLS handshake or before its first request, only once freshGrace has
// passed and the client has sent nothing for stallAfter), or stalled
// (every request on it waiting for bytes the client has not sent for
// stallAfter):
// the longest quiet of its own client first, else the longest quiet of the
// client that holds the most connections. It is refused (closed at once)
// only when every connection it could replace is working, so Accept never
// blocks: connections left idle on purpose, or trickling their requests
// in, can't lock the API server out, and no one client can hold every
// slot. Safe for concurrent use.
type connGuard struct {
	max, perClient int
	log            *slog.Logger
	now            func() time.Time

	mu      sync.Mutex // guards the fields below
	clients map[netip.Addr]*clientConns
	total   int
	// evicted and refused count since the last warning (at most one every
	// warnEvery).
	evicted, refused int
	lastWarn         time.Time
}

const warnEvery = 10 * time.Second

// stallAfter is how long a busy connection's requests may wait for the
// client's next byte before it may be closed to make room. The API server
// sends a review's headers and body at once, in milliseconds; a client
// holding a request open on purpose sends a byte now and then.
const stallAfter = 500 * time.Millisecond

// freshGrace is how long a new connection, in its TLS handshake or waiting
// for its first request, is kept whatever the pressure: on a busy machine
// an honest client's handshake can pause longer than stallAfter between
// reads, and closing it then would refuse the very review the room was
// made for. Past it, a new connection the client has sent nothing on for
// stallAfter may be closed like a stalled one.
const freshGrace = time.Second

// clientConns are one source address's connections.
type clientConns struct {
	conns map[*guardedConn]struct{}
}

// guardedConn is an admitted connection.
type guardedConn struct {
	net.Conn
	g      *connGuard
	client netip.Addr
	// Guarded by g.mu.
	busy      bool
	fresh     bool      // no request yet
	admitted  time.Time // when it was accepted
	idleSince time.Time
	gone      bool // released: closed, hijacked or evicted

	// Kept by the connection's reads and its handlers, without g.mu.
	lastRead  atomic.Int64 // g.now() of the last byte from the client, in Unix ns
	handlers  atomic.Int32 // requests being handled
	waiting   atomic.Int32 // of which waiting in a read of their body
	busySince atomic.Int64 // g.now() when handlers last went from 0 to 1, in Unix ns
}

// Read notes when the client last sent something.
func (c *guardedConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 {
		c.lastRead.Store(c.g.now().UnixNano())
	}
	return n, err
}

// quietSince says since when c has been idle or stalled, if it is; the
// caller holds g.mu. A busy connection is stalled when none of its
// requests is being worked on (each waits for its body, or none has got
// past its headers) and the client has sent nothing for stallAfter.
func (c *guardedConn) quietSince(now time.Time) (time.Time, bool) {
	if !c.busy && c.fresh {
		last := time.Unix(0, c.lastRead.Load())
		if now.Sub(c.admitted) >= freshGrace && now.Sub(last) >= stallAfter {
			return last, true
		}
		return time.Time{}, false
	}
	if !c.busy {
		return c.idleSince, true
	}
	last := time.Unix(0, c.lastRead.Load())
	if c.waiting.Load() == c.handlers.Load() && now.Sub(last) >= stallAfter {
		return last, true
	}
	return time.Time{}, false
}

// waitingSince says since when c's requests have been waiting for their
// bodies, if every one of them is; the caller holds g.mu. The API server
// sends a review's body with its headers: a connection still waiting for
// one after bodyWait is sending it slowly, whether or not a byte came
// lately (a client that trickles a byte more often than stallAfter is never
// quiet).
func (c *guardedConn) waitingSince(now time.Time) (time.Time, bool) {
	n := c.handlers.Load()
	if !c.busy || n == 0 || c.waiting.Load() != n {
		return time.Time{}, false
	}
	since := time.Unix(0, c.busySince.Load())
	return since, now.Sub(since) >= bodyWait
}

// bodyWait is how long a request may wait for its body before its
// connection may be closed to make room when no connection is quiet.
const bodyWait = 50 * time.Millisecond

func newConnGuard(max, perClient int, log *slog.Logger) *connGuard {
	return &connGuard{max: max, perClient: perClient, log: log, now: time.Now, clients: map[netip.Addr]*clientConns{}}
}

// Listener returns ln with the guard on every connection it accepts.
func (g *connGuard) Listener(ln net.Listener) net.Listener {
	return &guardedListener{Listener: ln, g: g}
}

type guardedListener struct {
	net.Listener
	g *connGuard
}

func (l *guardedListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if gc := l.g.admit(c); gc != nil {
			return gc, nil
		}
	}
}

// admit admits c, making room by evicting an idle connection if it must,
// or closes it and returns nil.
func (g *connGuard) admit(c net.Conn) *guardedConn {
	client := clientAddr(c.RemoteAddr())
	gc := &guardedConn{Conn: c, g: g, client: client}
	g.mu.Lock()
	now := g.now()
	gc.idleSince, gc.admitted, gc.fresh = now, now, true
	gc.lastRead.Store(now.UnixNano())
	cc := g.clients[client]
	var evict []*guardedConn
	ok := true
	if cc != nil && len(cc.conns) >= g.perClient {
		if v := cc.makesRoom(now); v != nil {
			evict = append(evict, v)
			g.release(v)
		} else {
			ok = false
		}
	}
	if ok && g.total >= g.max {
		if v := g.makesRoomOfBiggest(now); v != nil {
			evict = append(evict, v)
			g.release(v)
		} else {
			ok = false
		}
	}
	if ok {
		if cc = g.clients[client]; cc == nil {
			cc = &clientConns{conns: map[*guardedConn]struct{}{}}
			g.clients[client] = cc
		}
		cc.conns[gc] = struct{}{}
		g.total++
		g.evicted += len(evict)
	} else {
		g.refused++
	}
	warn := g.evicted+g.refused > 0 && now.Sub(g.lastWarn) >= warnEvery
	var evicted, refused, total int
	if warn {
		evicted, refused, total = g.evicted, g.refused, g.total
		g.evicted, g.refused, g.lastWarn = 0, 0, now
	}
	g.mu.Unlock()
	for _, v := range evict {
		_ = v.Conn.Close()
	}
	if warn {
		g.log.Warn("webhook connections over their limits: idle or stalled ones closed to make room, the rest refused (is something other than the API server connecting?)",
			"evicted", evicted, "refused", refused, "open", total, "maxConns", g.max, "maxConnsPerClient", g.perClient, "lastClient", client.String())
	}
	if !ok {
		_ = c.Close()
		return nil
	}
	return gc
}

// quietOrder is what makes room for a new connection, in turn: an idle or
// stalled connection, else, when none is, one waiting for a body that
// should have come with its headers.
var quietOrder = []func(*guardedConn, time.Time) (time.Time, bool){(*guardedConn).quietSince, (*guardedConn).waitingSince}

// makesRoom is the client's connection a new one of its own replaces, by
// quietOrder, or nil.
func (cc *clientConns) makesRoom(now time.Time) *guardedConn {
	for _, quiet := range quietOrder {
		if v, _ := cc.longestQuiet(now, quiet); v != nil {
			return v
		}
	}
	return nil
}

// makesRoomOfBiggest is the connection a new one replaces when every place
// is taken, by quietOrder, or nil.
func (g *connGuard) makesRoomOfBiggest(now time.Time) *guardedConn {
	for _, quiet := range quietOrder {
		if v := g.longestQuietOfBiggest(now, quiet); v != nil {
			return v
		}
	}
	return nil
}

// longestQuiet is the client's connection quiet the longest by quiet
// (quietSince: idle or stalled; waitingSince: waiting for a body), and since
// when, or nil.
func (cc *clientConns) longestQuiet(now time.Time, quiet func(*guardedConn, time.Time) (time.Time, bool)) (*guardedConn, time.Time) {
	var best *guardedConn
	var since time.Time
	for c := range cc.conns {
		if t, ok := quiet(c, now); ok && (best == nil || t.Before(since)) {
			best, since = c, t
		}
	}
	return best, since
}

// longestQuietOfBiggest is the connection quiet the longest by quiet among
// those of the client with the most connections that has such a one.
func (g *connGuard) longestQuietOfBiggest(now time.Time, quiet func(*guardedConn, time.Time) (time.Time, bool)) *guardedConn {
	var best *guardedConn
	var bestSince time.Time
	size := 0
	for _, cc := range g.clients {
		v, since := cc.longestQuiet(now, quiet)
		if v == nil {
			continue
		}
		if n := len(cc.conns); best == nil || n > size || n == size && since.Before(bestSince) {
			best, bestSince, size = v, since, n
		}
	}
	return best
}

// release forgets c; the caller holds g.mu.
func (g *connGuard) release(c *guardedConn) {
	if c.gone {
		return
	}
	c.gone = true
	g.total--
	cc := g.clients[c.client]
	delete(cc.conns, c)
	if len(cc.conns) == 0 {
		delete(g.clients, c.client)
	}
}

// ConnState is the http.Server's ConnState hook: it tells busy connections
// from idle ones (an HTTP/2 connection is busy while it has streams).
func (g *connGuard) ConnState(c net.Conn, state http.ConnState) {
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
	}
	gc, ok := c.(*guardedConn)
	if !ok {
		return
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	switch state {
	case http.StateActive:
		gc.busy, gc.fresh = true, false
	case http.StateNew, http.StateIdle:
		gc.busy, gc.idleSince = false, g.now()
	case http.StateHijacked, http.StateClosed:
		g.release(gc)
	}
}

// ConnContext is the http.Server's ConnContext hook: it lets Handler find
// the connection of a request.
func (g *connGuard) ConnContext(ctx context.Context, c net.Conn) context.Context {
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
	}
	if gc, ok := c.(*guardedConn); ok {
		return context.WithValue(ctx, guardedConnKey{}, gc)
	}
	return ctx
}

type guardedConnKey struct{}

// Handler counts the requests h handles on each connection, and those
// waiting for their body's bytes, which tell a stalled connection from a
// working one.
func (g *connGuard) Handler(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		gc, ok := r.Context().Value(guardedConnKey{}).(*guardedConn)
		if !ok {
			h.ServeHTTP(w, r)
			return
		}
		if gc.handlers.Load() == 0 {
			// Before the count: a connection is never seen busy with
			// the start of an earlier request.
			gc.busySince.Store(g.now().UnixNano())
		}
		gc.handlers.Add(1)
		defer gc.handlers.Add(-1)
		r.Body = &watchedBody{ReadCloser: r.Body, c: gc}
		h.ServeHTTP(w, r)
	})
}

// watchedBody is a request body that counts its connection's waits.
type watchedBody struct {
	io.ReadCloser
	c *guardedConn
}

func (b *watchedBody) Read(p []byte) (int, error) {
	b.c.waiting.Add(1)
	defer b.c.waiting.Add(-1)
	return b.ReadCloser.Read(p)
}

// Close releases the connection's place and closes it.
func (c *guardedConn) Close() error {
	c.g.mu.Lock()
	c.g.release(c)
	c.g.mu.Unlock()
	return c.Conn.Close()
}

// open is the number of admitted connections (for tests).
func (g *connGuard) open() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.total
}

// clientAddr is the source address a connection counts against.
func clientAddr(a net.Addr) netip.Addr {
	if ta, ok := a.(*net.TCPAddr); ok {
		if ip, ok := netip.AddrFromSlice(ta.IP); ok {
			return ip.Unmap()
		}
	}
	ap, err := netip.ParseAddrPort(a.String())
	if err != nil {
		return netip.Addr{}
	}
	return ap.Addr().Unmap()
}
