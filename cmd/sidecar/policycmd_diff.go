package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"

	"github.com/spf13/cobra"

	"github.com/sidecar-mesh/sidecar/internal/lcs"
	"github.com/sidecar-mesh/sidecar/pkg/policy"
)

// Exit codes of `policy diff`, as diff(1) has them.
const (
	diffDifferent = 1
	diffTrouble   = 2
)

type diffOptions struct {
	target *policyTarget
	in     policyInput
	stdout io.Writer
}

func (o *diffOptions) complete(args []string) error {
	return completeFromInput("diff", args, &o.in, o.target)
}

func (o *diffOptions) validate() error { return nil }

// run prints a unified diff per document that differs from its key in
// Consul KV (normalized YAML on both sides, so only meaning counts). Keys
// the input has no document for are not compared. With --admin it compares
// the policies in force in a running sidecar instead (runAdmin).
func (o *diffOptions) run(ctx context.Context) error {
	if o.target.api != nil {
		return o.runAdmin(ctx)
	}
	changes, err := compare(ctx, o.target.kv, &o.in)
	if err != nil {
		return err
	}
	different := 0
	for _, c := range changes {
		if c.changed() {
			different++
			if err := writeDiff(o.stdout, c, o.in.name); err != nil {
				return err
			}
		}
	}
	if different > 0 {
		return &exitError{code: diffDifferent} // no message: the diff says it
	}
	return nil
}

// runAdmin compares, for each service the input has a document for, the
// policy the input puts in force (defaults, under the input's "*"
// document, under the service's) with the one in force in the running
// sidecar (GET /policies/SERVICE): "is this sidecar running what my file
// says?". Both are whole effective policies, normalized.
func (o *diffOptions) runAdmin(ctx context.Context) error {
	byService := make(map[string]policy.Policy, len(o.in.docs))
	for _, d := range o.in.docs {
		byService[d.Service] = d
	}
	different := 0
	for _, d := range o.in.docs {
		st, err := o.target.api.policy(ctx, d.Service)
		if err != nil {
			return err
		}
		if st == nil {
			return fmt.Errorf("the sidecar at %s does not report its policies (GET /policies/%s: 404): its build predates policy management", o.target.admin, d.Service)
		}
		want := policy.Effective(d.Service, byService)
		from := fmt.Sprintf("admin:%s %s (in force, from %s)", o.target.admin, d.Service, st.Source)
		var buf bytes.Buffer
		if err := unifiedDiff(&buf, from, o.in.name+": "+d.Service+" (in force as written)", lines(documentYAML(st.Effective)), lines(documentYAML(want))); err != nil {
			return err
		}
		if buf.Len() > 0 {
			different++
			if _, err := o.stdout.Write(buf.Bytes()); err != nil {
				return err
			}
		}
	}
	if different > 0 {
		return &exitError{code: diffDifferent}
	}
	return nil
}

// asTrouble gives err diff's exit code for trouble, unless it already has
// one.
func asTrouble(err error) error {
	var ee *exitError
	if err == nil || errors.As(err, &ee) {
		return err
	}
	return &exitError{code: diffTrouble, err: err}
}

func newPolicyDiffCommand(target *policyTarget, stdin io.Reader, stdout io.Writer) *cobra.Command {
	o := &diffOptions{target: target, in: policyInput{stdin: stdin}, stdout: stdout}
	cmd := &cobra.Command{
		Use:   "diff -f FILE|-",
		Short: "Show how policy documents differ from Consul KV",
		Long: `Compare each Policy document of FILE with its key in Consul KV and print a
unified diff for each one that differs. Both sides are normalized YAML, so
formatting, key order and duration spelling (1000ms, 1s) do not count.
With --admin HOST:PORT, compare instead the policy FILE puts in force for
each of its services (defaults, under its '*' document, under the service's)
with the one in force in that running sidecar.
Exit status: 0 no differences, 1 differences, 2 trouble (an invalid file,
Consul unreachable, a bad flag).`,
		Example: `  sidecar policy diff -f policies.yaml && echo "in sync"
  sidecar policy diff -f policies.yaml --admin 127.0.0.1:15000`,
		Args: func(cmd *cobra.Command, args []string) error {
			return asTrouble(cobra.NoArgs(cmd, args))
		},
		RunE: func(cmd *cobra.Command, args []string) error { return asTrouble(runE(o)(cmd, args)) },
	}
	cmd.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return asTrouble(err) })
	o.in.addFlag(cmd.Flags(), "the policies to compare")
	return cmd
}

// unifiedDiff writes the difference from a to b as a unified diff with
// three lines of context, headed by from and to. Equal inputs write
// nothing.
func unifiedDiff(w io.Writer, from, to string, a, b []string) error {
	const contextLines = 3
	// A shortest edit script: quadratic, fine for policy documents of
	// tens of lines.
	ops := lcs.Script(len(a), len(b), func(i, j int) bool { return a[i] == b[j] })
	// Each hunk is a range of ops: changes with their context, merged when
	// their contexts touch.
	var hunks [][2]int
	for k, op := range ops {
		if op.Kind == lcs.Keep {
			continue
		}
		start, end := max(k-contextLines, 0), min(k+1+contextLines, len(ops))
		if n := len(hunks); n > 0 && start <= hunks[n-1][1] {
			hunks[n-1][1] = end
		} else {
			hunks = append(hunks, [2]int{start, end})
		}
	}
	if len(hunks) == 0 {
		return nil
	}
	if _, err := fmt.Fprintf(w, "--- %s\n+++ %s\n", from, to); err != nil {
		return err
	}
	for _, h := range hunks {
		aStart, bStart := ops[h[0]].A, ops[h[0]].B
		var aCount, bCount int
		for _, op := range ops[h[0]:h[1]] {
			if op.Kind != lcs.Insert {
				aCount++
			}
			if op.Kind != lcs.Delete {
				bCount++
			}
		}
		if _, err := fmt.Fprintf(w, "@@ -%s +%s @@\n", hunkRange(aStart, aCount), hunkRange(bStart, bCount)); err != nil {
			return err
		}
		for _, op := range ops[h[0]:h[1]] {
			var line string
			if op.Kind == lcs.Insert {
				line = b[op.B]
			} else {
				line = a[op.A]
			}
			if _, err := fmt.Fprintf(w, "%c%s\n", op.Kind, line); err != nil {
				return err
			}
		}
	}
	return nil
}

// hunkRange is a unified diff's "start,count" for lines from 0-based start:
// 1-based, ",1" left out, and for no lines the line before them.
func hunkRange(start, count int) string {
	switch count {
	case 0:
		return strconv.Itoa(start) + ",0"
	case 1:
		return strconv.Itoa(start + 1)
	}
	return strconv.Itoa(start+1) + "," + strconv.Itoa(count)
}
