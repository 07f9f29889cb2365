package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/policy"
	"github.com/sidecar-mesh/sidecar/pkg/readlimit"
)

// policyInput is a file of Policy documents, or "-" for stdin.
type policyInput struct {
	file  string
	stdin io.Reader

	name string          // for messages: the file, or "stdin"
	docs []policy.Policy // set by read
}

func (in *policyInput) addFlag(fs *pflag.FlagSet, usage string) {
	fs.StringVarP(&in.file, "filename", "f", "", usage+": a file of Policy documents (YAML, '---'-separated, or JSON), or - for stdin")
}

// read reads and parses the input: every document decoded strictly and
// validated; all problems are reported together.
func (in *policyInput) read() error {
	var (
		data []byte
		err  error
	)
	switch in.file {
	case "":
		return errors.New("-f FILE is required (- reads stdin)")
	case "-":
		in.name = "stdin"
		data, err = readlimit.ReadAll(in.stdin, in.name)
	default:
		in.name = in.file
		data, err = readlimit.ReadFile(in.file)
	}
	switch {
	case readlimit.IsTooLarge(err):
		return err // it names the input and the cap
	case err != nil:
		return fmt.Errorf("reading %s: %w", in.name, err)
	}
	docs, err := policy.Parse(data, in.name)
	if err != nil {
		n := strings.Count(err.Error(), "\n") + 1
		if ps := (*policy.Problems)(nil); errors.As(err, &ps) {
			n = ps.Len()
		}
		return fmt.Errorf("%s is not valid: %s:\n  %s", in.name, countOf(n, "problem", "problems"), strings.ReplaceAll(err.Error(), "\n", "\n  "))
	}
	if len(docs) == 0 {
		return fmt.Errorf("%s has no Policy documents", in.name)
	}
	in.docs = docs
	return nil
}

// completeFromInput completes a verb whose documents come from -f and go
// to (or are compared with) Consul KV.
func completeFromInput(verb string, args []string, in *policyInput, target *policyTarget) error {
	if err := noArgs(verb, args); err != nil {
		return err
	}
	if err := in.read(); err != nil {
		return err
	}
	return target.complete()
}

func (in *policyInput) byService() map[string]policy.Policy {
	m := make(map[string]policy.Policy, len(in.docs))
	for _, d := range in.docs {
		m[d.Service] = d
	}
	return m
}

// countOf is "1 policy", "2 policies".
func countOf(n int, one, many string) string {
	if n == 1 {
		return "1 " + one
	}
	return fmt.Sprintf("%d %s", n, many)
}

// documentYAML is p as sidecar stores and compares it: normalized YAML
// (canonical durations, fixed key order, apiVersion and kind filled in).
func documentYAML(p policy.Policy) []byte {
	if p.APIVersion == "" {
		p.APIVersion = policy.APIVersion
	}
	if p.Kind == "" {
		p.Kind = policy.Kind
	}
	b, err := toYAML(p)
	if err != nil { // a Policy always encodes
		panic(err)
	}
	return b
}

// storedYAML is what a Consul KV entry holds, for comparing: its document
// normalized, or, when invalid, its raw value.
func storedYAML(e *kvEntry) []byte {
	switch {
	case e == nil:
		return nil
	case e.doc != nil:
		return documentYAML(*e.doc)
	default:
		return e.raw
	}
}

// change is one document of an input compared with Consul KV.
type change struct {
	doc   policy.Policy
	key   string
	value []byte   // normalized document
	cur   *kvEntry // nil: no key yet
}

func (c change) changed() bool { return c.cur == nil || string(storedYAML(c.cur)) != string(c.value) }

// compare pairs every document of in with its key in Consul KV.
func compare(ctx context.Context, kv *kvStore, in *policyInput) ([]change, error) {
	entries, err := kv.list(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]change, 0, len(in.docs))
	for _, d := range in.docs {
		c := change{doc: d, key: policy.KVKey(d.Service), value: documentYAML(d)}
		if i := slices.IndexFunc(entries, func(e kvEntry) bool { return e.service == d.Service }); i >= 0 {
			c.cur = &entries[i]
		}
		out = append(out, c)
	}
	return out, nil
}

