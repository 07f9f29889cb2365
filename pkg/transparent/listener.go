// Package transparent serves connections that netfilter redirected to the
// sidecar's outbound port (see pkg/iptables and `sidecar iptables`): it reads
// each one's original destination, tells HTTP from other TCP by its first
// bytes, hands HTTP to the outbound proxy with the original destination
// attached, and passes other TCP through to the original destination
// unchanged (L4).
//
// A connection is redirected when conntrack's original destination
// (SO_ORIGINAL_DST) differs from the connection's local address. With
// REDIRECT the local address is the listener's own (127.0.0.1:15001), so the
// local address alone can't tell; with TPROXY it would be the original
// destination itself. Connections the app makes to 127.0.0.1:15001 on its
// own are not redirected and go to the outbound proxy exactly as before.
package transparent

import (
	"github.com/sidecar-mesh/sidecar/internal/readahead"
	"github.com/sidecar-mesh/sidecar/pkg/panics"

	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"
)

// Config configures a Listener. The zero value of a field means its default.
type Config struct {
	// SniffTimeout bounds the wait for a redirected connection's first
	// bytes. A connection that sends nothing in that time is taken for a
	// server-speaks-first protocol and passed through. Default 200ms.
	SniffTimeout time.Duration
	// ConnectTimeout bounds the connect to the original destination of a
	// connection passed through. Default 5s.
	ConnectTimeout time.Duration
	// OpaquePorts are destination ports passed through without sniffing
	// (server-speaks-first protocols: no wait). Nil: none.
	OpaquePorts []uint16
	// IsOwn reports whether an original destination is one of the
	// sidecar's own listeners; such a connection is closed (no loop back
	// into the sidecar). Nil: none is.
	IsOwn func(netip.AddrPort) bool
	// AllowTCP reports whether non-HTTP TCP may be passed through to dst;
	// a refused connection is reset. It may block (a discovery lookup),
	// bounded by ctx. Nil: every destination may.
	AllowTCP func(ctx context.Context, dst netip.AddrPort) bool
	// Dial opens the connection to the original destination. Nil: a
	// net.Dialer. It must not be captured again: in a pod the sidecar's
	// own user is exempt from the redirect rules.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// OriginalDst returns a connection's original destination and whether
	// it was redirected at all. Nil: conntrack's, through SO_ORIGINAL_DST
	// (see Redirected).
	OriginalDst func(c net.Conn) (netip.AddrPort, bool)
	// Observer is told what happens to redirected connections; nil:
	// NopObserver.
	Observer Observer
	// Logger receives errors and refusals; nil discards them.
	Logger *slog.Logger
}

// Defaults of Config.
const (
	DefaultSniffTimeout   = 200 * time.Millisecond
	DefaultConnectTimeout = 5 * time.Second
)

// maxSniff bounds the bytes read before deciding: a request line still
// going past it is HTTP (net/http then judges its length).
const maxSniff = 8 << 10

// Redirected is the default Config.OriginalDst: the original destination of
// a TCP connection, when conntrack has one that differs from the local
// address.
func Redirected(c net.Conn) (netip.AddrPort, bool) {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return netip.AddrPort{}, false
	}
	dst, err := OriginalDst(tc)
	if err != nil || !dst.IsValid() {
		return netip.AddrPort{}, false
	}
	local, ok := tc.LocalAddr().(*net.TCPAddr)
	if !ok || local.AddrPort() == dst || unmap(local.AddrPort()) == dst {
		return netip.AddrPort{}, false
	}
	return dst, true
}

func unmap(a netip.AddrPort) netip.AddrPort { return netip.AddrPortFrom(a.Addr().Unmap(), a.Port()) }

// Listener wraps the outbound listener. Accept returns the connections the
// app made to the listener itself unchanged, and redirected connections
// that speak HTTP as *Conn (with their original destination); redirected
// connections of other protocols never come out of Accept: the Listener
// passes them through itself. Safe for concurrent use.
type Listener struct {
	inners []net.Listener
	cfg    Config
	obs    Observer
	log    *slog.Logger

	ctx     context.Context // ends at Close: unblocks dials and lookups
	cancel  context.CancelFunc
	conns   chan net.Conn  // accepted connections, to Accept
	dead    chan struct{}  // closed when every accept loop ended
	err     error          // why the first accept loop ended; read after dead
	once    sync.Once      // Close
	started sync.Once      // the accept loops, from the first Accept
	wg      sync.WaitGroup // the accept loops and every connection handler

	mu      sync.Mutex // guards tracked and forced
	tracked map[net.Conn]struct{}
	forced  bool // Shutdown's deadline passed: connections are closed
}

var _ net.Listener = (*Listener)(nil)

// NewListener wraps lns, at least one: the outbound listener, and for IPv6
// the [::1] one that ip6tables redirects to. Addr is the first one's.
// Accepting starts with the first call of Accept.
func NewListener(cfg Config, lns ...net.Listener) *Listener {
	if len(lns) == 0 {
		panic("transparent: NewListener needs a listener")
	}
	if cfg.SniffTimeout <= 0 {
		cfg.SniffTimeout = DefaultSniffTimeout
	}
	if cfg.ConnectTimeout <= 0 {
		cfg.ConnectTimeout = DefaultConnectTimeout
	}
	if cfg.OriginalDst == nil {
		cfg.OriginalDst = Redirected
	}
	if cfg.Dial == nil {
		d := &net.Dialer{}
		cfg.Dial = d.DialContext
	}
	l := &Listener{inners: lns, cfg: cfg, obs: cfg.Observer, log: cfg.Logger,
		conns: make(chan net.Conn), dead: make(chan struct{}), tracked: map[net.Conn]struct{}{}}
	if l.obs == nil {
		l.obs = NopObserver{}
	}
	if l.log == nil {
		l.log = slog.New(slog.DiscardHandler)
	}
	l.log = l.log.With("component", "transparent")
	l.ctx, l.cancel = context.WithCancel(context.Background())
	return l
}

