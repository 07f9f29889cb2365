package main

import (
	"fmt"
	"html"
	"math"
	"strconv"
	"strings"
)

// Plot geometry, in SVG user units.
const (
	plotW, plotH = 760, 440
	marginL      = 70
	marginR      = 170
	marginT      = 40
	marginB      = 60
)

var colors = map[string]string{
	"direct":       "#7f7f7f",
	"sidecar":      "#1f77b4",
	"sidecar-bare": "#17becf",
	"haproxy":      "#ff7f0e",
	"nginx":        "#2ca02c",
}

var fallbackColors = []string{"#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22"}

// svg draws the latency by percentile of every contestant at the first
// open-loop rate: x is the percentile on a log scale of 1/(1-p) (so 90,
// 99, 99.9 and 99.99 are evenly spaced), y the latency on a log scale.
func (rp *report) svg() string {
	rates := rp.loads("open")
	if len(rates) == 0 {
		return emptySVG("no open-loop runs")
	}
	rate := rates[0]
	type series struct {
		name   string
		color  string
		points [][2]float64 // x (log10 1/(1-p)), y (log10 ms)
	}
	var all []series
	ymin, ymax := math.Inf(1), math.Inf(-1)
	for i, name := range rp.order("open") {
		rs := rp.select_("open", name, rate)
		r := medianRun(rs, func(r *runRec) float64 { return r.open.Latency.P99 })
		if r == nil || len(r.open.Curve) == 0 {
			continue
		}
		s := series{name: name, color: colors[name]}
		if s.color == "" {
			s.color = fallbackColors[i%len(fallbackColors)]
		}
		for _, pt := range r.open.Curve {
			p, us := pt[0], pt[1]
			if p >= 100 || us <= 0 {
				continue // the maximum has no place on a 1/(1-p) axis
			}
			x := math.Log10(1 / (1 - p/100))
			y := math.Log10(us / 1000)
			s.points = append(s.points, [2]float64{x, y})
			ymin, ymax = math.Min(ymin, y), math.Max(ymax, y)
		}
		all = append(all, s)
	}
	if len(all) == 0 {
		return emptySVG("no latency curves")
	}
	ylo, yhi := math.Floor(ymin), math.Ceil(ymax)
	if yhi-ylo < 1 {
		yhi = ylo + 1
	}
	xhi := 4.0 // 99.99th
	px := func(x float64) float64 { return marginL + x/xhi*(plotW-marginL-marginR) }
	py := func(y float64) float64 { return plotH - marginB - (y-ylo)/(yhi-ylo)*(plotH-marginT-marginB) }

	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 %d %d" width="%d" height="%d" font-family="sans-serif" font-size="12">`+"\n",
		plotW, plotH, plotW, plotH)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	fmt.Fprintf(&b, `<text x="%d" y="22" font-size="15" font-weight="bold">Latency by percentile at %s req/s, open loop (1 KiB GET, loopback)</text>`+"\n",
		marginL, f0(rate))
	// Grid and axes.
	for _, t := range []struct {
		x     float64
		label string
	}{{0, "0"}, {1, "90"}, {2, "99"}, {3, "99.9"}, {4, "99.99"}} {
		X := px(t.x)
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#ddd"/>`+"\n", X, marginT, X, plotH-marginB)
		fmt.Fprintf(&b, `<text x="%.1f" y="%d" text-anchor="middle">%s</text>`+"\n", X, plotH-marginB+18, t.label)
	}
	fmt.Fprintf(&b, `<text x="%.1f" y="%d" text-anchor="middle">percentile</text>`+"\n", px(xhi/2), plotH-marginB+40)
	for e := ylo; e <= yhi; e++ {
		for _, m := range []float64{1, 2, 5} {
			y := e + math.Log10(m)
			if y > yhi+1e-9 {
				break
			}
			Y := py(y)
			stroke := "#eee"
			if m == 1 {
				stroke = "#ccc"
			}
			fmt.Fprintf(&b, `<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="%s"/>`+"\n", marginL, Y, plotW-marginR, Y, stroke)
			fmt.Fprintf(&b, `<text x="%d" y="%.1f" text-anchor="end">%s</text>`+"\n", marginL-6, Y+4, msLabel(m*math.Pow(10, e)))
		}
	}
	fmt.Fprintf(&b, `<text transform="translate(18 %.1f) rotate(-90)" text-anchor="middle">latency (ms, log scale)</text>`+"\n",
		py((ylo+yhi)/2))
	fmt.Fprintf(&b, `<rect x="%d" y="%d" width="%d" height="%d" fill="none" stroke="#888"/>`+"\n",
		marginL, marginT, plotW-marginL-marginR, plotH-marginT-marginB)
	// Curves and legend.
	for i, s := range all {
		var pts []string
		for _, p := range s.points {
			pts = append(pts, fmt.Sprintf("%.1f,%.1f", px(p[0]), py(p[1])))
		}
		fmt.Fprintf(&b, `<polyline fill="none" stroke="%s" stroke-width="2" points="%s"/>`+"\n", s.color, strings.Join(pts, " "))
		ly := marginT + 10 + i*20
		lx := plotW - marginR + 14
		fmt.Fprintf(&b, `<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="%s" stroke-width="3"/>`+"\n", lx, ly, lx+24, ly, s.color)
		fmt.Fprintf(&b, `<text x="%d" y="%d">%s</text>`+"\n", lx+30, ly+4, html.EscapeString(s.name))
	}
	b.WriteString("</svg>\n")
	return b.String()
}

func msLabel(ms float64) string { return strconv.FormatFloat(ms, 'g', -1, 64) }

func emptySVG(msg string) string {
	return fmt.Sprintf(`<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 400 60" width="400" height="60"><text x="10" y="35">%s</text></svg>`+"\n",
		html.EscapeString(msg))
}
