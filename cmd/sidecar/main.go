// Command sidecar is a per-pod resilience proxy: it routes the app's calls
// to healthy instances of other services with timeouts, retries and circuit
// breaking, and fronts the app's inbound traffic. See README.md.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	// The first SIGTERM or interrupt starts a graceful shutdown (commands
	// see their context end); a second one exits at once.
	ctx, cancel := context.WithCancel(context.Background())
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go func() {
		<-sigs
		cancel()
		<-sigs
		fmt.Fprintln(os.Stderr, "Error: second signal: exiting without waiting for in-flight requests")
		os.Exit(130)
	}()
	err := newRootCommand(os.Stdin, os.Stdout, os.Stderr, os.Getenv).ExecuteContext(ctx)
	cancel()
	os.Exit(exitCode(err, os.Stderr))
}

// exitError carries an exit code other than 1 (e.g. `policy diff` says 1 for
// "different", so its errors use 2).
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string {
	if e.err == nil {
		return ""
	}
	return e.err.Error()
}
func (e *exitError) Unwrap() error { return e.err }

// exitCode is the one place errors become exit codes.
func exitCode(err error, stderr *os.File) int {
	if err == nil {
		return 0
	}
	var ee *exitError
	if errors.As(err, &ee) {
		if ee.err != nil {
			fmt.Fprintln(stderr, "Error:", ee.err)
		}
		return ee.code
	}
	fmt.Fprintln(stderr, "Error:", err)
	return 1
}
