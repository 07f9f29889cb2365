package simulate

import (
	"bytes"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"math"
	"strconv"
	"strings"
	"time"
)

// The plot's geometry, in SVG user units (pixels).
const (
	plotWidth      = 960
	plotLeft       = 70  // the y axis' labels are left of it
	plotRight      = 20  // margin right of the panels
	plotTop        = 72  // the title and the first panel's are above it
	plotPanel      = 220 // height of each panel
	plotGap        = 60  // between the panels: the lower panel's title, the upper's x labels
	plotLegendLine = 22  // height of a line of the legend
	plotCharWidth  = 7   // a character's width at the legend's size, roughly
)

// plotColors are the policies' colours, in order (Grafana's palette).
var plotColors = []string{"#3274D9", "#56A64B", "#FF780A", "#E02F44", "#A352CC", "#F2CC0C", "#8AB8FF", "#96D98D"}

// Plot writes results as a self-contained SVG image (no script, nothing
// fetched): the success rate (0 to 100%) and the p99 latency (ms, on a log
// scale) of each second of the run, one panel above the other, one line
// per policy in the legend's colours, the scenario's failure windows
// shaded in both. A second without requests has no point: the line joins
// its neighbours. s must not be nil.
func Plot(w io.Writer, s *Scenario, results []Result) error {
	if s == nil {
		return errors.New("simulate: Plot needs the scenario")
	}
	// The x axis covers the run, and any second a timeline has past it
	// (requests still answering when the load stopped).
	seconds := int(math.Ceil(s.Duration.D().Seconds()))
	for _, r := range results {
		for _, sec := range r.Timeline {
			seconds = max(seconds, sec.T+1)
		}
	}
	seconds = max(seconds, 1)

	innerW := float64(plotWidth - plotLeft - plotRight)
	x := func(t float64) float64 { return plotLeft + innerW*t/float64(seconds) }
	legend := plotLegend(results, len(plotFaultWindows(s)) > 0, innerW)
	top1 := float64(plotTop)
	top2 := top1 + plotPanel + plotGap
	legendTop := top2 + plotPanel + 45
	height := int(legendTop) + len(legend)*plotLegendLine + 10

	var b bytes.Buffer
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="12" fill="#464C54">`+"\n",
		plotWidth, height, plotWidth, height)
	fmt.Fprintf(&b, `<rect width="%d" height="%d" fill="#FFFFFF"/>`+"\n", plotWidth, height)
	fmt.Fprintf(&b, `<text x="%d" y="28" font-size="16" font-weight="bold">%s</text>`+"\n", plotLeft, plotEscape(scenarioTitle(s)))

	// Panel 1: success rate, linear 0-100%.
	rate := func(v float64) float64 { return top1 + plotPanel*(1-v/100) }
	plotPanelFrame(&b, top1, "Success rate (%)", s, seconds, x)
	for _, v := range []float64{0, 25, 50, 75, 100} {
		plotYTick(&b, rate(v), strconv.Itoa(int(v))+"%")
	}
	// Panel 2: p99 latency, log scale over whole decades.
	lo, hi := plotLatencyRange(results)
	lat := func(ms float64) float64 {
		ms = min(max(ms, lo), hi)
		return top2 + plotPanel*(1-math.Log10(ms/lo)/math.Log10(hi/lo))
	}
	plotPanelFrame(&b, top2, "p99 latency (ms, log scale)", s, seconds, x)
	for _, ms := range plotLatencyTicks(lo, hi) {
		plotYTick(&b, lat(ms), plotMsLabel(ms))
	}

	for i, r := range results {
		color := plotColors[i%len(plotColors)]
		var ok, p99 []byte
		for _, sec := range r.Timeline {
			if sec.Requests == 0 {
				continue
			}
			t := float64(sec.T) + 0.5
			ok = plotAppendPoint(ok, x(t), rate(100*float64(sec.Succeeded)/float64(sec.Requests)))
			if sec.P99Ms > 0 {
				p99 = plotAppendPoint(p99, x(t), lat(sec.P99Ms))
			}
		}
		for _, points := range [][]byte{ok, p99} {
			fmt.Fprintf(&b, `<polyline class="policy" fill="none" stroke="%s" stroke-width="1.5" stroke-linejoin="round" points="%s"><title>%s</title></polyline>`+"\n",
				color, bytes.TrimSpace(points), plotEscape(r.Policy))
		}
	}

	// The legend: the policies, then what the shading means.
	for line, entries := range legend {
		y := legendTop + float64(line)*plotLegendLine
		for _, e := range entries {
			if e.policy < 0 {
				fmt.Fprintf(&b, `<rect x="%.1f" y="%.1f" width="14" height="10" fill="#E02F44" fill-opacity="0.12"/>`+"\n", e.x, y-9)
			} else {
				fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="%s" stroke-width="3"/>`+"\n",
					e.x, y-4, e.x+14, y-4, plotColors[e.policy%len(plotColors)])
			}
			fmt.Fprintf(&b, `<text x="%.1f" y="%.1f">%s</text>`+"\n", e.x+20, y, plotEscape(e.label))
		}
	}
	b.WriteString("</svg>\n")
	_, err := w.Write(b.Bytes())
	return err
}

