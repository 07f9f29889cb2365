// Command benchreport turns the raw runs of bench/run.sh into the markdown
// results table and the SVG latency plot docs/benchmarks.md shows.
//
//	benchreport -runs runs.tsv -header header.md -capacity 21000 \
//	    -md bench/results.md -svg bench/latency.svg
//
// runs.tsv has a header line, then one tab-separated line per measured run:
//
//	phase contestant load round file cpu_s gen_cpu_s hwm_kb anon_kb
//
// phase is closed (wrk, load = connections), open (openloop at load
// requests per second), steady or overload (the overload sidecar at load
// requests per second), overload-queued, overload-adaptive or
// overload-defaults (its variants with a line, with an adaptive limit and
// on the default policy); file is wrk's output or openloop's JSON, relative to
// the runs file; cpu_s is the CPU time the contestant's processes used during
// the run, hwm_kb their peak RSS summed and anon_kb their private
// (anonymous) RSS at the end of the run (all empty for direct, which is the
// origin itself); gen_cpu_s is the load generator's CPU time.
//
// Medians are over rounds; "added" latency is the median over rounds of the
// contestant's figure minus direct's in the same round (rounds interleave
// the contestants, so a round's pair saw the same machine). The plot is the
// latency by percentile of every contestant at the open-loop rate, from
// each one's round with the median p99.
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "benchreport:", err)
		os.Exit(1)
	}
}

// Targets of the sidecar, most of them against HAProxy in the same run.
const (
	targetHAProxyShare   = 0.85  // throughput, closed loop
	targetCPUOverHAProxy = 1.5   // CPU per request, closed loop
	targetAddedP99OverHA = 0.050 // ms of added p99 at the open loop's rate beyond HAProxy's
	targetVCPUPer1000    = 0.085
	targetRSSMB          = 16
	targetPrivateRSSMB   = 5
	targetGoodputShare   = 0.9
	targetOverloadRSS    = 2.0
	targetTelemetryShare = 0.10 // tracing at 1% and metrics cost at most this share of throughput
)

func run() error {
	runsPath := flag.String("runs", "", "runs.tsv written by bench/run.sh")
	headerPath := flag.String("header", "", "markdown to put first (date, versions, settings)")
	capacity := flag.Float64("capacity", 0, "the sidecar capacity (req/s) the overload rates were derived from")
	limit := flag.String("limit", "", "how the overload sidecar was limited, for the report")
	queued := flag.String("queued", "", "the line of the queued overload sidecar, for the report")
	adaptive := flag.String("adaptive", "", "the limit of the adaptive overload sidecar, for the report")
	mdPath := flag.String("md", "", "markdown results file to write")
	svgPath := flag.String("svg", "", "SVG latency plot to write")
	svgRef := flag.String("svg-ref", "", "how the markdown links the plot (default: the -svg path relative to -md)")
	flag.Parse()
	if *runsPath == "" || *mdPath == "" {
		return errors.New("-runs and -md are required")
	}
	runs, err := readRuns(*runsPath)
	if err != nil {
		return err
	}
	var header []byte
	if *headerPath != "" {
		if header, err = os.ReadFile(*headerPath); err != nil {
			return err
		}
	}
	ref := *svgRef
	if ref == "" && *svgPath != "" {
		ref, err = filepath.Rel(filepath.Dir(*mdPath), *svgPath)
		if err != nil {
			ref = *svgPath
		}
	}
	rep := &report{runs: runs, capacity: *capacity, limit: *limit, queued: *queued, adaptive: *adaptive, svgRef: ref}
	md := rep.markdown(string(header))
	if err := writeFile(*mdPath, md); err != nil {
		return err
	}
	if *svgPath != "" {
		if err := writeFile(*svgPath, rep.svg()); err != nil {
			return err
		}
	}
	return nil
}

