package iptables

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"strings"
)

// Runner runs one command. Implementations may block for as long as the
// command runs (ctx bounds it).
type Runner interface {
	// Run runs cmd and returns its combined output; a non-zero exit is an
	// error.
	Run(ctx context.Context, cmd Command) (string, error)
}

// Exec runs the iptables and ip6tables binaries found on PATH. The zero
// value is ready to use and safe for concurrent use (iptables serializes
// itself with its lock, which Exec waits for).
type Exec struct {
	// Prefix, when set, is run with the command as its arguments: for
	// example {"ip", "netns", "exec", "NAME"} to act inside a network
	// namespace.
	Prefix []string
}

// Run implements Runner.
func (e Exec) Run(ctx context.Context, cmd Command) (string, error) {
	argv := append([]string{string(cmd.Family), "-w", "5"}, cmd.Args...)
	if len(e.Prefix) > 0 {
		argv = append(append([]string(nil), e.Prefix...), argv...)
	}
	c := exec.CommandContext(ctx, argv[0], argv[1:]...)
	var out bytes.Buffer
	c.Stdout, c.Stderr = &out, &out
	err := c.Run()
	return strings.TrimSpace(out.String()), err
}

// Apply installs the rules of c, after removing any left by an earlier
// Apply (so running it twice gives the rules once). If a command fails, what
// was installed is removed again and the error names the command and its
// output.
func Apply(ctx context.Context, r Runner, c Config) error {
	if err := c.Validate(); err != nil {
		return err
	}
	fams := c.Families()
	if err := Remove(ctx, r, fams...); err != nil {
		return fmt.Errorf("removing earlier rules: %w", err)
	}
	for _, cmd := range c.Install() {
		if out, err := r.Run(ctx, cmd); err != nil {
			err = commandError(cmd, out, err)
			if rerr := Remove(context.WithoutCancel(ctx), r, fams...); rerr != nil {
				err = errors.Join(err, fmt.Errorf("rolling back: %w", rerr))
			}
			return err
		}
	}
	return nil
}

// Remove deletes what Apply installs for the families given, and nothing
// else: every copy of the jump rules in OUTPUT and PREROUTING, then the
// sidecar's chains. What is already gone is skipped, so Remove can run any
// number of times.
func Remove(ctx context.Context, r Runner, families ...Family) error {
	for _, f := range families {
		// A table that can't be listed at all (no permission, no nat
		// support, no binary) must fail here, not pass for "nothing to
		// remove".
		probe := nat(f, "-S", "OUTPUT")
		if out, err := r.Run(ctx, probe); err != nil {
			return commandError(probe, out, err)
		}
		for _, del := range jumps(f) {
			check := Command{Family: f, Args: append([]string(nil), del.Args...)}
			check.Args[2] = "-C"
			// A jump may have been added more than once by hand; bounded
			// so a runner that always succeeds cannot loop forever.
			for i := 0; i < 100; i++ {
				if _, err := r.Run(ctx, check); err != nil {
					break // not there (or the chain is gone): nothing to delete
				}
				if out, err := r.Run(ctx, del); err != nil {
					return commandError(del, out, err)
				}
			}
		}
		for _, ch := range []string{OutputChain, InboundChain} {
			if _, err := r.Run(ctx, nat(f, "-S", ch)); err != nil {
				continue // no such chain
			}
			for _, cmd := range []Command{nat(f, "-F", ch), nat(f, "-X", ch)} {
				if out, err := r.Run(ctx, cmd); err != nil {
					return commandError(cmd, out, err)
				}
			}
		}
	}
	return nil
}

func commandError(cmd Command, out string, err error) error {
	if out != "" {
		return fmt.Errorf("%s: %w: %s", cmd, err, out)
	}
	return fmt.Errorf("%s: %w", cmd, err)
}