// plotPanelFrame draws a panel's frame, title, x axis (ticks labelled in
// seconds of the run) and the scenario's failure windows, shaded.
func plotPanelFrame(b *bytes.Buffer, top float64, title string, s *Scenario, seconds int, x func(float64) float64) {
	right := float64(plotWidth - plotRight)
	fmt.Fprintf(b, `<text x="%d" y="%.1f" font-weight="bold">%s</text>`+"\n", plotLeft, top-10, plotEscape(title))
	for _, win := range plotFaultWindows(s) {
		x1, x2 := x(win[0].Seconds()), x(min(win[1].Seconds(), float64(seconds)))
		fmt.Fprintf(b, `<rect class="fault" x="%.1f" y="%.1f" width="%.1f" height="%d" fill="#E02F44" fill-opacity="0.12"/>`+"\n",
			x1, top, max(x2-x1, 0), plotPanel)
	}
	step := plotTimeStep(seconds)
	for t := 0; t <= seconds; t += step {
		fmt.Fprintf(b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#E9E9E9"/>`+"\n", x(float64(t)), top, x(float64(t)), top+plotPanel)
		fmt.Fprintf(b, `<text x="%.1f" y="%.1f" text-anchor="middle">%s</text>`+"\n", x(float64(t)), top+plotPanel+16,
			plotSecondsLabel(t))
	}
	fmt.Fprintf(b, `<rect x="%d" y="%.1f" width="%.1f" height="%d" fill="none" stroke="#C7D0D9"/>`+"\n",
		plotLeft, top, right-plotLeft, plotPanel)
}

// plotSecondsLabel writes a time of the run as a tick label: 0s, 45s, 1m,
// 2m30s, 1h.
func plotSecondsLabel(t int) string {
	l := (time.Duration(t) * time.Second).String()
	if strings.HasSuffix(l, "m0s") {
		l = strings.TrimSuffix(l, "0s")
	}
	if strings.HasSuffix(l, "h0m") {
		l = strings.TrimSuffix(l, "0m")
	}
	return l
}

// plotYTick draws a horizontal grid line at y, labelled left of the axis.
func plotYTick(b *bytes.Buffer, y float64, label string) {
	fmt.Fprintf(b, `<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#E9E9E9"/>`+"\n", plotLeft, y, plotWidth-plotRight, y)
	fmt.Fprintf(b, `<text x="%d" y="%.1f" text-anchor="end">%s</text>`+"\n", plotLeft-6, y+4, plotEscape(label))
}

// plotFaultWindows are the scenario's failure windows, [from, to), each
// once: those of the instance groups that fail some requests.
func plotFaultWindows(s *Scenario) [][2]time.Duration {
	var out [][2]time.Duration
	for _, g := range s.Instances {
		if g.FailureRate <= 0 {
			continue
		}
		win := [2]time.Duration{g.From.D(), g.To.D()}
		if g.To == 0 {
			win[1] = s.Duration.D()
		}
		seen := false
		for _, o := range out {
			seen = seen || o == win
		}
		if !seen && win[1] > win[0] {
			out = append(out, win)
		}
	}
	return out
}

// plotTimeStep is the x axis' tick step in seconds: at most 12 ticks.
func plotTimeStep(seconds int) int {
	for _, step := range []int{1, 2, 5, 10, 15, 30, 60, 120, 300, 600} {
		if seconds/step <= 12 {
			return step
		}
	}
	return 900
}

// plotLatencyRange bounds the latency axis by whole decades of
// milliseconds around every p99 of the timelines: 1ms to 1s without one.
func plotLatencyRange(results []Result) (lo, hi float64) {
	lo, hi = math.Inf(1), 0
	for _, r := range results {
		for _, sec := range r.Timeline {
			if sec.Requests > 0 && sec.P99Ms > 0 {
				lo, hi = min(lo, sec.P99Ms), max(hi, sec.P99Ms)
			}
		}
	}
	if hi == 0 {
		return 1, 1000
	}
	lo = math.Pow(10, math.Floor(math.Log10(max(lo, 0.001))))
	hi = math.Pow(10, math.Ceil(math.Log10(hi)))
	if hi <= lo {
		hi = lo * 10
	}
	return lo, hi
}

// plotLatencyTicks are the latency axis' ticks: each decade, and 2 and 5
// times it when the axis spans at most two decades.
func plotLatencyTicks(lo, hi float64) []float64 {
	var ticks []float64
	fine := hi/lo <= 100*(1+1e-9)
	for d := lo; d <= hi*(1+1e-9); d *= 10 {
		ticks = append(ticks, d)
		if fine && d*10 <= hi*(1+1e-9) {
			ticks = append(ticks, 2*d, 5*d)
		}
	}
	return ticks
}

// plotMsLabel writes a latency in milliseconds as a tick label: 0.1ms, 20ms,
// 1s.
func plotMsLabel(ms float64) string {
	if ms >= 1000 {
		return strconv.FormatFloat(ms/1000, 'g', 4, 64) + "s"
	}
	return strconv.FormatFloat(ms, 'g', 4, 64) + "ms"
}

// plotLegendEntry is one entry of the legend: a policy (its index in the
// results), or the shading (policy -1), at x on its line.
type plotLegendEntry struct {
	policy int
	label  string
	x      float64
}

// plotLegend lays the legend out in lines no wider than width: the
// policies, and the shading when there is any.
func plotLegend(results []Result, shaded bool, width float64) [][]plotLegendEntry {
	entries := make([]plotLegendEntry, 0, len(results)+1)
	for i, r := range results {
		entries = append(entries, plotLegendEntry{policy: i, label: r.Policy})
	}
	if shaded {
		entries = append(entries, plotLegendEntry{policy: -1, label: "failure window"})
	}
	var (
		lines [][]plotLegendEntry
		line  []plotLegendEntry
		at    float64
	)
	for _, e := range entries {
		w := float64(20 + plotCharWidth*len([]rune(e.label)) + 24)
		if len(line) > 0 && at+w > width {
			lines, line, at = append(lines, line), nil, 0
		}
		e.x = plotLeft + at
		line = append(line, e)
		at += w
	}
	return append(lines, line)
}

func plotAppendPoint(b []byte, x, y float64) []byte {
	b = strconv.AppendFloat(b, x, 'f', 1, 64)
	b = append(b, ',')
	b = strconv.AppendFloat(b, y, 'f', 1, 64)
	return append(b, ' ')
}

// plotEscape escapes s for an XML text node or attribute; a character XML
// cannot hold becomes U+FFFD.
func plotEscape(s string) string {
	var b bytes.Buffer
	_ = xml.EscapeText(&b, []byte(s))
	return b.String()
}
