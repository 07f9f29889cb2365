package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"

	"github.com/spf13/cobra"

	"github.com/sidecar-mesh/sidecar/pkg/config"
)

// The container lifecycle hooks of a classic (non-native) injected sidecar.
// The image is distroless (no shell, no sleep, no curl), so the hooks are
// subcommands of the sidecar binary itself:
//
//   - postStart `sidecar hook wait-ready`: the kubelet starts a pod's
//     containers in order and waits for each postStart hook, so with the
//     sidecar first the app starts only once the proxy serves.
//   - preStop `sidecar hook drain --wait=D`: the kubelet runs it before
//     SIGTERM; the sidecar reports not ready and leaves Consul at once, and
//     keeps serving the app for D more before its own drain window.

// hookOptions are the inputs of `sidecar hook ...`.
type hookOptions struct {
	healthAddr string
	adminAddr  string
	timeout    time.Duration
	wait       time.Duration
	interval   time.Duration
	stderr     io.Writer
	client     *http.Client
}

func (o *hookOptions) validate() error {
	for _, a := range []struct{ flag, addr string }{{"--health-addr", o.healthAddr}, {"--admin-addr", o.adminAddr}} {
		if _, _, err := net.SplitHostPort(a.addr); err != nil {
			return fmt.Errorf("%s %q: want host:port", a.flag, a.addr)
		}
	}
	if o.timeout <= 0 || o.interval <= 0 || o.wait < 0 {
		return errors.New("--timeout and --interval must be positive, --wait not negative")
	}
	return nil
}

// waitReady polls GET /healthz/sidecar until it answers 200.
func (o *hookOptions) waitReady(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()
	url := "http://" + o.healthAddr + "/healthz/sidecar"
	tick := time.NewTicker(o.interval)
	defer tick.Stop()
	var last error
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return err
		}
		resp, err := o.client.Do(req)
		if err == nil {
			_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			err = fmt.Errorf("GET %s: %s", url, resp.Status)
		}
		if ctx.Err() == nil || last == nil {
			last = err // not the deadline cutting the last try short
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("the sidecar did not become ready within %s: %v", o.timeout, last)
		case <-tick.C:
		}
	}
}

// drain asks the sidecar to drain (POST /drain on the admin API), then waits.
// A failed request is reported but still waited out: the app keeps its time.
func (o *hookOptions) drain(ctx context.Context) error {
	url := "http://" + o.adminAddr + "/drain"
	rctx, cancel := context.WithTimeout(ctx, o.timeout)
	req, err := http.NewRequestWithContext(rctx, http.MethodPost, url, nil)
	if err == nil {
		var resp *http.Response
		if resp, err = o.client.Do(req); err == nil {
			_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
			resp.Body.Close()
			if resp.StatusCode/100 != 2 {
				err = fmt.Errorf("POST %s: %s", url, resp.Status)
			}
		}
	}
	cancel()
	if err != nil {
		fmt.Fprintf(o.stderr, "sidecar hook drain: %v (waiting anyway)\n", err)
	}
	timer := time.NewTimer(o.wait)
	defer timer.Stop()
	select {
	case <-timer.C:
	case <-ctx.Done():
	}
	return nil
}

func newHookCommand(stderr io.Writer) *cobra.Command {
	o := &hookOptions{stderr: stderr, client: &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}}
	cmd := &cobra.Command{
		Use:    "hook",
		Short:  "Container lifecycle hooks of a classic injected sidecar",
		Hidden: true,
		Args:   cobra.NoArgs,
	}
	run := func(f func(*hookOptions, context.Context) error) func(*cobra.Command, []string) error {
		return func(cmd *cobra.Command, _ []string) error {
			if err := o.validate(); err != nil {
				return err
			}
			return f(o, cmd.Context())
		}
	}
	wait := &cobra.Command{
		Use:   "wait-ready",
		Short: "Wait until the sidecar serves (postStart hook)",
		Args:  cobra.NoArgs,
		RunE:  run((*hookOptions).waitReady),
	}
	drain := &cobra.Command{
		Use:   "drain",
		Short: "Start the drain, then keep serving for --wait (preStop hook)",
		Args:  cobra.NoArgs,
		RunE:  run((*hookOptions).drain),
	}
	pf := cmd.PersistentFlags()
	pf.StringVar(&o.healthAddr, "health-addr", loopback(config.DefaultHealth), "the sidecar's health listener")
	pf.StringVar(&o.adminAddr, "admin-addr", config.DefaultAdmin, "the sidecar's admin API")
	pf.DurationVar(&o.timeout, "timeout", 2*time.Minute, "wait-ready: the longest wait; drain: the timeout of the request")
	pf.DurationVar(&o.interval, "interval", 200*time.Millisecond, "wait-ready: time between checks")
	pf.DurationVar(&o.wait, "wait", 5*time.Second, "drain: how long to keep serving after the drain starts")
	cmd.AddCommand(wait, drain)
	return cmd
}

// loopback turns 0.0.0.0:PORT into 127.0.0.1:PORT.
func loopback(addr string) string {
	host, port, err := net.SplitHostPort(addr)
	if err != nil || (host != "" && host != "0.0.0.0" && host != "::") {
		return addr
	}
	return net.JoinHostPort("127.0.0.1", port)
}
