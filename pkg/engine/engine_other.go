//go:build !linux

package engine

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/netip"
	"time"
)

// Engine is Linux's only (epoll): New fails elsewhere.
type Engine struct{}

// New returns errors.ErrUnsupported: the engine runs on Linux only.
func New(net.Listener, Config) (*Engine, error) {
	return nil, errors.ErrUnsupported
}

func (e *Engine) Addr() net.Addr                     { return nil }
func (e *Engine) Serve() error                       { return errors.ErrUnsupported }
func (e *Engine) Shutdown(ctx context.Context) error { return nil }
func (e *Engine) Close() error                       { return nil }
func (e *Engine) Conns() int64                       { return 0 }
func (e *Engine) SetKeepAlivesEnabled(bool)          {}

// Exchange is Linux's only.
type Exchange struct {
	Request *http.Request
	Body    []byte
}

// Attempt is Linux's only.
type Attempt struct{}

// Timer is Linux's only.
type Timer struct{}

// ErrClientGone is what an answer's end is told when the client left.
var ErrClientGone = errors.New("engine: the client went away")

// ErrAborted is what an answer's end is told when the handler aborted it.
var ErrAborted = errors.New("engine: the exchange was aborted")

func (x *Exchange) Now() time.Time                                { return time.Now() }
func (x *Exchange) Handoff()                                      {}
func (x *Exchange) AfterFunc(time.Duration, func()) *Timer        { return nil }
func (x *Exchange) OnGone(func())                                 {}
func (x *Exchange) Reply(int, http.Header, []byte, func(error))   {}
func (x *Exchange) Respond(*Attempt, *http.Response, func(error)) {}
func (a *Attempt) Cancel()                                        {}
func (t *Timer) Stop() bool                                       { return false }
func (x *Exchange) Send(netip.AddrPort, *http.Request, []byte, time.Duration, func(*Attempt, *http.Response, error)) *Attempt {
	return nil
}
