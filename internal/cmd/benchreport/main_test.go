package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// A runs file with every phase bench/run.sh writes turns into a report with
// every table and target, figures computed from the raw runs.
func TestReportFromEveryPhase(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) string {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		return name
	}
	wrk := func(rps float64) string {
		return fmt.Sprintf("  Latency Distribution\n     50%%  500.00us\n     99%%    2.50ms\n  %d requests in 10.00s, 1.00MB read\nRequests/sec: %.2f\n",
			int(rps*10), rps)
	}
	open := func(p99us float64, ok, shed int, elapsed float64) string {
		return fmt.Sprintf(`{"rate": 1000, "durationSeconds": 10, "elapsedSeconds": %g, "conns": 64, "scheduled": %d, "sent": %d,
			"answered": %d, "ok": %d, "shed": %d, "errors": 0, "statuses": {"200": %d}, "goodputRps": %g,
			"latencyUs": {"n": 1, "p50": 100, "p99": %g, "p999": 900}, "latencyOkUs": {"n": 1, "p99": %g},
			"sendLagUs": {"n": 1, "p99": 10}, "curve": [[50, 100], [99, %g]]}`,
			elapsed, ok+shed, ok+shed, ok+shed, ok, shed, ok, float64(ok)/elapsed, p99us, p99us, p99us)
	}
	var rows []string
	add := func(phase, who string, load float64, file string, cpu, hwm, anon string) {
		rows = append(rows, strings.Join([]string{phase, who, fmt.Sprint(load), "1", file, cpu, "1.000", hwm, anon}, "\t"))
	}
	for who, rps := range map[string]float64{"direct": 60000, "sidecar": 20000, "haproxy": 40000} {
		cpu, hwm, anon := "0.800", "20480", "8192"
		if who == "direct" {
			cpu, hwm, anon = "", "", ""
		}
		add("closed", who, 64, write("c-"+who, wrk(rps)), cpu, hwm, anon)
	}
	add("open", "direct", 1000, write("o-direct", open(300, 10000, 0, 10)), "", "", "")
	add("open", "sidecar", 1000, write("o-sidecar", open(600, 10000, 0, 10)), "0.900", "22528", "7168")
	add("open", "haproxy", 1000, write("o-haproxy", open(400, 10000, 0, 10)), "0.500", "15360", "2048")
	add("steady", "sidecar-overload", 10000, write("steady", open(900, 100000, 0, 10)), "5.000", "25600", "9216")
	add("overload", "sidecar-overload", 40000, write("over", open(900, 70000, 330000, 10)), "9.000", "30720", "10240")
	add("overload-queued", "sidecar-queued", 40000, write("queued", open(900, 400000, 0, 20)), "9.000", "30720", "10240")
	add("overload-adaptive", "sidecar-adaptive", 40000, write("adaptive", open(700, 190000, 210000, 10)), "9.000", "30720", "10240")
	add("overload-defaults", "sidecar-defaults", 40000, write("defaults", open(900, 360000, 0, 20)), "9.000", "30720", "10240")
	runs := write("runs.tsv", "phase\tcontestant\tload\tround\tfile\tcpu_s\tgen_cpu_s\thwm_kb\tanon_kb\n"+strings.Join(rows, "\n")+"\n")

	rs, err := readRuns(filepath.Join(dir, runs))
	if err != nil {
		t.Fatal(err)
	}
	rep := &report{runs: rs, capacity: 20000, limit: "concurrency.maxInFlight: 32", queued: "maxQueued: 32", adaptive: "concurrency.adaptive: true", svgRef: "latency.svg"}
	md := rep.markdown("# header\n")
	for _, want := range []string{
		"| throughput ≥ 0.85× HAProxy's, 64 connections | 20000 req/s vs 40000: 0.50× | **not met** |",
		"| CPU per request ≤ 1.5× HAProxy's, 64 connections | 4.0 vs 2.0 us: 2.00× | **not met** |",
		"| added p99 at 1000 req/s ≤ HAProxy's + 50 us | 0.300 ms (HAProxy 0.100 ms) | **not met** |",
		"| CPU ≤ 0.085 vCPU per 1000 req/s at 1000 req/s | 0.090 vCPU | **not met** |",
		"| peak RSS ≤ 16 MB at 1000 req/s | 22.0 MB | **not met** |",
		"| private RSS ≤ 5 MB at 1000 req/s (heap and stacks, without the executable's pages) | 7.0 MB | **not met** |",
		"| goodput at 2× overload ≥ 90% of capacity | 7000 req/s of 20000: 35% | **not met** |",
		"| goodput at 2× overload ≥ 90% of capacity, with a line (maxQueued: 32) | 20000 req/s of 20000: 100% | **met** |",
		"| 2× capacity, with a line (maxQueued: 32) | 1000 | 400000 | 20000 | 100% | 0.0% |",
		"| goodput at 2× overload ≥ 90% of capacity, adaptive (concurrency.adaptive: true) | 19000 req/s of 20000: 95% | **met** |",
		"| 2× capacity, adaptive (concurrency.adaptive: true) | 1000 | 400000 | 19000 | 95% | 52.5% |",
		"| goodput at 2× overload ≥ 90% of capacity, default policy (maxInFlight 1024, a line of 1024 waiting up to 1s) | 18000 req/s of 20000: 90% | **met** |",
		"| 2× capacity, default policy (maxInFlight 1024, a line of 1024 waiting up to 1s) | 1000 | 360000 | 18000 | 90% | 0.0% |",
		"![latency by percentile at 1000 req/s](latency.svg)",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("report lacks %q:\n%s", want, md)
		}
	}
	if svg := rep.svg(); !strings.Contains(svg, "<svg") || !strings.Contains(svg, "sidecar") {
		t.Errorf("plot is not an SVG naming the contestants:\n%s", svg)
	}
}

// Added latency below zero is a disturbed run, never a target met.
func TestAddedVerdict(t *testing.T) {
	for _, tc := range []struct {
		added float64
		want  string
	}{{0.3, "**met**"}, {0.5, "**met**"}, {0.6, "**not met**"}, {0, "**met**"}, {-2.9, "**inconclusive**"}} {
		if got := addedVerdict(tc.added, 0.5); !strings.HasPrefix(got, tc.want) {
			t.Errorf("addedVerdict(%v, 0.5) = %q, want %s", tc.added, got, tc.want)
		}
	}
}
