package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/sidecar-mesh/sidecar/pkg/policy"
)

// explainReport is what `policy explain` prints: the analysis of
// pkg/policy and where each layer of the policy was read.
type explainReport struct {
	policy.Explanation
	Sources []explainSource `json:"sources"`
}

// explainSource is one layer of the merge: "default", "*" or the service,
// and where its document came from ("" when there is none).
type explainSource struct {
	Origin string `json:"origin"`
	From   string `json:"from,omitempty"`
	// Note says why there is no document, or why it was left out.
	Note string `json:"note,omitempty"`
}

type explainOptions struct {
	target  *policyTarget
	in      policyInput // optional
	service string
	out     printer
	stdout  io.Writer
}

func (o *explainOptions) complete(args []string) (err error) {
	if o.service, err = completeService(args); err != nil {
		return err
	}
	if o.in.file != "" {
		return o.in.read()
	}
	return o.target.complete()
}

func (o *explainOptions) validate() error {
	if o.in.file != "" && o.target.admin != "" {
		return errors.New("-f and --admin exclude each other: explain the file's documents, or a sidecar's policy in force")
	}
	return o.out.validate()
}

func (o *explainOptions) run(ctx context.Context) error {
	var (
		r   explainReport
		err error
	)
	switch {
	case o.in.file != "":
		r = o.fromFile()
	case o.target.api != nil:
		r, err = o.fromAdmin(ctx)
	default:
		r, err = o.fromKV(ctx)
	}
	if err != nil {
		return err
	}
	return o.out.print(o.stdout, r, func(w io.Writer) error { return renderExplain(w, r) })
}

// layers are the origins in merge order, for the sources.
func (o *explainOptions) layers() []string {
	if o.service == policy.Default {
		return []string{policy.FromDefault, policy.FromStar}
	}
	return []string{policy.FromDefault, policy.FromStar, o.service}
}

func (o *explainOptions) fromFile() explainReport {
	by := o.in.byService()
	r := explainReport{Explanation: policy.Explain(o.service, by)}
	for _, l := range o.layers() {
		s := explainSource{Origin: l}
		switch _, ok := by[l]; {
		case l == policy.FromDefault:
			s.From = "built-in defaults"
		case ok:
			s.From = "file:" + o.in.name
		default:
			s.Note = "none in " + o.in.name
		}
		r.Sources = append(r.Sources, s)
	}
	return r
}

func (o *explainOptions) fromKV(ctx context.Context) (explainReport, error) {
	by := map[string]policy.Policy{}
	var sources []explainSource
	for _, l := range o.layers() {
		s := explainSource{Origin: l}
		if l == policy.FromDefault {
			s.From = "built-in defaults"
			sources = append(sources, s)
			continue
		}
		e, err := o.target.kv.get(ctx, l)
		switch {
		case err != nil:
			return explainReport{}, err
		case e == nil:
			s.Note = fmt.Sprintf("none: no key %s in Consul KV at %s", policy.KVKey(l), o.target.kv.addr)
		case e.doc == nil:
			s.From = fmt.Sprintf("%s (index %d)", e.source(), e.index)
			s.Note = "INVALID, left out (sidecars reject it and keep what they had):\n" + e.err.Error()
		default:
			s.From = fmt.Sprintf("%s (index %d)", e.source(), e.index)
			by[l] = *e.doc
		}
		sources = append(sources, s)
	}
	return explainReport{Explanation: policy.Explain(o.service, by), Sources: sources}, nil
}

