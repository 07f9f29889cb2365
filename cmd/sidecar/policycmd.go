package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/sidecar-mesh/sidecar/pkg/policy"
	"github.com/sidecar-mesh/sidecar/pkg/redact"
)

// command is one CLI command's options: complete fills in what flags,
// arguments and the environment leave open, validate checks the result,
// run does the work.
type command interface {
	complete(args []string) error
	validate() error
	run(ctx context.Context) error
}

// runE is a command's cobra RunE: complete, validate, run.
func runE(c command) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, args []string) error {
		if err := c.complete(args); err != nil {
			return err
		}
		if err := c.validate(); err != nil {
			return err
		}
		return c.run(cmd.Context())
	}
}

// policyTarget is where `sidecar policy` reads and writes policies: Consul
// KV, or, read-only, a running sidecar's admin API (--admin).
type policyTarget struct {
	consulAddr string
	admin      string
	timeout    time.Duration
	getenv     func(string) string
	flags      *pflag.FlagSet

	kv  *kvStore     // set by complete without --admin
	api *adminClient // set by complete with --admin
}

func (t *policyTarget) addFlags(fs *pflag.FlagSet) {
	t.flags = fs
	fs.StringVar(&t.consulAddr, "consul-addr", "", consulAddrUsage)
	fs.StringVar(&t.admin, "admin", "",
		"read the policies in force from a running sidecar's admin API at host:port (e.g. 127.0.0.1:15000) instead of Consul KV; read-only")
	fs.DurationVar(&t.timeout, "timeout", defaultRequestTimeout,
		"the longest wait for each answer of Consul (or, with --admin, of the sidecar)")
}

func (t *policyTarget) complete() error {
	if err := checkTimeout(t.timeout); err != nil {
		return err
	}
	if t.admin != "" {
		if t.flags.Changed("consul-addr") {
			return errors.New("--admin and --consul-addr exclude each other: read a sidecar's policies in force, or Consul KV")
		}
		t.api = newAdminClient(t.admin, t.timeout)
		return nil
	}
	addr, err := consulAddress(t.consulAddr, t.getenv)
	if err != nil {
		return err
	}
	t.kv, err = newKVStore(addr, t.getenv("CONSUL_HTTP_TOKEN"), t.timeout)
	return err
}

// consulAddrUsage is the help of a command's --consul-addr.
const consulAddrUsage = "Consul HTTP API, host:port or URL (env CONSUL_HTTP_ADDR, default 127.0.0.1:8500); token from CONSUL_HTTP_TOKEN"

// consulAddress is the Consul agent a command talks to: flag
// (--consul-addr), else $CONSUL_HTTP_ADDR, else 127.0.0.1:8500.
func consulAddress(flag string, getenv func(string) string) (string, error) {
	addr := flag
	if addr == "" {
		addr = getenv("CONSUL_HTTP_ADDR")
	}
	if addr == "" {
		addr = "127.0.0.1:8500"
	}
	if strings.Contains(addr, "@") {
		// The Consul client takes userinfo for part of the host name and
		// echoes it in every error.
		return "", fmt.Errorf("Consul address %s: credentials in the address are not supported; set the token in CONSUL_HTTP_TOKEN",
			redact.URL(addr).Redacted())
	}
	return addr, nil
}

// defaultRequestTimeout bounds each call the CLI makes to Consul or to a
// sidecar's admin API (--timeout): one that accepts and never answers
// ends the command instead of hanging it.
const defaultRequestTimeout = 10 * time.Second

// checkTimeout refuses a --timeout that would never end a call.
func checkTimeout(d time.Duration) error {
	if d <= 0 {
		return fmt.Errorf("--timeout %s: want a positive duration such as %s", d, defaultRequestTimeout)
	}
	return nil
}

// writable refuses --admin for a verb that writes or compares documents.
func (t *policyTarget) writable(verb string) error {
	if t.admin == "" {
		return nil
	}
	return fmt.Errorf("policy %s works on Consul KV, and --admin %s is a running sidecar's read-only view of its policies in force: "+
		"drop --admin (Consul from --consul-addr or CONSUL_HTTP_ADDR)", verb, t.admin)
}

// completeService checks a SERVICE argument: "*" or a service name.
func completeService(args []string) (string, error) {
	if len(args) != 1 {
		return "", fmt.Errorf("want one SERVICE argument (a service name, or '*' for the default), got %d", len(args))
	}
	s := args[0]
	if s != policy.Default && !policy.ValidServiceName(s) {
		return "", fmt.Errorf("SERVICE %q: want '*' or a service name (lower-case letters, digits and '-', at most 63)", s)
	}
	return s, nil
}

