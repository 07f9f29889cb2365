package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/mesh"

	"github.com/spf13/cobra"

	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/outbound"
	"github.com/sidecar-mesh/sidecar/pkg/policy"
)

// adminClient reads a running sidecar's admin API (JSON over HTTP). It
// keeps no connection open between calls.
type adminClient struct {
	addr string // as given, for messages
	base string // http://host:port
	http *http.Client
}

// newAdminClient reads the admin API at addr; each call waits at most
// timeout for the answer.
func newAdminClient(addr string, timeout time.Duration) *adminClient {
	base := addr
	if !strings.Contains(base, "://") {
		base = "http://" + base
	}
	return &adminClient{
		addr: addr,
		base: strings.TrimSuffix(base, "/"),
		http: &http.Client{Timeout: timeout, Transport: &http.Transport{DisableKeepAlives: true}},
	}
}

// errNotServed is an admin endpoint the sidecar does not have (404): an
// older build, or one without that feature.
var errNotServed = errors.New("not served by this sidecar")

// get decodes GET path into v. A 404 is errNotServed.
func (c *adminClient) get(ctx context.Context, path string, v any) error {
	url := c.base + path
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return fmt.Errorf("--admin %s: %w", c.addr, err)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("cannot reach the sidecar's admin API at %s: %w (is `sidecar run` serving its admin API there? --admin sets the address)", c.addr, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 32<<20))
	if err != nil {
		return fmt.Errorf("GET %s: reading the answer: %w", url, err)
	}
	switch {
	case resp.StatusCode == http.StatusNotFound:
		return fmt.Errorf("GET %s: %w", url, errNotServed)
	case resp.StatusCode != http.StatusOK:
		return fmt.Errorf("GET %s: %s: %s", url, resp.Status, strings.TrimSpace(string(body)))
	}
	if err := json.Unmarshal(body, v); err != nil {
		return fmt.Errorf("GET %s: the answer is not the JSON expected: %w", url, err)
	}
	return nil
}

// policies reads GET /policies: every service's policy in force.
func (c *adminClient) policies(ctx context.Context) ([]policy.Status, error) {
	var out []policy.Status
	if err := c.get(ctx, "/policies", &out); err != nil {
		if errors.Is(err, errNotServed) {
			return nil, fmt.Errorf("the sidecar at %s does not report its policies (GET /policies: 404): "+
				"its build predates policy management; read Consul KV instead (drop --admin)", c.addr)
		}
		return nil, err
	}
	return out, nil
}

// policy reads GET /policies/{service}: the policy in force for service,
// listed or not; nil when the sidecar does not serve it.
func (c *adminClient) policy(ctx context.Context, service string) (*policy.Status, error) {
	var st policy.Status
	err := c.get(ctx, "/policies/"+url.PathEscape(service), &st)
	switch {
	case errors.Is(err, errNotServed):
		return nil, nil
	case err != nil:
		return nil, err
	}
	return &st, nil
}

// sidecarStatus is what `sidecar status` shows of one running sidecar.
type sidecarStatus struct {
	Admin     string            `json:"admin"`
	Version   *buildInfo        `json:"version,omitempty"`
	Endpoints []endpointsStatus `json:"endpoints"`
	// Resilience is the breaker, in-flight, budget and ejections of every
	// service called so far.
	Resilience []outbound.ServiceStatus `json:"resilience"`
	// Policies is every service's policy in force, with source and
	// version.
	Policies []policy.Status `json:"policies"`
	// Mesh is this sidecar's identity in the service mesh; nil outside it.
	Mesh *mesh.IdentityStatus `json:"mesh,omitempty"`
	// NotReported names the sections this sidecar's admin API does not
	// serve ("policies" on a build without policy management).
	NotReported []string `json:"notReported,omitempty"`
}

// endpointsStatus is one service of GET /endpoints.
type endpointsStatus struct {
	discovery.EndpointSet
	AgeSeconds float64 `json:"ageSeconds"`
}

// statusOptions are the inputs of `sidecar status`.
type statusOptions struct {
	admin   string
	timeout time.Duration
	out     printer
	getenv  func(string) string
	stdout  io.Writer

	client *adminClient // set by complete
}