// fromAdmin explains the policy in force in a sidecar: it reports
// effective policies only, so origins are inferred.
func (o *explainOptions) fromAdmin(ctx context.Context) (explainReport, error) {
	ss, err := o.target.api.policies(ctx)
	if err != nil {
		return explainReport{}, err
	}
	var own, star *policy.Status
	for i := range ss {
		switch ss[i].Service {
		case o.service:
			own = &ss[i]
		case policy.Default:
			star = &ss[i]
		}
	}
	if own == nil {
		if own, err = o.target.api.policy(ctx, o.service); err != nil {
			return explainReport{}, err
		}
	}
	if o.service == policy.Default {
		star = own
	}
	effective := policy.Defaults()
	switch {
	case own != nil:
		effective = own.Effective
	case star != nil:
		effective = star.Effective
	}
	hasOwn := own != nil && own.Source != "default" && own.Source != ""
	var starPolicy *policy.Policy
	if star != nil {
		starPolicy = &star.Effective
	}
	r := explainReport{Explanation: policy.ExplainInForce(o.service, starPolicy, effective, hasOwn)}
	describe := func(l string, st *policy.Status) explainSource {
		s := explainSource{Origin: l}
		switch {
		case st == nil || st.Source == "default":
			s.Note = "none reported by the sidecar at " + o.target.admin
		default:
			s.From = st.Source
			if st.Version != "" {
				s.From += " (version " + st.Version + ")"
			}
		}
		if st != nil && st.LastRejection != nil {
			s.Note = strings.TrimPrefix(rejectionNote(l, st.LastRejection), l+": ")
		}
		return s
	}
	for _, l := range o.layers() {
		switch l {
		case policy.FromDefault:
			r.Sources = append(r.Sources, explainSource{Origin: l, From: "built-in defaults"})
		case policy.FromStar:
			r.Sources = append(r.Sources, describe(l, star))
		default:
			r.Sources = append(r.Sources, describe(l, own))
		}
	}
	return r, nil
}

// wrapWidth is where explain's prose wraps.
const wrapWidth = 100

// renderExplain writes the report for people, in the order an operator
// asks: what is in force and from where, what a request can cost, when the
// breaker and the outlier detector act, and what looks wrong.
func renderExplain(w io.Writer, r explainReport) error {
	e := r.Explanation
	var b bytes.Buffer

	fmt.Fprintf(&b, "Service:  %s\n", e.Service)
	b.WriteString("Sources (merged in this order; a later one wins field by field):\n")
	rows := [][]string{}
	for _, s := range r.Sources {
		text := s.From
		switch {
		case s.Note != "" && text != "":
			text += "; " + s.Note
		case s.Note != "":
			text = s.Note
		}
		rows = append(rows, []string{s.Origin, text})
	}
	b.WriteString(indent(keyValues(rows, ""), "  "))
	if e.OriginsInferred {
		b.WriteString(wrap("Origins are inferred: the sidecar reports effective policies only, so a value shows the first layer in which it differs from the one below.", "  ", "  "))
	}

	b.WriteString("\nEffective policy:\n")
	rows = rows[:0]
	for _, f := range e.Fields {
		rows = append(rows, []string{f.Path, f.Value, f.Origin})
	}
	var t bytes.Buffer
	_ = writeTable(&t, []string{"FIELD", "VALUE", "FROM"}, rows)
	b.WriteString(indent(t.String(), "  "))

	b.WriteString("\nPer request:\n")
	b.WriteString(indent(keyValues(requestFacts(e), ":"), "  "))

	fmt.Fprintf(&b, "\nLoad on %s, worst case (every attempt fails and is retried):\n", serviceWords(e.Service))
	b.WriteString(loadFacts(e))

	for _, section := range []struct {
		title string
		lines []string
	}{
		{"Time bounds, by kind of answer:", e.Bounds},
		{"Circuit breaker (one per service):", e.CircuitBreaker},
		{"Outlier detection:", e.OutlierDetection},
		{"Concurrency:", e.Concurrency},
		{"Load balancing:", e.LoadBalancer},
		{"Hedging:", e.Hedge},
	} {
		b.WriteString("\n" + section.title + "\n")
		for _, l := range section.lines {
			b.WriteString(wrap(l, "  - ", "    "))
		}
	}

	if len(e.Warnings) == 0 {
		b.WriteString("\nWarnings: none\n")
	} else {
		fmt.Fprintf(&b, "\nWarnings (%d):\n", len(e.Warnings))
		for _, wn := range e.Warnings {
			b.WriteString(wrap(wn.Message+" ["+wn.Code+"]", "  ! ", "    "))
		}
		b.WriteString("\n" + wrap("To see what this policy does when instances fail, before it ships: sidecar policy simulate "+
			"--scenario FILE -f POLICY (a failure model of the service; see sidecar policy simulate --help).", "", ""))
	}
	_, err := w.Write(b.Bytes())
	return err
}