// policyEntry is one service's policy as list and get show it: the admin
// API's Status (the same JSON fields), plus, read from Consul KV, the
// stored document, or why it is invalid.
type policyEntry struct {
	policy.Status
	// Document is the service's own document as stored in Consul KV.
	Document *policy.Policy `json:"document,omitempty"`
	// Invalid is why the stored value is not a valid policy; sidecars
	// reject it and keep what they had.
	Invalid string `json:"invalid,omitempty"`
}

// entriesFromKV turns Consul KV's keys into entries whose Effective is
// what the valid documents make of each service (sidecars may add their
// file and inline policies under them).
func entriesFromKV(es []kvEntry) []policyEntry {
	byService := map[string]policy.Policy{}
	for _, e := range es {
		if e.doc != nil {
			byService[e.service] = *e.doc
		}
	}
	out := make([]policyEntry, 0, len(es))
	for _, e := range es {
		pe := policyEntry{Status: policy.Status{
			Service: e.service, Source: e.source(), Version: strconv.FormatUint(e.index, 10),
			Effective: policy.Effective(e.service, byService),
		}, Document: e.doc}
		if e.err != nil {
			pe.Invalid = e.err.Error()
		}
		out = append(out, pe)
	}
	return out
}

// policyColumns are list's; SOURCE and VERSION come last, as they are
// the widest and the least regular.
var policyColumns = []string{"SERVICE", "TIMEOUT", "ATTEMPTS", "PER-TRY", "BREAKER", "MAX-IN-FLIGHT", "STATUS", "SOURCE", "VERSION"}

// row is the entry under policyColumns.
func (e policyEntry) row() []string {
	source := e.Source
	if source == "consul:"+policy.KVKey(e.Service) {
		source = "consul"
	}
	status := "ok"
	switch {
	case e.Invalid != "":
		status = "invalid"
	case e.LastRejection != nil:
		status = "update rejected"
	}
	if e.Invalid != "" { // its values are not in force anywhere
		return []string{e.Service, "-", "-", "-", "-", "-", status, source, orDash(e.Version)}
	}
	p := policy.Merge(policy.Defaults(), e.Effective)
	perTry := p.Retry.PerTryTimeout.String()
	if p.Retry.PerTryTimeout.D() == 0 {
		perTry = "none"
	}
	cb := p.CircuitBreaker
	return []string{e.Service, p.Timeout.String(), strconv.Itoa(*p.Retry.Attempts), perTry,
		fmt.Sprintf("%d fails or %s/%s", *cb.ConsecutiveFailures, percentOf(*cb.FailureRatio), cb.Window),
		strconv.Itoa(*p.Concurrency.MaxInFlight), status, source, orDash(e.Version)}
}

// notes are what the table's STATUS column cannot hold: why a document is
// invalid, which update was rejected.
func entryNotes(es []policyEntry) []string {
	var out []string
	for _, e := range es {
		switch {
		case e.Invalid != "":
			out = append(out, fmt.Sprintf("%s: %s (index %s) is invalid; sidecars reject it and keep what they had:\n  %s",
				e.Service, e.Source, e.Version, strings.ReplaceAll(e.Invalid, "\n", "\n  ")))
		case e.LastRejection != nil:
			out = append(out, rejectionNote(e.Service, e.LastRejection))
		}
	}
	return out
}

// policyReadOptions are list's and get's: a target and an output format.
type policyReadOptions struct {
	target  *policyTarget
	out     printer
	service string // get only
	stdout  io.Writer
	stderr  io.Writer
}

// entries reads every policy from the target, or only service's.
func (o *policyReadOptions) entries(ctx context.Context) ([]policyEntry, error) {
	if o.target.api != nil {
		ss, err := o.target.api.policies(ctx)
		if err != nil {
			return nil, err
		}
		out := []policyEntry{}
		for _, s := range ss {
			if o.service == "" || s.Service == o.service {
				out = append(out, policyEntry{Status: s})
			}
		}
		if o.service != "" && len(out) == 0 {
			st, err := o.target.api.policy(ctx, o.service)
			if err != nil {
				return nil, err
			}
			if st == nil {
				return nil, fmt.Errorf("the sidecar at %s reports no policy for %q", o.target.admin, o.service)
			}
			out = append(out, policyEntry{Status: *st})
		}
		return out, nil
	}
	es, err := o.target.kv.list(ctx)
	if err != nil {
		return nil, err
	}
	all := entriesFromKV(es)
	if o.service == "" {
		return all, nil
	}
	for _, e := range all {
		if e.Service == o.service {
			return []policyEntry{e}, nil
		}
	}
	return nil, fmt.Errorf("no policy for %q: Consul KV at %s has no key %s", o.service, o.target.kv.addr, policy.KVKey(o.service))
}

