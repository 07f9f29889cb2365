package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/requestlog"
)

// whyOptions are the inputs of `sidecar why`.
type whyOptions struct {
	admin   string
	timeout time.Duration
	max     int
	jaeger  string
	out     printer
	getenv  func(string) string
	stdout  io.Writer

	service string       // set by complete
	client  *adminClient // set by complete
}

func (o *whyOptions) complete(args []string) error {
	if len(args) == 1 {
		o.service = args[0]
	}
	o.admin = adminAddr(o.admin, o.getenv)
	if o.jaeger == "" {
		o.jaeger = o.getenv("SIDECAR_JAEGER_URL")
	}
	if err := checkTimeout(o.timeout); err != nil {
		return err
	}
	o.client = newAdminClient(o.admin, o.timeout)
	return nil
}

func (o *whyOptions) validate() error {
	if o.service != "" && !discovery.ValidServiceName(o.service) {
		return fmt.Errorf("%q is not a service name", o.service)
	}
	if o.max < 1 {
		return fmt.Errorf("--max %d: want 1 or more", o.max)
	}
	return o.out.validate()
}

func (o *whyOptions) run(ctx context.Context) error {
	path := "/requests/failed"
	if o.service != "" {
		path += "?service=" + url.QueryEscape(o.service)
	}
	var failed []requestlog.Request
	if err := o.client.get(ctx, path, &failed); err != nil {
		if errors.Is(err, errNotServed) {
			return fmt.Errorf("the sidecar at %s does not keep failed requests (GET /requests/failed: 404): its build predates them", o.admin)
		}
		return err
	}
	if failed == nil {
		failed = []requestlog.Request{}
	}
	failed = failed[:min(len(failed), o.max)]
	return o.out.print(o.stdout, failed, func(w io.Writer) error {
		if len(failed) == 0 {
			of := ""
			if o.service != "" {
				of = " of " + o.service
			}
			_, err := fmt.Fprintf(w, "no failed requests%s kept by the sidecar at %s\n", of, o.admin)
			return err
		}
		for i, r := range failed {
			if i > 0 {
				fmt.Fprintln(w)
			}
			if _, err := io.WriteString(w, explain(r, o.jaeger)); err != nil {
				return err
			}
		}
		return nil
	})
}

// explain tells one failed request in words: what the app got, then each
// attempt (why it was made, where it went, how it ended), then why no
// further attempt was made.
func explain(r requestlog.Request, jaeger string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s %s%s -> %s", r.Time.UTC().Format("15:04:05.000"), termSafe(r.Method), termSafe(r.Service), termSafe(r.Path), termSafe(r.Answer()))
	switch n := len(r.Attempts); n {
	case 0:
		fmt.Fprintf(&b, " without an attempt in %s", requestlog.Millis(r.DurationMs))
	case 1:
		fmt.Fprintf(&b, " after 1 attempt in %s", requestlog.Millis(r.DurationMs))
	default:
		fmt.Fprintf(&b, " after %d attempts in %s", n, requestlog.Millis(r.DurationMs))
	}
	b.WriteString("\n")
	for i, a := range r.Attempts {
		fmt.Fprintf(&b, "  %d) ", i+1)
		if why := a.Why(); why != "" {
			b.WriteString(termSafe(why) + ", ")
		}
		fmt.Fprintf(&b, "%s %s (%s)", termSafe(a.Endpoint), termSafe(a.Outcome), requestlog.Millis(a.DurationMs))
		if a.BreakerState != "" && a.BreakerState != "closed" {
			fmt.Fprintf(&b, ", breaker %s", a.BreakerState)
		}
		b.WriteString("\n")
	}
	if s := r.StopWords(); s != "" {
		fmt.Fprintf(&b, "  stopped: %s\n", termSafe(s))
	}
	if r.Detail != "" {
		fmt.Fprintf(&b, "  detail: %s\n", termSafe(r.Detail))
	}
	if r.TraceID != "" {
		if jaeger != "" {
			fmt.Fprintf(&b, "  trace: %s/trace/%s\n", strings.TrimSuffix(jaeger, "/"), r.TraceID)
		} else {
			fmt.Fprintf(&b, "  trace: %s\n", r.TraceID)
		}
	}
	return b.String()
}

// adminAddr is --admin, else $SIDECAR_ADMIN_ADDR, else the default.
func adminAddr(flag string, getenv func(string) string) string {
	if flag != "" {
		return flag
	}
	if v := getenv("SIDECAR_ADMIN_ADDR"); v != "" {
		return v
	}
	return "127.0.0.1:15000"
}

func newWhyCommand(stdout io.Writer, getenv func(string) string) *cobra.Command {
	o := &whyOptions{getenv: getenv, stdout: stdout}
	cmd := &cobra.Command{
		Use:   "why [SERVICE]",
		Short: "Explain a running sidecar's recent failed requests, attempt by attempt",
		Long: `Explain the failed requests a running sidecar kept (GET /requests/failed), newest
first, one block per request: what the app was answered, each attempt (the
endpoint, how it ended, how long it took, and for a retry its reason and the
backoff waited), and why no further attempt was made: attempts used up, retry
budget exhausted, the deadline could not cover the next backoff, circuit
breaker open, a method not retried, a body too large to send again, or an
outcome that is no retry.on condition. A traced request shows its trace ID
(a link with --jaeger-url). The sidecar keeps the newest failures of each
service, 64 per service.`,
		Example: `  sidecar why
  sidecar why user-service
  sidecar why user-service -o json`,
		Args: cobra.MaximumNArgs(1),
		RunE: runE(o),
	}
	cmd.Flags().StringVar(&o.admin, "admin", "", "the sidecar's admin API, host:port (env SIDECAR_ADMIN_ADDR, default 127.0.0.1:15000)")
	cmd.Flags().DurationVar(&o.timeout, "timeout", defaultRequestTimeout, "the longest wait for the sidecar's answer")
	cmd.Flags().IntVar(&o.max, "max", 10, "the most requests shown, newest first")
	cmd.Flags().StringVar(&o.jaeger, "jaeger-url", "", "Jaeger's UI, to link trace IDs to (env SIDECAR_JAEGER_URL)")
	o.out.addFlag(cmd.Flags(), "table", "one block per request, in words")
	return cmd
}