// start runs the accept loops, from the first Accept on: nothing is
// accepted (or looked at by Config's functions) before the server serves.
func (l *Listener) start() {
	errs := make([]error, len(l.inners))
	var loops sync.WaitGroup
	for i, ln := range l.inners {
		loops.Add(1)
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			defer loops.Done()
			errs[i] = l.acceptLoop(ln)
		}()
	}
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		loops.Wait()
		l.err = errs[0]
		// Handlers stop delivering to an Accept that no longer takes.
		l.cancel()
		close(l.dead)
	}()
}

// Addr implements net.Listener.
func (l *Listener) Addr() net.Addr { return l.inners[0].Addr() }

// Accept implements net.Listener.
func (l *Listener) Accept() (net.Conn, error) {
	l.started.Do(l.start)
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.dead:
		return nil, l.err
	}
}

// Close stops accepting: the listening socket is closed and connections
// still being sniffed are dropped. Connections being passed through go on
// until they end or Shutdown ends them.
func (l *Listener) Close() error {
	var err error
	l.once.Do(func() {
		for _, ln := range l.inners {
			err = errors.Join(err, ln.Close())
		}
		l.cancel()
	})
	return err
}

// Shutdown closes the listener and waits for the connections it passes
// through to end, until ctx ends; then it closes them and returns ctx's
// error. Every goroutine of the Listener has ended when it returns.
func (l *Listener) Shutdown(ctx context.Context) error {
	_ = l.Close()
	done := make(chan struct{})
	go func() {
		l.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
	}
	l.mu.Lock()
	l.forced = true
	for c := range l.tracked {
		_ = c.Close()
	}
	l.mu.Unlock()
	<-done
	return ctx.Err()
}

// Active is the number of connections being passed through now.
func (l *Listener) Active() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.tracked) / 2
}

func (l *Listener) acceptLoop(ln net.Listener) error {
	var delay time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() && l.ctx.Err() == nil {
				// Out of file descriptors and the like: back off as
				// net/http does, then try again.
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				t := time.NewTimer(delay)
				select {
				case <-t.C:
					continue
				case <-l.ctx.Done():
					t.Stop()
				}
			}
			return err
		}
		delay = 0
		dst, redirected := l.cfg.OriginalDst(c)
		if !redirected {
			if !l.deliver(c) {
				return net.ErrClosed
			}
			continue
		}
		l.wg.Add(1)
		go l.handle(c, dst)
	}
}

// deliver hands c to Accept, or closes it when the listener is closed.
func (l *Listener) deliver(c net.Conn) bool {
	select {
	case l.conns <- c:
		return true
	case <-l.ctx.Done():
		_ = c.Close()
		return false
	}
}

// handle decides what a redirected connection is and serves it.
func (l *Listener) handle(c net.Conn, dst netip.AddrPort) {
	defer l.wg.Done()
	defer func() {
		if v := recover(); v != nil {
			panics.Report("transparent.conn", v)
			_ = c.Close()
		}
	}()
	if l.cfg.IsOwn != nil && l.cfg.IsOwn(dst) {
		l.obs.Refused(RefusedLoop)
		l.log.Warn("refused a redirected connection to the sidecar's own listener (check the redirect rules' exemptions)",
			"destination", dst.String())
		reset(c)
		return
	}
	if slices.Contains(l.cfg.OpaquePorts, dst.Port()) {
		l.obs.Accepted(ProtocolTCP)
		l.passthrough(c, nil, dst)
		return
	}
	http, head, err := sniff(c, l.cfg.SniffTimeout, maxSniff)
	if err != nil {
		_ = c.Close()
		return
	}
	if http {
		l.obs.Accepted(ProtocolHTTP)
		l.deliver(&Conn{Conn: c, head: head, dst: dst})
		return
	}
	l.obs.Accepted(ProtocolTCP)
	l.passthrough(c, head, dst)
}

// track records connections being passed through, for Shutdown to close.
// It returns false once Shutdown has closed them: the caller closes cs.
func (l *Listener) track(cs ...net.Conn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.forced {
		return false
	}
	for _, c := range cs {
		l.tracked[c] = struct{}{}
	}
	return true
}

func (l *Listener) untrack(cs ...net.Conn) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, c := range cs {
		delete(l.tracked, c)
	}
}

// reset closes c with a RST, as a refused connect would look to the app.
func reset(c net.Conn) {
	if tc, ok := c.(interface{ SetLinger(int) error }); ok {
		_ = tc.SetLinger(0)
	}
	_ = c.Close()
}

// Conn is a redirected connection that speaks HTTP, as Accept returns it:
// the bytes read to tell its protocol come first, and OriginalDst says
// where the app sent it.
type Conn struct {
	net.Conn
	head []byte
	dst  netip.AddrPort
}

// OriginalDst is the destination the app connected to.
func (c *Conn) OriginalDst() netip.AddrPort { return c.dst }

// Read implements net.Conn. Like any net.Conn read side, not for
// concurrent readers.
func (c *Conn) Read(p []byte) (int, error) { return readahead.Read(&c.head, c.Conn, p) }

// CloseWrite half-closes the connection.
func (c *Conn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Conn.Close()
}