func (o *statusOptions) complete(args []string) error {
	if o.admin == "" {
		o.admin = o.getenv("SIDECAR_ADMIN_ADDR")
	}
	if o.admin == "" {
		o.admin = "127.0.0.1:15000"
	}
	if err := checkTimeout(o.timeout); err != nil {
		return err
	}
	o.client = newAdminClient(o.admin, o.timeout)
	return nil
}

func (o *statusOptions) validate() error { return o.out.validate() }

func (o *statusOptions) run(ctx context.Context) error {
	st := sidecarStatus{Admin: o.admin, Endpoints: []endpointsStatus{}, Resilience: []outbound.ServiceStatus{}, Policies: []policy.Status{}}
	var eps struct {
		Services []endpointsStatus `json:"services"`
	}
	var version buildInfo
	var cfg struct {
		MeshIdentity *mesh.IdentityStatus `json:"meshIdentity"`
	}
	sections := []struct {
		name, path string
		v          any
	}{
		{"version", "/version", &version},
		{"endpoints", "/endpoints", &eps},
		{"resilience", "/resilience", &st.Resilience},
		{"policies", "/policies", &st.Policies},
	}
	for _, s := range sections {
		err := o.client.get(ctx, s.path, s.v)
		switch {
		case errors.Is(err, errNotServed):
			st.NotReported = append(st.NotReported, s.name)
		case err != nil:
			return err
		}
	}
	if version.Version != "" {
		st.Version = &version
	}
	// The mesh identity is in /config; a sidecar that serves none is not
	// in the mesh, as far as status can tell.
	if err := o.client.get(ctx, "/config", &cfg); err != nil && !errors.Is(err, errNotServed) {
		return err
	}
	st.Mesh = cfg.MeshIdentity
	if eps.Services != nil {
		st.Endpoints = eps.Services
	}
	if st.Resilience == nil { // an empty list is JSON null from the admin API
		st.Resilience = []outbound.ServiceStatus{}
	}
	if st.Policies == nil {
		st.Policies = []policy.Status{}
	}
	return o.out.print(o.stdout, st, func(w io.Writer) error { return o.table(w, st) })
}

