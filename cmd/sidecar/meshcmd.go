package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/mesh"
	"github.com/sidecar-mesh/sidecar/pkg/redact"
)

// meshDenied is the exit code of `mesh check` for deny, as `consul
// intention check` has it; trouble is 2 (asTrouble).
const meshDenied = 1

// meshCheckOptions are `sidecar mesh check`'s.
type meshCheckOptions struct {
	consulAddr string
	timeout    time.Duration
	method     string
	path       string
	headers    []string
	out        printer
	getenv     func(string) string
	stdout     io.Writer
	stderr     io.Writer

	// Set by complete.
	source, destination string
	addr                string
	request             *http.Request // nil: the L4 question
}

func (o *meshCheckOptions) complete(args []string) error {
	if len(args) != 2 {
		return fmt.Errorf("want SOURCE and DESTINATION (service names), got %d arguments", len(args))
	}
	o.source, o.destination = args[0], args[1]
	for _, s := range args {
		if s == "" || s == "*" || strings.ContainsAny(s, "/ \t") {
			return fmt.Errorf("service %q: want a service name (a caller and a destination, not a wildcard)", s)
		}
	}
	var err error
	if o.addr, err = consulAddress(o.consulAddr, o.getenv); err != nil {
		return err
	}
	if o.method == "" && o.path == "" && len(o.headers) == 0 {
		return nil
	}
	return o.completeRequest()
}

// completeRequest builds the request of an L7 question: --method (GET
// when not given), --path (/), --header K=V as sent to the destination
// (Host, or :authority, sets the host; the destination's name otherwise).
func (o *meshCheckOptions) completeRequest() error {
	method := strings.ToUpper(o.method)
	if method == "" {
		method = http.MethodGet
	}
	path := o.path
	if path == "" {
		path = "/"
	}
	if !strings.HasPrefix(path, "/") {
		return fmt.Errorf("--path %q: want a path starting with /, a query allowed (/search?q=1)", o.path)
	}
	r, err := http.NewRequest(method, "http://"+o.destination+path, nil)
	if err != nil {
		return fmt.Errorf("--method %q --path %q: %w", o.method, o.path, err)
	}
	for _, h := range o.headers {
		k, v, ok := strings.Cut(h, "=")
		switch {
		case !ok || k == "":
			return fmt.Errorf("--header %q: want NAME=VALUE", h)
		case strings.EqualFold(k, "host"), k == ":authority":
			r.Host = v
		case strings.HasPrefix(k, ":"):
			return fmt.Errorf("--header %q: pseudo-headers other than :authority come from --method and --path", h)
		default:
			r.Header.Add(k, v)
		}
	}
	o.request = r
	return nil
}

func (o *meshCheckOptions) validate() error {
	if err := checkTimeout(o.timeout); err != nil {
		return err
	}
	return o.out.validate()
}

// meshCheckResult is what mesh check prints: the question and the
// decision's fields.
type meshCheckResult struct {
	Source      string `json:"source"`
	Destination string `json:"destination"`
	// Request is "METHOD PATH" of an L7 question; empty for L4.
	Request string `json:"request,omitempty"`
	mesh.Decision
}

func (o *meshCheckOptions) run(ctx context.Context) error {
	shown := redact.URL(o.addr).Redacted()
	client, err := discovery.NewClient(discovery.ClientConfig{Address: o.addr, Token: o.getenv("CONSUL_HTTP_TOKEN"), NonPooled: true})
	if err != nil {
		return fmt.Errorf("consul client for %s: %w", shown, err)
	}
	ctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()
	d, err := mesh.Check(ctx, discovery.NewMeshAgent(client), o.source, o.destination, o.request)
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		return fmt.Errorf("consul at %s: no answer within %s (--timeout): %w", shown, o.timeout, err)
	case errors.Is(err, mesh.ErrACLDenied):
		return fmt.Errorf("consul at %s: %w (set CONSUL_HTTP_TOKEN to a token that may read the intentions and %s)", shown, err, o.destination)
	case err != nil:
		return fmt.Errorf("consul at %s: %w (set --consul-addr or CONSUL_HTTP_ADDR)", shown, err)
	}
	res := meshCheckResult{Source: o.source, Destination: o.destination, Decision: d}
	if o.request != nil {
		res.Request = o.request.Method + " " + o.request.URL.RequestURI()
	}
	err = o.out.print(o.stdout, res, func(w io.Writer) error {
		request := res.Request
		if request == "" {
			request = "(L4)"
		}
		if err := writeTable(w, []string{"SOURCE", "DESTINATION", "REQUEST", "DECISION", "BY"},
			[][]string{{res.Source, res.Destination, request, decisionWord(d.Allowed), d.By}}); err != nil {
			return err
		}
		if d.PerRequest {
			_, err := fmt.Fprintf(o.stderr, "Intention %s has L7 permissions: ask about a request with --method, --path and --header.\n", d.Intention)
			return err
		}
		return nil
	})
	if err != nil {
		return err
	}
	if !d.Allowed {
		return &exitError{code: meshDenied} // no message: the output says it
	}
	return nil
}

func decisionWord(allowed bool) string {
	if allowed {
		return "allow"
	}
	return "deny"
}

func newMeshCommand(stdout, stderr io.Writer, getenv func(string) string) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "mesh",
		Short: "Consul service mesh: check what Consul's intentions allow",
	}
	o := &meshCheckOptions{getenv: getenv, stdout: stdout, stderr: stderr}
	check := &cobra.Command{
		Use:   "check SOURCE DESTINATION",
		Short: "Say whether SOURCE may call DESTINATION, and which intention decides",
		Long: `Evaluate Consul's intentions for a call from service SOURCE to service
DESTINATION as the sidecar does on DESTINATION's inbound side, and print
allow or deny with the intention, and the L7 permission, that decided.

Without --method, --path or --header it answers for a connection (L4), as
consul intention check does: an intention with L7 permissions denies it,
and the output says the permissions decide per request. With them it
answers for that request: an L7 intention's permissions are tried in order
(path, methods, headers) and the first that matches decides; when none
does, the default does. The default, when no intention matches, is the
agent's: allow with ACLs off or a default policy of allow, deny with deny.

Exit status: 0 allow, 1 deny, 2 trouble (bad arguments, Consul unreachable).`,
		Example: `  sidecar mesh check web api
  sidecar mesh check web api --method POST --path /orders
  sidecar mesh check web api --path /public/index.html --header X-Env=prod -o json`,
		Args: cobra.ArbitraryArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return asTrouble(runE(o)(cmd, args))
		},
	}
	check.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return asTrouble(err) })
	fs := check.Flags()
	fs.StringVar(&o.consulAddr, "consul-addr", "", consulAddrUsage)
	fs.DurationVar(&o.timeout, "timeout", defaultRequestTimeout, "the longest wait for Consul's answers")
	fs.StringVar(&o.method, "method", "", "the request's method (an L7 question; GET when only --path or --header is given)")
	fs.StringVar(&o.path, "path", "", "the request's path, a query allowed (an L7 question; / when not given)")
	fs.StringArrayVar(&o.headers, "header", nil, "a request header NAME=VALUE, repeatable (an L7 question); Host=... sets the host")
	o.out.addFlag(fs, "table", "one row: the decision and what decided")
	cmd.AddCommand(check)
	return cmd
}
