package webhook

import (
	"crypto/tls"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"time"
)

// connGuard bounds the webhook's connections: at most max in all and
// perClient from one source address. A connection that would pass a bound
// takes the place of an idle one (still in its TLS handshake or waiting for
// its first request, or between requests): the longest idle of its own
// client first, else the longest idle of the client that holds the most
// connections. It is refused (closed at once) only when every connection it
// could replace is busy with a request, so Accept never blocks: connections
// left idle on purpose can't lock the API server out, and no one client can
// hold every slot. Safe for concurrent use.
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
	idleSince time.Time
	gone      bool // released: closed, hijacked or evicted
}

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
	gc.idleSince = now
	cc := g.clients[client]
	var evict []*guardedConn
	ok := true
	if cc != nil && len(cc.conns) >= g.perClient {
		if v := cc.longestIdle(); v != nil {
			evict = append(evict, v)
			g.release(v)
		} else {
			ok = false
		}
	}
	if ok && g.total >= g.max {
		if v := g.longestIdleOfBiggest(); v != nil {
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
		g.log.Warn("webhook connections over their limits: idle ones closed to make room, the rest refused (is something other than the API server connecting?)",
			"evicted", evicted, "refused", refused, "open", total, "maxConns", g.max, "maxConnsPerClient", g.perClient, "lastClient", client.String())
	}
	if !ok {
		_ = c.Close()
		return nil
	}
	return gc
}

// longestIdle is the client's connection idle the longest, or nil.
func (cc *clientConns) longestIdle() *guardedConn {
	var best *guardedConn
	for c := range cc.conns {
		if !c.busy && (best == nil || c.idleSince.Before(best.idleSince)) {
			best = c
		}
	}
	return best
}

// longestIdleOfBiggest is the connection idle the longest among those of
// the client with the most connections that has an idle one.
func (g *connGuard) longestIdleOfBiggest() *guardedConn {
	var best *guardedConn
	size := 0
	for _, cc := range g.clients {
		v := cc.longestIdle()
		if v == nil {
			continue
		}
		if n := len(cc.conns); best == nil || n > size || n == size && v.idleSince.Before(best.idleSince) {
			best, size = v, n
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
		gc.busy = true
	case http.StateNew, http.StateIdle:
		gc.busy, gc.idleSince = false, g.now()
	case http.StateHijacked, http.StateClosed:
		g.release(gc)
	}
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