// requestFacts are the per-request worst cases as label/value rows.
func requestFacts(e policy.Explanation) [][]string {
	p := e.Effective
	r := p.Retry
	T, P := p.Timeout.D(), r.PerTryTimeout.D()
	dur := policy.FormatDuration
	var rows [][]string
	switch {
	case e.MaxAttempts > 1:
		rows = append(rows,
			[]string{"Attempts", fmt.Sprintf("at most %d: the first try and %s", e.MaxAttempts, countOf(e.MaxAttempts-1, "retry", "retries"))},
			[]string{"Retried on", strings.Join(r.On, ", ")},
			[]string{"Retried methods", retriedMethods(r)},
			[]string{"Backoff", backoffWords(e)})
	case *r.Attempts == 1:
		rows = append(rows, []string{"Attempts", "1: retries are off (retry.attempts is 1)"})
	case len(r.On) == 0:
		rows = append(rows, []string{"Attempts", "1: retry.on is empty, nothing is retried"})
	default:
		rows = append(rows, []string{"Attempts", "1: the retry budget allows no retry"})
	}
	var longest string
	switch {
	case P == 0:
		longest = fmt.Sprintf("%s, the overall timeout: perTryTimeout is 0, so one attempt may take all of it", dur(T))
	case !e.LongestByTimeout:
		longest = fmt.Sprintf("%s: %d × %s per try + up to %s of backoff, inside the %s timeout",
			dur(e.Longest.D()), e.MaxAttempts, dur(P), dur(e.AttemptsTime.D()-time.Duration(e.MaxAttempts)*P), dur(T))
	default:
		longest = fmt.Sprintf("%s, the overall timeout: %d × %s per try + up to %s of backoff (%s) do not fit in it",
			dur(T), e.MaxAttempts, dur(P), dur(e.AttemptsTime.D()-time.Duration(e.MaxAttempts)*P), dur(e.AttemptsTime.D()))
	}
	if e.LongestWithRetryAfter.D() > e.Longest.D() {
		longest += fmt.Sprintf("; %s when Retry-After answers stretch every backoff", dur(e.LongestWithRetryAfter.D()))
	}
	longest += "; a gRPC caller's shorter grpc-timeout ends it sooner; a stream's body runs on while it sends (see the time bounds below)"
	rows = append(rows, []string{"Longest request", longest})
	connect := dur(e.ConnectTimeout.D()) + " per attempt"
	if e.ConnectTimeout != *p.ConnectTimeout {
		connect += fmt.Sprintf(" (connectTimeout %s, cut short by the shorter per-try or overall timeout)", dur(p.ConnectTimeout.D()))
	}
	rows = append(rows, []string{"Connect timeout", connect})
	return rows
}

// retriedMethods says which requests may be retried: the methods listed,
// any with an Idempotency-Key, and any after a connect failure if that is
// a condition.
func retriedMethods(r *policy.Retry) string {
	s := strings.Join(r.Methods, ", ") + "; any method with an Idempotency-Key header"
	if slices.Contains(r.On, "connect-failure") {
		s += ", or after a connect failure (nothing was sent)"
	}
	return s
}

// backoffWords lists the longest backoff before each retry, a run of equal
// ones at the end folded: "25ms, then 50ms, then 250ms × 5".
func backoffWords(e policy.Explanation) string {
	var parts []string
	bs := e.Backoffs
	for i := 0; i < len(bs); {
		j := i
		for j < len(bs) && bs[j] == bs[i] {
			j++
		}
		s := policy.FormatDuration(bs[i].D())
		if j-i > 1 {
			s += fmt.Sprintf(" × %d", j-i)
		}
		parts = append(parts, s)
		i = j
	}
	return fmt.Sprintf("before each retry at most %s (full jitter: anything from 0); a Retry-After answer can stretch one to %s",
		strings.Join(parts, ", then "), policy.FormatDuration(e.RetryAfterMax.D()))
}