type listOptions struct{ policyReadOptions }

func (o *listOptions) complete(args []string) error { return o.target.complete() }
func (o *listOptions) validate() error              { return o.out.validate() }

func (o *listOptions) run(ctx context.Context) error {
	es, err := o.entries(ctx)
	if err != nil {
		return err
	}
	return o.out.print(o.stdout, es, func(w io.Writer) error {
		if len(es) == 0 {
			where := "the sidecar at " + o.target.admin
			if o.target.kv != nil {
				where = "Consul KV at " + o.target.kv.addr + " under " + policy.KVPrefix
			}
			_, err := fmt.Fprintf(o.stderr, "No policies in %s: every service runs on the built-in defaults.\n", where)
			return err
		}
		rows := make([][]string, 0, len(es))
		for _, e := range es {
			rows = append(rows, e.row())
		}
		if err := writeTable(w, policyColumns, rows); err != nil {
			return err
		}
		for _, n := range entryNotes(es) {
			fmt.Fprintln(o.stderr, n)
		}
		return nil
	})
}

type getOptions struct{ policyReadOptions }

func (o *getOptions) complete(args []string) (err error) {
	if o.service, err = completeService(args); err != nil {
		return err
	}
	return o.target.complete()
}

func (o *getOptions) validate() error { return o.out.validate() }

// run prints the service's document as stored in Consul KV, or, with
// --admin, its policy in force; -o table prints list's row.
func (o *getOptions) run(ctx context.Context) error {
	es, err := o.entries(ctx)
	if err != nil {
		return err
	}
	e := es[0]
	doc := e.Document
	if o.target.api != nil {
		doc = &e.Effective
	}
	if doc == nil && o.out.format != "table" {
		return fmt.Errorf("%s (index %s) is not a valid policy:\n%s", e.Source, e.Version, e.Invalid)
	}
	return o.out.print(o.stdout, doc, func(w io.Writer) error {
		if err := writeTable(w, policyColumns, [][]string{e.row()}); err != nil {
			return err
		}
		for _, n := range entryNotes(es) {
			fmt.Fprintln(o.stderr, n)
		}
		return nil
	})
}

type deleteOptions struct {
	target  *policyTarget
	service string
	dryRun  bool
	cas     casFlags
	stdout  io.Writer
}

func (o *deleteOptions) complete(args []string) (err error) {
	if o.service, err = completeService(args); err != nil {
		return err
	}
	o.cas.complete()
	return o.target.complete()
}

func (o *deleteOptions) validate() error {
	if err := o.target.writable("delete"); err != nil {
		return err
	}
	if err := o.cas.validate(); err != nil {
		return err
	}
	if o.cas.given && o.cas.index == 0 {
		return errors.New("--cas-index 0 means create only, which delete cannot do: give the key's ModifyIndex (sidecar policy list)")
	}
	return nil
}

func (o *deleteOptions) run(ctx context.Context) error {
	kv := o.target.kv
	key := policy.KVKey(o.service)
	cur, err := kv.get(ctx, o.service)
	if err != nil {
		return err
	}
	if cur == nil {
		return fmt.Errorf("no policy for %q: Consul KV at %s has no key %s", o.service, kv.addr, key)
	}
	if err := o.cas.check(key, cur.index, true); err != nil {
		return err
	}
	if o.dryRun {
		_, err := fmt.Fprintf(o.stdout, "policy/%s deleted (dry run; %s at index %d)\n", o.service, key, cur.index)
		return err
	}
	if err := kv.delete(ctx, key, o.cas.on, o.cas.expected(cur.index)); err != nil {
		return err
	}
	_, err = fmt.Fprintf(o.stdout, "policy/%s deleted (%s, was at index %d)\n", o.service, key, cur.index)
	return err
}

// casFlags are --cas and --cas-index: check-and-set against the
// ModifyIndex read before writing, or against a given one.
type casFlags struct {
	on    bool
	index int64 // --cas-index, when given
	given bool  // --cas-index was given
	flags *pflag.FlagSet
}

func (c *casFlags) addFlags(fs *pflag.FlagSet, what string, createOnly bool) {
	c.flags = fs
	fs.BoolVar(&c.on, "cas", false, "check-and-set: "+what+" only if the key is still at the ModifyIndex read before it (no silent overwrite of someone else's change)")
	usage := "check-and-set against this ModifyIndex instead of the one read"
	if createOnly {
		usage += " (0: the key must not exist)"
	}
	fs.Int64Var(&c.index, "cas-index", 0, usage+"; implies --cas")
}