// table writes the status for people: a section per admin endpoint.
func (o *statusOptions) table(w io.Writer, st sidecarStatus) error {
	notReported := func(section string) bool {
		for _, s := range st.NotReported {
			if s == section {
				fmt.Fprintf(w, "%s: not reported by this sidecar\n", section)
				return true
			}
		}
		return false
	}
	fmt.Fprintf(w, "Sidecar at %s", st.Admin)
	if v := st.Version; v != nil {
		fmt.Fprintf(w, ": sidecar %s (commit %s, %s)", v.Version, v.Commit, v.Go)
	}
	if m := st.Mesh; m != nil {
		fmt.Fprint(w, "\n\nMESH\n")
		if m.SPIFFEID == "" {
			fmt.Fprintf(w, "%s: no certificate from the Consul agent yet %s\n", m.Service, orDash(m.LeafError))
		} else {
			fmt.Fprintf(w, "identity %s (trust domain %s), certificate %s valid until %s (%s left), %d CA roots\n",
				m.SPIFFEID, m.TrustDomain, m.Serial, m.NotAfter.UTC().Format(time.RFC3339),
				time.Duration(m.SecondsToExpiry*float64(time.Second)).Round(time.Minute), m.Roots)
		}
	}
	fmt.Fprint(w, "\n\nENDPOINTS\n")
	if !notReported("endpoints") {
		rows := [][]string{}
		for _, s := range st.Endpoints {
			addrs := make([]string, 0, len(s.Endpoints))
			for _, e := range s.Endpoints {
				addrs = append(addrs, e.Addr)
			}
			rows = append(rows, []string{s.Service, s.Source, strconv.Itoa(len(s.Endpoints)),
				roundAge(s.AgeSeconds), orDash(strings.Join(addrs, ", "))})
		}
		if err := writeTableOrNone(w, []string{"SERVICE", "SOURCE", "HEALTHY", "AGE", "ADDRESSES"}, rows, "no services known yet"); err != nil {
			return err
		}
	}
	fmt.Fprint(w, "\nRESILIENCE (services called so far)\n")
	if !notReported("resilience") {
		rows := [][]string{}
		for _, s := range st.Resilience {
			var ejected []string
			for _, e := range s.Ejected {
				ejected = append(ejected, fmt.Sprintf("%s (ejection %d, until %s)", e.Addr, e.Ejections, e.Until.UTC().Format(time.RFC3339)))
			}
			limit := strconv.FormatInt(s.Limit, 10)
			if a := s.Adaptive; a != nil {
				limit += fmt.Sprintf(" adaptive (minRTT %gms, now %gms)", a.MinRTTMs, a.SampleRTTMs)
				if a.Probing {
					limit += " probing"
				}
			}
			rows = append(rows, []string{s.Service, s.Breaker.State,
				strconv.FormatUint(uint64(s.Breaker.Requests), 10), strconv.FormatUint(uint64(s.Breaker.Failures), 10),
				strconv.FormatInt(s.InFlight, 10), limit,
				fmt.Sprintf("%d of %d", s.RetryBudget.Retries, s.RetryBudget.Requests),
				orDash(strings.Join(ejected, ", "))})
		}
		if err := writeTableOrNone(w, []string{"SERVICE", "BREAKER", "REQUESTS", "FAILURES", "IN-FLIGHT", "LIMIT", "RETRIES (10s)", "EJECTED"},
			rows, "no service called yet"); err != nil {
			return err
		}
	}
	fmt.Fprint(w, "\nPOLICIES\n")
	if !notReported("policies") {
		rows := [][]string{}
		var rejections []string
		for _, s := range st.Policies {
			e := policyEntry{Status: s}
			rows = append(rows, e.row())
			if r := s.LastRejection; r != nil {
				rejections = append(rejections, rejectionNote(s.Service, r))
			}
		}
		if err := writeTableOrNone(w, policyColumns, rows, "none reported"); err != nil {
			return err
		}
		for _, r := range rejections {
			fmt.Fprintln(w, "\n"+r)
		}
	}
	return nil
}

// rejectionNote says which update of service's policy was rejected and why.
func rejectionNote(service string, r *policy.Rejection) string {
	version := ""
	if r.Version != "" {
		version = " version " + r.Version
	}
	lines := strings.Split(r.Error, "\n")
	for i := range lines {
		lines[i] = termSafe(lines[i])
	}
	return fmt.Sprintf("%s: the update from %s%s was rejected at %s; the policy before it stays in force:\n  %s",
		termSafe(service), termSafe(r.Source), termSafe(version), r.At.UTC().Format(time.RFC3339), strings.Join(lines, "\n  "))
}

func writeTableOrNone(w io.Writer, header []string, rows [][]string, none string) error {
	if len(rows) == 0 {
		_, err := fmt.Fprintln(w, none)
		return err
	}
	return writeTable(w, header, rows)
}

func roundAge(seconds float64) string {
	return (time.Duration(seconds * float64(time.Second))).Round(time.Second).String()
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func newStatusCommand(stdout io.Writer, getenv func(string) string) *cobra.Command {
	o := &statusOptions{getenv: getenv, stdout: stdout}
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show a running sidecar's endpoints, breakers and policies",
		Long: `Show what a running sidecar sees, from its admin API: the endpoints of every
service it knows (GET /endpoints), the circuit breaker, requests in flight,
retry budget and ejected endpoints of every service called so far
(GET /resilience), and every service's policy in force with its source and
version (GET /policies). A section the sidecar does not serve is shown as not
reported.`,
		Example: `  sidecar status
  kubectl exec POD -c sidecar -- sidecar status -o json`,
		Args: cobra.NoArgs,
		RunE: runE(o),
	}
	cmd.Flags().StringVar(&o.admin, "admin", "", "the sidecar's admin API, host:port (env SIDECAR_ADMIN_ADDR, default 127.0.0.1:15000)")
	cmd.Flags().DurationVar(&o.timeout, "timeout", defaultRequestTimeout, "the longest wait for each answer of the sidecar")
	o.out.addFlag(cmd.Flags(), "table", "sections for people")
	return cmd
}
