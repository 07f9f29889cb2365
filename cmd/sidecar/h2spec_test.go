package main

import (
	"encoding/xml"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/sidecar-mesh/sidecar/internal/toolbin"
)

// knownH2specFailures are the h2spec cases the listeners fail on purpose,
// each explained in docs/grpc.md ("HTTP/2 conformance"), as "section: case".
var knownH2specFailures = []string{
	// An invalid preface on a port that serves HTTP/1.1 too is an HTTP/1.1
	// request, answered 400 before the connection is closed.
	"http2/3.5: Sends invalid connection preface",
	// net/http treats duplicate settings in one SETTINGS frame as a
	// connection error.
	"http2/6.5.3: Sends multiple values of SETTINGS_INITIAL_WINDOW_SIZE",
	// Connection-specific header fields are refused with a 400 answer
	// (never forwarded), not a stream reset.
	"http2/8.1.2.2: Sends a HEADERS frame that contains the connection-specific header field",
	"http2/8.1.2.2: Sends a HEADERS frame that contains the TE header field with any value other than \"trailers\"",
}

// h2spec against both listeners in h2c mode: at least 141 of its 145
// cases pass, and every failure is a known one. h2spec names its target
// host as the authority; on the outbound port "localhost" is a static
// service whose endpoint is the app, so that its requests are forwarded
// as an app's would be (an IP literal would be refused at once, before
// the frames the cases are about arrive).
func TestH2spec(t *testing.T) {
	bin := toolbin.Path(t, "h2spec")
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		io.WriteString(w, strings.Repeat("h2spec reads this body\n", 50))
	}))
	defer app.Close()
	_, appPort, _ := net.SplitHostPort(strings.TrimPrefix(app.URL, "http://"))
	in := freePort(t)
	rs := runSidecar(t, "", "--app-port", appPort, "--inbound-addr", in, "--static", "localhost=127.0.0.1:"+appPort)
	for _, l := range []struct{ name, addr string }{{"outbound", rs.out}, {"inbound", in}} {
		t.Run(l.name, func(t *testing.T) {
			_, port, _ := net.SplitHostPort(l.addr)
			host := "localhost"
			report := filepath.Join(t.TempDir(), "h2spec.xml")
			out, _ := exec.Command(bin, "-h", host, "-p", port, "--timeout", "2", "-j", report).CombinedOutput()
			passed, failed := h2specResults(t, report)
			t.Logf("h2spec on the %s listener: %d passed, %d failed %v", l.name, passed, len(failed), failed)
			var unexpected []string
			for _, f := range failed {
				if !slices.Contains(knownH2specFailures, f) {
					unexpected = append(unexpected, f)
				}
			}
			if len(unexpected) > 0 || passed < 141 {
				t.Fatalf("h2spec on the %s listener: %d passed, unexpected failures %v\n%s", l.name, passed, unexpected, out)
			}
		})
	}
}

// h2specResults reads h2spec's JUnit report: the passed count and the
// failed cases as "section: case", sorted.
func h2specResults(t *testing.T, path string) (passed int, failed []string) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("h2spec wrote no report: %v", err)
	}
	var report struct {
		Suites []struct {
			Package string `xml:"package,attr"`
			Name    string `xml:"name,attr"`
			Cases   []struct {
				Package string    `xml:"package,attr"`
				Name    string    `xml:"classname,attr"`
				Failure *struct{} `xml:"failure"`
				Error   *struct{} `xml:"error"`
				Skipped *struct{} `xml:"skipped"`
			} `xml:"testcase"`
		} `xml:"testsuite"`
	}
	if err := xml.Unmarshal(data, &report); err != nil {
		t.Fatalf("h2spec report: %v", err)
	}
	for _, s := range report.Suites {
		for _, c := range s.Cases {
			switch {
			case c.Failure != nil || c.Error != nil:
				failed = append(failed, c.Package+": "+c.Name)
			case c.Skipped == nil:
				passed++
			}
		}
	}
	slices.Sort(failed)
	return passed, failed
}