// complete: --cas-index implies --cas.
func (c *casFlags) complete() {
	c.given = c.flags.Changed("cas-index")
	if c.given {
		c.on = true
	}
}

// validate refuses a negative --cas-index: no key has one, and taking it
// for "not given" would silently skip the check asked for.
func (c *casFlags) validate() error {
	if c.given && c.index < 0 {
		return fmt.Errorf("--cas-index %d: a ModifyIndex is 0 or more (sidecar policy list shows each key's)", c.index)
	}
	return nil
}

// check is a conflict when --cas-index names another index than the key's
// current one (0: absent).
func (c *casFlags) check(key string, current uint64, deleting bool) error {
	if c.given && uint64(c.index) != current {
		return &casConflictError{key: key, expected: uint64(c.index), current: current, deleting: deleting}
	}
	return nil
}

// expected is the index to check-and-set against: --cas-index, or the
// current one read.
func (c *casFlags) expected(current uint64) uint64 {
	if c.given {
		return uint64(c.index)
	}
	return current
}

// noArgs refuses arguments to a verb that reads its documents from -f.
func noArgs(verb string, args []string) error {
	if len(args) > 0 {
		return fmt.Errorf("%s takes no arguments (got %q): the documents come from -f FILE", verb, args)
	}
	return nil
}

func newPolicyCommand(stdin io.Reader, stdout, stderr io.Writer, getenv func(string) string) *cobra.Command {
	target := &policyTarget{getenv: getenv}
	cmd := &cobra.Command{
		Use:   "policy",
		Short: "Manage resilience policies in Consul KV, or read a running sidecar's",
		Long: `Manage the resilience policies of services, fleet-wide, in Consul KV: one
Policy document per key, ` + policy.KVPrefix + `SERVICE (the default under every
service is the key ` + policy.KVKey(policy.Default) + `). Sidecars watch these keys and
apply changes without a restart.

With --admin HOST:PORT, list, get, explain and diff read a running sidecar's
policies in force from its admin API instead (read-only).`,
		Example: `  sidecar policy list
  sidecar policy apply -f policies.yaml --cas
  sidecar policy diff -f policies.yaml
  sidecar policy explain user-service
  sidecar policy validate -f - < policies.yaml`,
	}
	target.addFlags(cmd.PersistentFlags())

	read := func() policyReadOptions {
		return policyReadOptions{target: target, stdout: stdout, stderr: stderr}
	}
	lo := &listOptions{read()}
	list := &cobra.Command{
		Use:   "list",
		Short: "List every service's policy: source, version and main values",
		Long: `List every policy key in Consul KV (or, with --admin, every policy in force in
a sidecar) with its version (the key's ModifyIndex, or the sidecar's file
hash) and its main effective values. Invalid documents are marked and
explained on stderr.`,
		Args: cobra.NoArgs,
		RunE: runE(lo),
	}
	lo.out.addFlag(list.Flags(), "table", "a row per service")

	gobj := &getOptions{read()}
	get := &cobra.Command{
		Use:   "get SERVICE",
		Short: "Print a service's policy document",
		Long: `Print SERVICE's Policy document as stored in Consul KV ('*' for the default),
normalized; with --admin, the policy in force in that sidecar, after defaults
and merging. -o table prints list's row for it.`,
		Args: cobra.ArbitraryArgs,
		RunE: runE(gobj),
	}
	gobj.out.addFlag(get.Flags(), "yaml", "list's row")

	do := &deleteOptions{target: target, stdout: stdout}
	del := &cobra.Command{
		Use:   "delete SERVICE",
		Short: "Delete a service's policy from Consul KV",
		Long: `Delete SERVICE's key from Consul KV; its sidecars fall back to the '*' policy
and the built-in defaults. With --cas (or --cas-index N) the key is deleted
only if nobody changed it since it was read.`,
		Args: cobra.ArbitraryArgs,
		RunE: runE(do),
	}
	del.Flags().BoolVar(&do.dryRun, "dry-run", false, "say what would be deleted; change nothing")
	do.cas.addFlags(del.Flags(), "delete", false)

	cmd.AddCommand(list, get, newPolicyApplyCommand(target, stdin, stdout), del,
		newPolicyValidateCommand(stdin, stdout, stderr), newPolicyDiffCommand(target, stdin, stdout),
		newPolicyExplainCommand(target, stdin, stdout), newPolicySimulateCommand(stdin, stdout))
	return cmd
}
