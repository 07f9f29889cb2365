//go:build !linux

package main

import (
	"errors"
	"net"
)

type loop struct{}

func newLoop(_, _ *net.TCPAddr) (*loop, error) {
	return nil, errors.New("loopfwd runs on Linux only (epoll)")
}

func (*loop) run() error { return nil }