// loadFacts says what retries cost the upstream: retry.attempts' bound,
// the budget's bound, and a table of both at a few rates.
func loadFacts(e policy.Explanation) string {
	if e.MaxAttempts == 1 {
		return wrap("No retries: the load is the request rate, 1×.", "  ", "  ")
	}
	bud := e.Effective.Retry.Budget
	ratio, floor := *bud.Ratio, *bud.MinPerSecond
	var caps []string
	if ratio > 0 {
		caps = append(caps, percentOf(ratio)+" of the requests of the last 10s")
	}
	if floor > 0 {
		caps = append(caps, fmt.Sprintf("%d per second", floor))
	}
	var b strings.Builder
	b.WriteString(indent(keyValues([][]string{
		{"retry.attempts", fmt.Sprintf("up to %d attempts per request: %s× the request rate", e.MaxAttempts, number(float64(e.MaxAttempts)))},
		{"retry.budget", fmt.Sprintf("retries at most %s: %s× the request rate + %d retries/s",
			strings.Join(caps, ", plus "), number(1+ratio), floor)},
	}, ":"), "  "))
	b.WriteString("  The lower bound holds:\n")
	rows := [][]string{}
	for _, l := range e.Load {
		by := "retry.attempts"
		if l.ByBudget {
			by = "retry.budget"
		}
		rows = append(rows, []string{number(l.RequestsPerSecond), number(l.RequestsPerSecond + l.RetriesPerSecond), number(l.Factor) + "×", by})
	}
	var t bytes.Buffer
	_ = writeTable(&t, []string{"REQUESTS/S", "ATTEMPTS/S", "PER REQUEST", "LIMITED BY"}, rows)
	b.WriteString(indent(t.String(), "    "))
	return b.String()
}

func percentOf(f float64) string { return number(f*100) + "%" }

// number writes f with at most two decimals, trailing zeros dropped.
func number(f float64) string {
	return strconv.FormatFloat(float64(int64(f*100+0.5))/100, 'f', -1, 64)
}

func serviceWords(s string) string {
	if s == policy.Default {
		return "a service"
	}
	return s
}

// keyValues aligns label/value rows: the label and sep padded, the value
// wrapped under itself.
func keyValues(rows [][]string, sep string) string {
	width := 0
	for _, r := range rows {
		width = max(width, len(r[0]+sep))
	}
	var b strings.Builder
	for _, r := range rows {
		label := r[0] + sep + strings.Repeat(" ", width-len(r[0]+sep)+2)
		b.WriteString(wrap(r[1], label, strings.Repeat(" ", len(label))))
	}
	return b.String()
}

// wrap writes text from first, continuing lines with rest, at wrapWidth;
// newlines in text are kept.
func wrap(text, first, rest string) string {
	var b strings.Builder
	prefix := first
	for _, para := range strings.Split(text, "\n") {
		line := prefix
		n := len([]rune(line))
		empty := true
		for _, word := range strings.Fields(para) {
			wl := len([]rune(word))
			if !empty && n+1+wl > wrapWidth {
				b.WriteString(line + "\n")
				line, n, empty = rest, len([]rune(rest)), true
			}
			if !empty {
				line += " "
				n++
			}
			line += word
			n += wl
			empty = false
		}
		b.WriteString(strings.TrimRight(line, " ") + "\n")
		prefix = rest
	}
	return b.String()
}

func indent(s, prefix string) string {
	lines := strings.Split(strings.TrimSuffix(s, "\n"), "\n")
	for i, l := range lines {
		lines[i] = strings.TrimRight(prefix+l, " ")
	}
	return strings.Join(lines, "\n") + "\n"
}

func newPolicyExplainCommand(target *policyTarget, stdin io.Reader, stdout io.Writer) *cobra.Command {
	o := &explainOptions{target: target, in: policyInput{stdin: stdin}, stdout: stdout}
	cmd := &cobra.Command{
		Use:   "explain SERVICE",
		Short: "Explain a service's effective policy: origins, worst cases, warnings",
		Long: `Explain the policy in force for SERVICE after defaults and merging: every value
with where it came from (the built-in default, the '*' policy, or the
service's own document), the worst-case attempts per request and the load
they put on the service against the retry budget, the longest a request can
take, the connect timeout, how each kind of answer is bounded in time (its
headers, an answer of known length, a stream: while it sends, until
streamIdleTimeout of silence), when the circuit breaker and the outlier
detector act, in words, and warnings about values that combine badly
(per-try timeouts that do not fit in the timeout, retries of non-idempotent
methods, ...).

The documents come from Consul KV, from -f FILE (offline: the file's '*' and
SERVICE documents only), or with --admin from a running sidecar (effective
policies only: origins are inferred).`,
		Example: `  sidecar policy explain user-service
  sidecar policy explain user-service -f policies.yaml
  sidecar policy explain '*' --admin 127.0.0.1:15000 -o json`,
		Args: cobra.ArbitraryArgs,
		RunE: runE(o),
	}
	o.in.addFlag(cmd.Flags(), "explain from this file instead of Consul KV")
	o.out.addFlag(cmd.Flags(), "table", "the report for people")
	return cmd
}
