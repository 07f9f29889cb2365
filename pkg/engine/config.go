package engine

import (
	"log/slog"
	"net"
	"runtime"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/downstream"
	"github.com/sidecar-mesh/sidecar/pkg/upstream"
)

// MaxBody is the largest request body the engine reads before its handler
// sees the request; a request with a larger one is handed off (the
// listener's server streams it).
const MaxBody = 64 << 10

// Config configures an Engine. Handler and Handoff are required; other zero
// fields take the defaults named.
type Config struct {
	// Loops is the number of event loops. Default: GOMAXPROCS.
	Loops int
	// Limits bound the clients: ReadHeaderTimeout, BodyReadTimeout,
	// IdleTimeout, WriteTimeout and MaxHeaderBytes, as the listener's
	// server applies them.
	Limits downstream.Limits
	// Transport bounds the upstream side as the pooled transport does:
	// DialTimeout (when a Send gives none), ResponseHeaderTimeout,
	// IdleConnTimeout, MaxIdleConnsPerHost, MaxResponseHeaderBytes.
	Transport upstream.TransportConfig
	// Handler serves the requests the engine reads, on the loops.
	Handler Handler
	// Handoff takes a client connection the engine gives up, with the
	// bytes of it already read and not answered (a request it does not
	// serve, and what followed); it must not block.
	Handoff func(c net.Conn, buffered []byte)
	// Logger receives what goes wrong outside any exchange; nil discards.
	Logger *slog.Logger
}

// Handler serves the requests an engine reads. Serve runs on the loop that
// owns the connection, as does every callback it gives the Exchange: none
// may block. Serve must, before it returns, hand the exchange off
// (Exchange.Handoff) or start it (a Reply, a Send, a timer); the exchange
// then ends with exactly one Reply or Respond, or with the client gone.
type Handler interface {
	Serve(x *Exchange)
}

func (c Config) withDefaults() Config {
	if c.Loops <= 0 {
		c.Loops = runtime.GOMAXPROCS(0)
	}
	c.Limits = c.Limits.WithDefaults()
	if c.Transport.DialTimeout <= 0 {
		c.Transport.DialTimeout = time.Second
	}
	if c.Transport.ResponseHeaderTimeout <= 0 {
		c.Transport.ResponseHeaderTimeout = 15 * time.Second
	}
	if c.Transport.IdleConnTimeout <= 0 {
		c.Transport.IdleConnTimeout = 30 * time.Second
	}
	if c.Transport.MaxIdleConnsPerHost <= 0 {
		c.Transport.MaxIdleConnsPerHost = 256
	}
	if c.Transport.MaxResponseHeaderBytes <= 0 {
		c.Transport.MaxResponseHeaderBytes = upstream.DefaultMaxResponseHeaderBytes
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return c
}
