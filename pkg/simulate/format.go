package simulate

import (
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"unicode"
)

// WriteTable writes results side by side, one column per policy, for
// people: a line naming the scenario, then one row per figure (requests,
// success rate, latency percentiles, attempts, retries and requests shed
// by reason, hedges, breaker, ejections, recovery, duplicates), aligned as
// the CLI's other tables are. A retries or shed row is there for each
// reason any result has; a recovery of "-" means the scenario has no
// failure window that ends before the run does.
func WriteTable(w io.Writer, s *Scenario, results []Result) error {
	var b strings.Builder
	if s != nil {
		fmt.Fprintf(&b, "%s\n\n", scenarioTitle(s))
	}
	tw := tabwriter.NewWriter(&b, 0, 8, 3, ' ', 0)
	row := func(label string, cell func(r *Result) string) {
		cells := make([]string, 0, len(results)+1)
		cells = append(cells, label)
		for i := range results {
			cells = append(cells, cell(&results[i]))
		}
		fmt.Fprintln(tw, strings.Join(cells, "\t"))
	}
	count := func(n func(r *Result) int) func(r *Result) string {
		return func(r *Result) string { return strconv.Itoa(n(r)) }
	}
	fixed := func(decimals int, v func(r *Result) float64) func(r *Result) string {
		return func(r *Result) string { return strconv.FormatFloat(v(r), 'f', decimals, 64) }
	}

	row("POLICY", func(r *Result) string { return tableCell(r.Policy) })
	row("requests", count(func(r *Result) int { return r.Requests }))
	row("success rate", func(r *Result) string { return strconv.FormatFloat(100*r.SuccessRate, 'f', 2, 64) + "%" })
	row("p50 (ms)", fixed(1, func(r *Result) float64 { return r.P50Ms }))
	row("p99 (ms)", fixed(1, func(r *Result) float64 { return r.P99Ms }))
	row("p99.9 (ms)", fixed(1, func(r *Result) float64 { return r.P999Ms }))
	row("attempts per request", fixed(2, func(r *Result) float64 { return r.AttemptsPerRequest }))
	row("retries", count(func(r *Result) int { return tableSum(r.Retries) }))
	for _, reason := range tableReasons(results, func(r *Result) map[string]int { return r.Retries }) {
		row("retries ("+tableCell(reason)+")", count(func(r *Result) int { return r.Retries[reason] }))
	}
	row("budget exhausted", count(func(r *Result) int { return r.BudgetExhausted }))
	row("hedges sent", count(func(r *Result) int { return r.Hedges }))
	row("hedges won", count(func(r *Result) int { return r.HedgesWon }))
	row("breaker openings", count(func(r *Result) int { return r.BreakerOpenings }))
	row("breaker open (s)", fixed(1, func(r *Result) float64 { return r.BreakerOpenSeconds }))
	row("ejections", count(func(r *Result) int { return r.Ejections }))
	row("shed", count(func(r *Result) int { return tableSum(r.Shed) }))
	for _, reason := range tableReasons(results, func(r *Result) map[string]int { return r.Shed }) {
		row("shed ("+tableCell(reason)+")", count(func(r *Result) int { return r.Shed[reason] }))
	}
	row("recovery after fault (s)", func(r *Result) string {
		switch {
		case r.RecoverySeconds == nil:
			return "-"
		case *r.RecoverySeconds < 0:
			return "never"
		}
		return strconv.FormatFloat(*r.RecoverySeconds, 'f', 1, 64)
	})
	row("duplicates", count(func(r *Result) int { return r.Duplicates }))
	if err := tw.Flush(); err != nil {
		return err
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// scenarioTitle names a scenario in a line: its service, load and
// instances.
func scenarioTitle(s *Scenario) string {
	n := 0
	for _, g := range s.Instances {
		n += g.Count
	}
	unit := "instances"
	if n == 1 {
		unit = "instance"
	}
	return fmt.Sprintf("%s: %s requests/s for %v, %d %s", s.Service, strconv.FormatFloat(s.Rate, 'f', -1, 64), s.Duration, n, unit)
}

// tableReasons lists the reasons (keys) that any result's counts have,
// sorted.
func tableReasons(results []Result, counts func(r *Result) map[string]int) []string {
	var out []string
	for i := range results {
		for reason := range counts(&results[i]) {
			if !slices.Contains(out, reason) {
				out = append(out, reason)
			}
		}
	}
	slices.Sort(out)
	return out
}

func tableSum(m map[string]int) int {
	n := 0
	for _, v := range m {
		n += v
	}
	return n
}

// tableCell makes s one cell of an aligned table: control characters (a
// tab would start a new column, a newline a new row) become spaces.
func tableCell(s string) string {
	return strings.Map(func(r rune) rune {
		if unicode.IsControl(r) {
			return ' '
		}
		return r
	}, s)
}
