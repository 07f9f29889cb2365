package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/sidecar-mesh/sidecar/pkg/admin"
	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/requestlog"
)

// tapOptions are the inputs of `sidecar tap`.
type tapOptions struct {
	admin    string
	timeout  time.Duration
	service  string
	failures bool
	max      int
	out      printer
	getenv   func(string) string
	stdout   io.Writer
}

func (o *tapOptions) complete([]string) error {
	o.admin = adminAddr(o.admin, o.getenv)
	return checkTimeout(o.timeout)
}

func (o *tapOptions) validate() error {
	if o.service != "" && !discovery.ValidServiceName(o.service) {
		return fmt.Errorf("--service %q is not a service name", o.service)
	}
	if o.max < 0 {
		return fmt.Errorf("--max %d: want 0 (no end) or more", o.max)
	}
	return o.out.validate()
}

// run prints what GET /tap streams until --max requests were printed, the
// sidecar ends the stream, or the context ends (Ctrl-C).
func (o *tapOptions) run(ctx context.Context) error {
	q := url.Values{}
	if o.service != "" {
		q.Set("service", o.service)
	}
	if o.failures {
		q.Set("failures", "true")
	}
	c := newAdminClient(o.admin, 0)
	c.http.Transport.(*http.Transport).ResponseHeaderTimeout = o.timeout
	u := c.base + "/tap"
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return fmt.Errorf("--admin %s: %w", o.admin, err)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("cannot reach the sidecar's admin API at %s: %w (is `sidecar run` serving its admin API there? --admin sets the address)", o.admin, err)
	}
	defer resp.Body.Close()
	switch {
	case resp.StatusCode == http.StatusNotFound:
		return fmt.Errorf("the sidecar at %s has no tap (GET /tap: 404): its build predates it", o.admin)
	case resp.StatusCode != http.StatusOK:
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
		return fmt.Errorf("GET %s: %s: %s", u, resp.Status, strings.TrimSpace(string(body)))
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for n := 0; o.max == 0 || n < o.max; {
		if !sc.Scan() {
			if err := sc.Err(); err != nil && ctx.Err() == nil && !errors.Is(err, io.ErrUnexpectedEOF) {
				return fmt.Errorf("GET %s: %w", u, err)
			}
			return nil
		}
		request, err := o.print(sc.Bytes())
		if err != nil {
			return err
		}
		if request {
			n++ // --max counts requests, not the lines saying some were missed
		}
	}
	return nil
}

// print writes one request of the stream: as it came (json), as a YAML
// document, or as one line in words.
func (o *tapOptions) print(line []byte) (request bool, err error) {
	var r requestlog.Request
	if err := json.Unmarshal(line, &r); err != nil {
		return false, fmt.Errorf("the tap sent a line that is not a request: %w", err)
	}
	if r.Time.IsZero() {
		var gap admin.TapGap
		if json.Unmarshal(line, &gap) == nil && gap.Dropped > 0 {
			if o.out.format == "json" {
				_, err = fmt.Fprintf(o.stdout, "%s\n", line)
			} else {
				_, err = fmt.Fprintf(o.stdout, "... %d requests not shown: the tap was over its rate or behind\n", gap.Dropped)
			}
			return false, err
		}
	}
	return true, o.printRequest(r, line)
}

// printRequest writes one request of the stream.
func (o *tapOptions) printRequest(r requestlog.Request, line []byte) error {
	switch o.out.format {
	case "json":
		_, err := fmt.Fprintf(o.stdout, "%s\n", line)
		return err
	case "yaml":
		b, err := toYAML(r)
		if err != nil {
			return err
		}
		_, err = fmt.Fprintf(o.stdout, "---\n%s", b)
		return err
	}
	_, err := fmt.Fprintln(o.stdout, tapLine(r))
	return err
}

// tapLine is one request in one line: when, what, the answer, the
// attempts and, for a failure, why the chain stopped.
func tapLine(r requestlog.Request) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s %s%s -> %s in %s", r.Time.UTC().Format("15:04:05.000"), termSafe(r.Method), termSafe(r.Service), termSafe(r.Path),
		termSafe(r.Answer()), requestlog.Millis(r.DurationMs))
	var eps []string
	for _, a := range r.Attempts {
		eps = append(eps, termSafe(a.Endpoint+" "+a.Outcome))
	}
	switch len(eps) {
	case 0:
	case 1:
		fmt.Fprintf(&b, " [%s]", eps[0])
	default:
		fmt.Fprintf(&b, " [%d attempts: %s]", len(eps), strings.Join(eps, ", "))
	}
	if r.Stop != "" {
		fmt.Fprintf(&b, " stopped: %s", termSafe(r.Stop))
	}
	return b.String()
}

func newTapCommand(stdout io.Writer, getenv func(string) string) *cobra.Command {
	o := &tapOptions{getenv: getenv, stdout: stdout}
	cmd := &cobra.Command{
		Use:   "tap",
		Short: "Watch a running sidecar's requests live, one line each",
		Long: `Watch the requests a running sidecar makes for the app as they finish (GET /tap):
one line per request with its answer, its attempts and, for a failure, why no
further attempt was made. --service and --failures narrow what is shown. The
sidecar sends at most 100 lines a second to each tap and serves a few taps at
once; nobody tapping costs the requests nothing. Requests a tap missed (over
that rate, or it read too slowly) are said by a line of their own; with -o json
a line {"dropped": N} and no "time". Ctrl-C, or --max requests, ends it.`,
		Example: `  sidecar tap
  sidecar tap --service user-service --failures
  sidecar tap --max 20 -o json`,
		Args: cobra.NoArgs,
		RunE: runE(o),
	}
	cmd.Flags().StringVar(&o.admin, "admin", "", "the sidecar's admin API, host:port (env SIDECAR_ADMIN_ADDR, default 127.0.0.1:15000)")
	cmd.Flags().DurationVar(&o.timeout, "timeout", defaultRequestTimeout, "the longest wait for the sidecar to start the stream")
	cmd.Flags().StringVar(&o.service, "service", "", "only this service's requests")
	cmd.Flags().BoolVar(&o.failures, "failures", false, "only failed requests")
	cmd.Flags().IntVar(&o.max, "max", 0, "stop after this many requests; 0: until interrupted")
	o.out.addFlag(cmd.Flags(), "table", "one line per request")
	return cmd
}
