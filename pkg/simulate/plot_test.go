package simulate

import (
	"bytes"
	"encoding/xml"
	"errors"
	"io"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/policy"
)

// plotResults are two policies' minute under tableScenario: the first
// loses requests while an instance fails (10s to 40s), the second does
// not but pays in latency.
func plotResults(names ...string) []Result {
	var out []Result
	for i, name := range names {
		r := Result{Policy: name}
		for t := range 60 {
			sec := Second{T: t, Requests: 200, Succeeded: 200, Attempts: 200, P99Ms: 20}
			if t >= 10 && t < 40 {
				if i == 0 {
					sec.Succeeded = 170
				}
				sec.P99Ms = 20 + 300*float64(i) + 10*math.Sin(float64(t))
			}
			if t == 45 {
				sec = Second{T: t} // a second without requests: no point
			}
			r.Timeline = append(r.Timeline, sec)
		}
		out = append(out, r)
	}
	return out
}

// svgElements parses an SVG and returns its elements by name, with their
// attributes, and the text of every <title>.
func svgElements(t *testing.T, svg []byte) (map[string][]map[string]string, []string) {
	t.Helper()
	elems := map[string][]map[string]string{}
	var titles []string
	dec := xml.NewDecoder(bytes.NewReader(svg))
	inTitle := false
	for {
		tok, err := dec.Token()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("Plot wrote SVG that is not XML: %v\n%s", err, svg)
		}
		switch tok := tok.(type) {
		case xml.StartElement:
			attrs := map[string]string{}
			for _, a := range tok.Attr {
				attrs[a.Name.Local] = a.Value
			}
			elems[tok.Name.Local] = append(elems[tok.Name.Local], attrs)
			inTitle = tok.Name.Local == "title"
		case xml.CharData:
			if inTitle {
				titles = append(titles, string(tok))
			}
		case xml.EndElement:
			inTitle = false
		}
	}
	return elems, titles
}

func TestPlot(t *testing.T) {
	s := tableScenario()
	// A second group failing in the same window is the same window; a
	// group failing nothing has none.
	s.Instances = append(s.Instances, s.Instances[1],
		Instances{Count: 1, Latency: s.Instances[0].Latency, FailureRate: 1, Failure: FailReset, From: policy.Duration(50 * time.Second)},
		Instances{Count: 1, Latency: s.Instances[0].Latency, From: policy.Duration(5 * time.Second)})
	names := []string{"default", `<aggressive & "fast">.yaml`, "no-retry"}
	var b bytes.Buffer
	if err := Plot(&b, s, plotResults(names...)); err != nil {
		t.Fatalf("Plot = %v", err)
	}
	elems, titles := svgElements(t, b.Bytes())

	if got := len(elems["polyline"]); got != 2*len(names) {
		t.Errorf("Plot drew %d polylines, want %d: one per policy in each of the two panels", got, 2*len(names))
	}
	for i, p := range elems["polyline"] {
		// 60 seconds, one without requests.
		if n := len(strings.Fields(p["points"])); n != 59 {
			t.Errorf("polyline %d has %d points, want 59 (one per second with requests)", i, n)
		}
	}
	faults := 0
	for _, r := range elems["rect"] {
		if r["class"] == "fault" {
			faults++
		}
	}
	if faults != 2*2 {
		t.Errorf("Plot shaded %d rects, want 4: the two failure windows (10s-40s, 50s-60s) in each panel", faults)
	}
	for _, name := range names {
		n := 0
		for _, title := range titles {
			if title == name {
				n++
			}
		}
		if n != 2 {
			t.Errorf("policy %q names %d lines, want 2", name, n)
		}
	}
	svg := b.String()
	for _, want := range []string{">echo: 200 requests/s for 1m0s, 6 instances<", ">Success rate (%)<", ">p99 latency (ms, log scale)<", ">failure window<",
		">&lt;aggressive &amp; &#34;fast&#34;&gt;.yaml<"} {
		if !strings.Contains(svg, want) {
			t.Errorf("SVG lacks %q", want)
		}
	}
	// Self-contained: nothing runs, nothing is fetched.
	for _, tag := range []string{"script", "image", "use", "foreignObject", "style"} {
		if len(elems[tag]) > 0 {
			t.Errorf("SVG has a <%s> element", tag)
		}
	}
	for _, ref := range []string{"href", "url(", "javascript:", "@import"} {
		if strings.Contains(svg, ref) {
			t.Errorf("SVG holds %q: it may refer to something outside itself", ref)
		}
	}
}

// A policy name that XML cannot hold (a NUL, a bare control character)
// still makes a well-formed SVG, and so does a run without results.
func TestPlotOddInput(t *testing.T) {
	for _, results := range [][]Result{nil, plotResults("a\x00b\x1b]0;c"), {{Policy: "empty timeline"}}} {
		var b bytes.Buffer
		if err := Plot(&b, tableScenario(), results); err != nil {
			t.Fatalf("Plot = %v", err)
		}
		elems, _ := svgElements(t, b.Bytes())
		if got := len(elems["polyline"]); got != 2*len(results) {
			t.Errorf("Plot drew %d polylines for %d results, want %d", got, len(results), 2*len(results))
		}
	}
	if err := Plot(io.Discard, nil, nil); err == nil {
		t.Errorf("Plot(nil scenario) = nil, want an error")
	}
}

func TestPlotSecondsLabel(t *testing.T) {
	for sec, want := range map[int]string{0: "0s", 45: "45s", 60: "1m", 150: "2m30s", 3600: "1h", 3660: "1h1m", 3601: "1h0m1s"} {
		if got := plotSecondsLabel(sec); got != want {
			t.Errorf("plotSecondsLabel(%d) = %q, want %q", sec, got, want)
		}
	}
}