func writeFile(path, content string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// ---- input ------------------------------------------------------------------

type runRec struct {
	phase, contestant string
	load              float64
	round             int
	cpuS, genCPUS     float64 // NaN when not measured
	hwmKB             float64 // NaN when not measured
	anonKB            float64 // NaN when not measured

	// closed loop (wrk)
	rps, requests, p50, p99 float64
	// open loop (openloop JSON)
	open *openResult
}

type percentiles struct {
	N    int     `json:"n"`
	P50  float64 `json:"p50"`
	P90  float64 `json:"p90"`
	P99  float64 `json:"p99"`
	P999 float64 `json:"p999"`
	Max  float64 `json:"max"`
}

type openResult struct {
	Rate        float64        `json:"rate"`
	DurationSec float64        `json:"durationSeconds"`
	Conns       int            `json:"conns"`
	Scheduled   int64          `json:"scheduled"`
	Sent        int64          `json:"sent"`
	Answered    int64          `json:"answered"`
	OK          int64          `json:"ok"`
	Shed        int64          `json:"shed"`
	Errors      int64          `json:"errors"`
	ErrorKinds  map[string]int `json:"errorKinds"`
	Statuses    map[string]int `json:"statuses"`
	Reasons     map[string]int `json:"sidecarErrors"`
	GoodputRPS  float64        `json:"goodputRps"`
	AnsweredRPS float64        `json:"answeredRps"`
	Latency     percentiles    `json:"latencyUs"`
	LatencyOK   percentiles    `json:"latencyOkUs"`
	SendLag     percentiles    `json:"sendLagUs"`
	Curve       [][2]float64   `json:"curve"`
}

func readRuns(path string) ([]*runRec, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	dir := filepath.Dir(path)
	var out []*runRec
	sc := bufio.NewScanner(f)
	line := 0
	for sc.Scan() {
		line++
		if line == 1 || strings.TrimSpace(sc.Text()) == "" {
			continue // header
		}
		fs := strings.Split(sc.Text(), "\t")
		if len(fs) != 9 {
			return nil, fmt.Errorf("%s:%d: want 9 tab-separated fields, got %d", path, line, len(fs))
		}
		r := &runRec{phase: fs[0], contestant: fs[1], cpuS: num(fs[5]), genCPUS: num(fs[6]), hwmKB: num(fs[7]), anonKB: num(fs[8])}
		r.load, _ = strconv.ParseFloat(fs[2], 64)
		r.round, _ = strconv.Atoi(fs[3])
		file := fs[4]
		if !filepath.IsAbs(file) {
			file = filepath.Join(dir, file)
		}
		switch r.phase {
		case "closed":
			err = r.parseWrk(file)
		case "open", "steady", "overload", "overload-queued", "overload-adaptive", "overload-defaults":
			err = r.parseOpen(file)
		default:
			err = fmt.Errorf("unknown phase %q", r.phase)
		}
		if err != nil {
			return nil, fmt.Errorf("%s:%d: %w", path, line, err)
		}
		out = append(out, r)
	}
	return out, sc.Err()
}

func num(s string) float64 {
	v, err := strconv.ParseFloat(strings.TrimSpace(s), 64)
	if err != nil {
		return math.NaN()
	}
	return v
}

var (
	wrkRPS      = regexp.MustCompile(`(?m)^Requests/sec:\s+([0-9.]+)`)
	wrkRequests = regexp.MustCompile(`(?m)^\s*([0-9]+) requests in `)
	wrkPct      = regexp.MustCompile(`(?m)^\s+(50|99)%\s+([0-9.]+)(us|ms|s)\s*$`)
)

func (r *runRec) parseWrk(file string) error {
	b, err := os.ReadFile(file)
	if err != nil {
		return err
	}
	s := string(b)
	m := wrkRPS.FindStringSubmatch(s)
	n := wrkRequests.FindStringSubmatch(s)
	if m == nil || n == nil {
		return fmt.Errorf("%s: no Requests/sec or request count in wrk output", file)
	}
	r.rps, _ = strconv.ParseFloat(m[1], 64)
	r.requests, _ = strconv.ParseFloat(n[1], 64)
	for _, p := range wrkPct.FindAllStringSubmatch(s, -1) {
		v, _ := strconv.ParseFloat(p[2], 64)
		switch p[3] {
		case "us":
			v /= 1000
		case "s":
			v *= 1000
		}
		if p[1] == "50" {
			r.p50 = v
		} else {
			r.p99 = v
		}
	}
	return nil
}

func (r *runRec) parseOpen(file string) error {
	b, err := os.ReadFile(file)
	if err != nil {
		return err
	}
	r.open = &openResult{}
	if err := json.Unmarshal(b, r.open); err != nil {
		return fmt.Errorf("%s: %w", file, err)
	}
	return nil
}

// ---- figures ----------------------------------------------------------------

type report struct {
	runs     []*runRec
	capacity float64
	limit    string
	queued   string
	adaptive string
	svgRef   string
}

// order is the contestants in the order of the first run that has them.
func (rp *report) order(phase string) []string {
	var out []string
	for _, r := range rp.runs {
		if r.phase == phase && !slices.Contains(out, r.contestant) {
			out = append(out, r.contestant)
		}
	}
	return out
}

func (rp *report) loads(phase string) []float64 {
	var out []float64
	for _, r := range rp.runs {
		if r.phase == phase && !slices.Contains(out, r.load) {
			out = append(out, r.load)
		}
	}
	return out
}

func (rp *report) select_(phase, contestant string, load float64) []*runRec {
	var out []*runRec
	for _, r := range rp.runs {
		if r.phase == phase && r.contestant == contestant && r.load == load {
			out = append(out, r)
		}
	}
	return out
}

// median of the values (the mean of the middle two for an even count);
// NaN values are left out.
func median(v []float64) float64 {
	v = slices.DeleteFunc(slices.Clone(v), math.IsNaN)
	if len(v) == 0 {
		return math.NaN()
	}
	slices.Sort(v)
	if len(v)%2 == 1 {
		return v[len(v)/2]
	}
	return (v[len(v)/2-1] + v[len(v)/2]) / 2
}

func collect(rs []*runRec, f func(*runRec) float64) []float64 {
	out := make([]float64, len(rs))
	for i, r := range rs {
		out[i] = f(r)
	}
	return out
}

// medianRun is the run whose f is the (lower) median.
func medianRun(rs []*runRec, f func(*runRec) float64) *runRec {
	if len(rs) == 0 {
		return nil
	}
	s := slices.Clone(rs)
	slices.SortFunc(s, func(a, b *runRec) int { return cmpFloat(f(a), f(b)) })
	return s[(len(s)-1)/2]
}

func cmpFloat(a, b float64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// cpuPer1000 is CPU seconds per 1000 requests (= vCPU at 1000 req/s).
func cpuPer1000(cpuS, requests float64) float64 {
	if requests <= 0 {
		return math.NaN()
	}
	return cpuS / requests * 1000
}

func f0(v float64) string { return fmtf(v, 0) }
func f2(v float64) string { return fmtf(v, 2) }
func f3(v float64) string { return fmtf(v, 3) }
func fmtf(v float64, prec int) string {
	if math.IsNaN(v) {
		return "–"
	}
	return strconv.FormatFloat(v, 'f', prec, 64)
}

func mb(kb float64) string {
	if math.IsNaN(kb) {
		return "–"
	}
	return strconv.FormatFloat(kb/1024, 'f', 1, 64)
}

func signed(v float64, prec int) string {
	if math.IsNaN(v) {
		return "–"
	}
	s := strconv.FormatFloat(v, 'f', prec, 64)
	if v >= 0 {
		s = "+" + s
	}
	return s
}

// closedStat is one contestant at one connection count.
type closedStat struct {
	rps, p50, p99, cpu, hwm float64
	rounds                  []float64
}

func (rp *report) closed(contestant string, conns float64) (closedStat, bool) {
	rs := rp.select_("closed", contestant, conns)
	if len(rs) == 0 {
		return closedStat{}, false
	}
	med := medianRun(rs, func(r *runRec) float64 { return r.rps })
	return closedStat{
		rps: median(collect(rs, func(r *runRec) float64 { return r.rps })),
		p50: med.p50, p99: med.p99,
		cpu:    median(collect(rs, func(r *runRec) float64 { return cpuPer1000(r.cpuS, r.requests) })),
		hwm:    maxOf(collect(rs, func(r *runRec) float64 { return r.hwmKB })),
		rounds: collect(rs, func(r *runRec) float64 { return r.rps }),
	}, true
}

func maxOf(v []float64) float64 {
	m := math.NaN()
	for _, x := range v {
		if !math.IsNaN(x) && (math.IsNaN(m) || x > m) {
			m = x
		}
	}
	return m
}

// openStat is one contestant at the open-loop rate.
type openStat struct {
	p50, p99, p999                   float64 // ms, medians over rounds
	addP50, addP99, addP999          float64 // ms over direct, paired by round
	cpu, hwm, anon, errs, lagP99, ok float64
}

func (rp *report) open(contestant string, rate float64) (openStat, bool) {
	rs := rp.select_("open", contestant, rate)
	if len(rs) == 0 {
		return openStat{}, false
	}
	direct := map[int]*runRec{}
	for _, r := range rp.select_("open", "direct", rate) {
		direct[r.round] = r
	}
	ms := func(f func(*openResult) float64) func(*runRec) float64 {
		return func(r *runRec) float64 { return f(r.open) / 1000 }
	}
	added := func(f func(*openResult) float64) float64 {
		var d []float64
		for _, r := range rs {
			if dr, ok := direct[r.round]; ok {
				d = append(d, (f(r.open)-f(dr.open))/1000)
			}
		}
		return median(d)
	}
	p50 := func(o *openResult) float64 { return o.Latency.P50 }
	p99 := func(o *openResult) float64 { return o.Latency.P99 }
	p999 := func(o *openResult) float64 { return o.Latency.P999 }
	return openStat{
		p50: median(collect(rs, ms(p50))), p99: median(collect(rs, ms(p99))), p999: median(collect(rs, ms(p999))),
		addP50: added(p50), addP99: added(p99), addP999: added(p999),
		cpu:    median(collect(rs, func(r *runRec) float64 { return cpuPer1000(r.cpuS, float64(r.open.Answered)) })),
		hwm:    maxOf(collect(rs, func(r *runRec) float64 { return r.hwmKB })),
		anon:   maxOf(collect(rs, func(r *runRec) float64 { return r.anonKB })),
		errs:   sum(collect(rs, func(r *runRec) float64 { return float64(r.open.Errors + r.open.Answered - r.open.OK) })),
		lagP99: median(collect(rs, ms(func(o *openResult) float64 { return o.SendLag.P99 }))),
		ok:     sum(collect(rs, func(r *runRec) float64 { return float64(r.open.OK) })),
	}, true
}

func sum(v []float64) float64 {
	var s float64
	for _, x := range v {
		if !math.IsNaN(x) {
			s += x
		}
	}
	return s
}

// overloadStat is the overload sidecar at a rate.
type overloadStat struct {
	r   *runRec
	hwm float64
}

// defaultsLabel says what the default policy does with overload.
const defaultsLabel = "maxInFlight 1024, a line of 1024 waiting up to 1s"

func (rp *report) overloadRun(phase string) (overloadStat, bool) {
	for _, r := range rp.runs {
		if r.phase == phase {
			return overloadStat{r: r, hwm: r.hwmKB}, true
		}
	}
	return overloadStat{}, false
}

// ---- markdown -----------------------------------------------------------------

func yesNo(ok bool) string {
	if ok {
		return "**met**"
	}
	return "**not met**"
}

// addedVerdict judges a latency added over direct against target. A
// proxy cannot take latency away: a negative figure means the direct
// rounds were disturbed (a neighbour on the shared CPUs), and the run says
// nothing either way.
func addedVerdict(added, target float64) string {
	if added < 0 {
		return "**inconclusive**: direct's tail was above the proxy's, the run was disturbed"
	}
	return yesNo(added <= target)
}

func (rp *report) markdown(header string) string {
	var b strings.Builder
	b.WriteString(strings.TrimRight(header, "\n"))
	b.WriteString("\n\n")
	rp.targets(&b)
	rp.closedTable(&b)
	rp.openTable(&b)
	rp.overloadTable(&b)
	return b.String()
}

func (rp *report) targets(b *strings.Builder) {
	fmt.Fprintf(b, "## Targets (the sidecar: default policy, request metrics, tracing at 1%% to Jaeger)\n\n")
	fmt.Fprintf(b, "| target | measured | |\n|---|---|---|\n")
	loads := rp.loads("closed")
	for _, c := range loads {
		s, ok1 := rp.closed("sidecar", c)
		h, ok2 := rp.closed("haproxy", c)
		if ok1 && ok2 {
			r := s.rps / h.rps
			fmt.Fprintf(b, "| throughput ≥ %s× HAProxy's, %s connections | %s req/s vs %s: %s× | %s |\n",
				f2(targetHAProxyShare), f0(c), f0(s.rps), f0(h.rps), f2(r), yesNo(r >= targetHAProxyShare))
		}
	}
	for _, c := range loads {
		s, ok1 := rp.closed("sidecar", c)
		h, ok2 := rp.closed("haproxy", c)
		if ok1 && ok2 && h.cpu > 0 {
			r := s.cpu / h.cpu
			fmt.Fprintf(b, "| CPU per request ≤ %s× HAProxy's, %s connections | %s vs %s us: %s× | %s |\n",
				fmtf(targetCPUOverHAProxy, 1), f0(c), fmtf(s.cpu*1000, 1), fmtf(h.cpu*1000, 1), f2(r), yesNo(r <= targetCPUOverHAProxy))
		}
	}
	for _, c := range loads {
		s, ok1 := rp.closed("sidecar", c)
		bare, ok2 := rp.closed("sidecar-bare", c)
		if ok1 && ok2 {
			cost := 1 - s.rps/bare.rps
			fmt.Fprintf(b, "| tracing at 1%% + request metrics cost ≤ %.0f%% of throughput (sidecar vs sidecar-bare), %s connections | %s%% | %s |\n",
				targetTelemetryShare*100, f0(c), fmtf(cost*100, 1), yesNo(cost <= targetTelemetryShare))
		}
	}
	for _, rate := range rp.loads("open") {
		o, ok := rp.open("sidecar", rate)
		if !ok {
			continue
		}
		if h, ok := rp.open("haproxy", rate); ok {
			limit := max(h.addP99, 0) + targetAddedP99OverHA
			fmt.Fprintf(b, "| added p99 at %s req/s ≤ HAProxy's + %.0f us | %s ms (HAProxy %s ms) | %s |\n",
				f0(rate), targetAddedP99OverHA*1000, f3(o.addP99), f3(h.addP99), addedVerdict(o.addP99, limit))
		}
		fmt.Fprintf(b, "| CPU ≤ %s vCPU per 1000 req/s at %s req/s | %s vCPU | %s |\n", f3(targetVCPUPer1000), f0(rate), f3(o.cpu), yesNo(o.cpu <= targetVCPUPer1000))
		fmt.Fprintf(b, "| peak RSS ≤ %d MB at %s req/s | %s MB | %s |\n", targetRSSMB, f0(rate), mb(o.hwm), yesNo(o.hwm/1024 <= targetRSSMB))
		fmt.Fprintf(b, "| private RSS ≤ %d MB at %s req/s (heap and stacks, without the executable's pages) | %s MB | %s |\n",
			targetPrivateRSSMB, f0(rate), mb(o.anon), yesNo(o.anon/1024 <= targetPrivateRSSMB))
	}
	if ov, ok := rp.overloadRun("overload"); ok && rp.capacity > 0 {
		goodput := func(run overloadStat, label string) {
			share := run.r.open.GoodputRPS / rp.capacity
			fmt.Fprintf(b, "| goodput at 2× overload ≥ %.0f%% of capacity%s | %s req/s of %s: %s%% | %s |\n",
				targetGoodputShare*100, label, f0(run.r.open.GoodputRPS), f0(rp.capacity), fmtf(share*100, 0), yesNo(share >= targetGoodputShare))
		}
		goodput(ov, "")
		if q, ok := rp.overloadRun("overload-queued"); ok {
			goodput(q, ", with a line ("+rp.queued+")")
		}
		if a, ok := rp.overloadRun("overload-adaptive"); ok {
			goodput(a, ", adaptive ("+rp.adaptive+")")
		}
		if d, ok := rp.overloadRun("overload-defaults"); ok {
			goodput(d, ", default policy ("+defaultsLabel+")")
		}
		if st, ok := rp.overloadRun("steady"); ok {
			r := ov.hwm / st.hwm
			fmt.Fprintf(b, "| peak RSS at 2× overload ≤ %.0f× steady state | %s MB vs %s MB: %s× | %s |\n",
				targetOverloadRSS, mb(ov.hwm), mb(st.hwm), f2(r), yesNo(r <= targetOverloadRSS))
		}
	}
	b.WriteString("\n")
}

func (rp *report) closedTable(b *strings.Builder) {
	loads := rp.loads("closed")
	if len(loads) == 0 {
		return
	}
	fmt.Fprintf(b, "## Closed loop (wrk, keep-alive connections)\n\n")
	fmt.Fprintf(b, "Median req/s over the rounds; latency of the median round; CPU time of the proxy's processes per 1000 requests "+
		"(= vCPU at 1000 req/s) and their peak RSS (VmHWM, summed over nginx's master and workers).\n\n")
	fmt.Fprintf(b, "| contestant | connections | req/s | × direct | × HAProxy | p50 (ms) | p99 (ms) | CPU s / 1000 req | peak RSS (MB) | req/s per round |\n")
	fmt.Fprintf(b, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
	for _, c := range loads {
		d, _ := rp.closed("direct", c)
		h, _ := rp.closed("haproxy", c)
		for _, name := range rp.order("closed") {
			s, ok := rp.closed(name, c)
			if !ok {
				continue
			}
			var rounds []string
			for _, v := range s.rounds {
				rounds = append(rounds, f0(v))
			}
			fmt.Fprintf(b, "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", name, f0(c), f0(s.rps),
				f2(s.rps/d.rps), f2(s.rps/h.rps), f3(s.p50), f3(s.p99), f3(s.cpu), mb(s.hwm), strings.Join(rounds, ", "))
		}
	}
	b.WriteString("\n")
}

func (rp *report) openTable(b *strings.Builder) {
	for _, rate := range rp.loads("open") {
		fmt.Fprintf(b, "## Open loop at %s req/s (openloop: latency from each request's scheduled send time)\n\n", f0(rate))
		fmt.Fprintf(b, "Medians over the rounds; \"added\" is over direct, paired by round. CPU s per 1000 requests is the vCPU the proxy used at this rate. "+
			"Peak RSS is VmHWM; private RSS is RssAnon at the end of the run (heap, stacks: what each process costs on its own, "+
			"without the executable's pages that every process of the same binary shares); both are the largest over the rounds.\n\n")
		if rp.svgRef != "" {
			fmt.Fprintf(b, "![latency by percentile at %s req/s](%s)\n\n", f0(rate), rp.svgRef)
		}
		fmt.Fprintf(b, "| contestant | p50 (ms) | p99 (ms) | p99.9 (ms) | added p50 | added p99 | added p99.9 | CPU s / 1000 req | peak RSS (MB) | private RSS (MB) | non-2xx + errors |\n")
		fmt.Fprintf(b, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
		for _, name := range rp.order("open") {
			o, ok := rp.open(name, rate)
			if !ok {
				continue
			}
			add := func(v float64) string {
				if name == "direct" {
					return "–"
				}
				return signed(v, 3)
			}
			fmt.Fprintf(b, "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", name, f3(o.p50), f3(o.p99), f3(o.p999),
				add(o.addP50), add(o.addP99), add(o.addP999), f3(o.cpu), mb(o.hwm), mb(o.anon), f0(o.errs))
		}
		b.WriteString("\n")
	}
}

func (rp *report) overloadTable(b *strings.Builder) {
	ov, ok := rp.overloadRun("overload")
	if !ok {
		return
	}
	st, _ := rp.overloadRun("steady")
	o := ov.r.open
	fmt.Fprintf(b, "## Overload (openloop at twice the sidecar's capacity)\n\n")
	fmt.Fprintf(b, "Capacity: the sidecar's median closed-loop req/s at the highest connection count above, %s req/s. "+
		"The overload sidecar is the sidecar above with %s; openloop uses %d connections. "+
		"Goodput is 2xx answers per second of the whole run: when the sidecar fell behind, the run lasted past its schedule (send lag).\n\n", f0(rp.capacity), rp.limit, o.Conns)
	fmt.Fprintf(b, "| run | offered req/s | sent | 2xx/s (goodput) | of capacity | shed (503 overloaded) | other non-2xx + errors | p99 of 2xx (ms) | send lag p99 (ms) | sidecar CPU s | openloop CPU s | peak RSS (MB) |\n")
	fmt.Fprintf(b, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	row := func(name string, s overloadStat) {
		o := s.r.open
		other := o.Errors + o.Answered - o.OK - o.Shed
		fmt.Fprintf(b, "| %s | %s | %d | %s | %s%% | %s%% | %d | %s | %s | %s | %s | %s |\n", name, f0(o.Rate), o.Sent, f0(o.GoodputRPS),
			fmtf(o.GoodputRPS/rp.capacity*100, 0), fmtf(float64(o.Shed)/float64(max(o.Sent, 1))*100, 1), other,
			f3(o.LatencyOK.P99/1000), f3(o.SendLag.P99/1000), f2(s.r.cpuS), f2(s.r.genCPUS), mb(s.hwm))
	}
	if st.r != nil {
		row("steady state (½ capacity)", st)
	}
	row("2× capacity", ov)
	if q, ok := rp.overloadRun("overload-queued"); ok {
		row("2× capacity, with a line ("+rp.queued+")", q)
	}
	if a, ok := rp.overloadRun("overload-adaptive"); ok {
		row("2× capacity, adaptive ("+rp.adaptive+")", a)
	}
	if d, ok := rp.overloadRun("overload-defaults"); ok {
		row("2× capacity, default policy ("+defaultsLabel+")", d)
	}
	if len(o.ErrorKinds) > 0 || len(o.Statuses) > 0 {
		fmt.Fprintf(b, "\nAnswers at 2× capacity by status: %s", kv(o.Statuses))
		if len(o.Reasons) > 0 {
			fmt.Fprintf(b, "; x-sidecar-error: %s", kv(o.Reasons))
		}
		if len(o.ErrorKinds) > 0 {
			fmt.Fprintf(b, "; errors: %s", kv(o.ErrorKinds))
		}
		b.WriteString(".\n")
	}
	b.WriteString("\n")
}

func kv(m map[string]int) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var parts []string
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s %d", k, m[k]))
	}
	return strings.Join(parts, ", ")
}