// writeDiff writes c as a unified diff of Consul KV's value to the input's.
func writeDiff(w io.Writer, c change, inputName string) error {
	from := "consul:" + c.key + " (absent)"
	if c.cur != nil {
		from = fmt.Sprintf("consul:%s (index %d)", c.key, c.cur.index)
		if c.cur.doc == nil {
			from += " (invalid)"
		}
	}
	return unifiedDiff(w, from, inputName+": "+c.doc.Service, lines(storedYAML(c.cur)), lines(c.value))
}

func lines(b []byte) []string {
	s := strings.TrimSuffix(string(b), "\n")
	if s == "" {
		return nil
	}
	return strings.Split(s, "\n")
}

type applyOptions struct {
	target *policyTarget
	in     policyInput
	dryRun bool
	cas    casFlags
	stdout io.Writer
}

func (o *applyOptions) complete(args []string) error {
	o.cas.complete()
	return completeFromInput("apply", args, &o.in, o.target)
}

func (o *applyOptions) validate() error {
	if err := o.target.writable("apply"); err != nil {
		return err
	}
	if err := o.cas.validate(); err != nil {
		return err
	}
	if o.cas.given && len(o.in.docs) != 1 {
		return fmt.Errorf("--cas-index is one key's ModifyIndex, and %s has %d documents: use --cas, which checks each key against the index read",
			o.in.name, len(o.in.docs))
	}
	return nil
}

// run writes every changed document in one transaction; with --cas each
// key only if it is still at the index read (or --cas-index).
func (o *applyOptions) run(ctx context.Context) error {
	changes, err := compare(ctx, o.target.kv, &o.in)
	if err != nil {
		return err
	}
	if err := o.cas.check(changes[0].key, changes[0].cur.modifyIndex(), false); err != nil {
		return err
	}
	if o.dryRun {
		return o.printDryRun(changes)
	}
	var writes []discovery.PolicyWrite
	var written []change
	for _, c := range changes {
		if c.changed() {
			writes = append(writes, discovery.PolicyWrite{Key: c.key, Value: c.value, CAS: o.cas.on, Index: o.cas.expected(c.cur.modifyIndex())})
			written = append(written, c)
		}
	}
	var indexes []uint64
	if len(writes) > 0 {
		if indexes, err = o.target.kv.write(ctx, writes); err != nil {
			return err
		}
	}
	for _, c := range changes {
		switch i := slices.IndexFunc(written, func(w change) bool { return w.key == c.key }); {
		case i < 0:
			fmt.Fprintf(o.stdout, "policy/%s unchanged (%s, index %d)\n", c.doc.Service, c.key, c.cur.index)
		case c.cur == nil:
			fmt.Fprintf(o.stdout, "policy/%s created (%s, index %d)\n", c.doc.Service, c.key, indexes[i])
		default:
			fmt.Fprintf(o.stdout, "policy/%s configured (%s, index %d -> %d)\n", c.doc.Service, c.key, c.cur.index, indexes[i])
		}
	}
	return nil
}

// printDryRun prints the diff of each changed document, then what apply
// would do with each.
func (o *applyOptions) printDryRun(changes []change) error {
	for _, c := range changes {
		if c.changed() {
			if err := writeDiff(o.stdout, c, o.in.name); err != nil {
				return err
			}
		}
	}
	for _, c := range changes {
		verb, at := "unchanged", ""
		switch {
		case c.cur == nil:
			verb = "created"
		case c.changed():
			verb = "configured"
		}
		if c.cur != nil {
			at = fmt.Sprintf("; %s at index %d", c.key, c.cur.index)
		}
		if _, err := fmt.Fprintf(o.stdout, "policy/%s %s (dry run%s)\n", c.doc.Service, verb, at); err != nil {
			return err
		}
	}
	return nil
}

