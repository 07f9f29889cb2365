//go:build !linux

package main

import "errors"

func attack(config) (*Result, error) {
	return nil, errors.New("openloop runs on Linux only (epoll, timerfd)")
}