func newPolicyApplyCommand(target *policyTarget, stdin io.Reader, stdout io.Writer) *cobra.Command {
	o := &applyOptions{target: target, in: policyInput{stdin: stdin}, stdout: stdout}
	cmd := &cobra.Command{
		Use:   "apply -f FILE|-",
		Short: "Write policies to Consul KV, one key per document",
		Long: `Write each Policy document of FILE to its key in Consul KV
(` + policy.KVPrefix + `SERVICE), normalized. Every document is parsed and
validated first: if any is invalid, every problem is reported and nothing is
written. The changed keys are written in one Consul transaction: all or none.
Unchanged documents are not written (their index stays).

--cas: each key is written only if it is still at the ModifyIndex read
before (absent keys: only if still absent), so two operators cannot
overwrite each other silently; a conflict names the key and the indexes.
--cas-index N does the same against N (0: create only), for one document.`,
		Example: `  sidecar policy apply -f policies.yaml
  sidecar policy apply -f policies.yaml --dry-run
  sidecar policy get users | sed 's/timeout: 5s/timeout: 3s/' | sidecar policy apply -f - --cas`,
		Args: cobra.ArbitraryArgs,
		RunE: runE(o),
	}
	o.in.addFlag(cmd.Flags(), "the policies to write")
	cmd.Flags().BoolVar(&o.dryRun, "dry-run", false, "print what would change (a diff per key), write nothing")
	o.cas.addFlags(cmd.Flags(), "write", true)
	return cmd
}

type validateOptions struct {
	in     policyInput
	stdout io.Writer
	stderr io.Writer
}

func (o *validateOptions) complete(args []string) error { return noArgs("validate", args) }

func (o *validateOptions) validate() error { return nil }

// run validates offline; it also prints, as warnings, the explain
// warnings that each document's own values cause.
func (o *validateOptions) run(context.Context) error {
	if err := o.in.read(); err != nil {
		return err
	}
	services := make([]string, 0, len(o.in.docs))
	for _, d := range o.in.docs {
		services = append(services, d.Service)
	}
	fmt.Fprintf(o.stdout, "%s: %s valid: %s\n", o.in.name, countOf(len(o.in.docs), "policy", "policies"), strings.Join(services, ", "))
	byService := o.in.byService()
	for _, d := range o.in.docs {
		for _, w := range ownWarnings(policy.Explain(d.Service, byService)) {
			fmt.Fprintf(o.stderr, "Warning: %s: %s\n", d.Service, w.Message)
		}
	}
	return nil
}

// ownWarnings are e's warnings that involve a value of the service's own
// document (for "*", of the "*" document): what that document causes.
func ownWarnings(e policy.Explanation) []policy.Warning {
	origin := map[string]string{}
	for _, f := range e.Fields {
		origin[f.Path] = f.Origin
	}
	var out []policy.Warning
	for _, w := range e.Warnings {
		for _, f := range w.Fields {
			if origin[f] == e.Service {
				out = append(out, w)
				break
			}
		}
	}
	return out
}

func newPolicyValidateCommand(stdin io.Reader, stdout, stderr io.Writer) *cobra.Command {
	o := &validateOptions{in: policyInput{stdin: stdin}, stdout: stdout, stderr: stderr}
	cmd := &cobra.Command{
		Use:   "validate -f FILE|-",
		Short: "Check policy documents offline",
		Long: `Check every Policy document of FILE without contacting anything: strict
decoding (unknown keys are errors) and validation. Exits 0 when every document
is valid; otherwise non-zero, with the problems listed, each with its file,
line, document, field path, value (at most 200 bytes of it) and the allowed
range: the first 100, then how many more there are. Warnings (valid values
that combine badly, see explain) go to stderr and do not fail. FILE, like
every input of sidecar, is read up to 64 MiB.`,
		Example: `  sidecar policy validate -f policies.yaml
  sidecar policy validate -f - < policies.yaml`,
		Args: cobra.ArbitraryArgs,
		RunE: runE(o),
	}
	o.in.addFlag(cmd.Flags(), "the policies to check")
	return cmd
}
