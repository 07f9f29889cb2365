package main

import (
	"bytes"
	"context"
	"flag"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/html"

	"github.com/sidecar-mesh/sidecar/internal/toolbin"
)

var updateScreenshot = flag.Bool("update-screenshot", false, "write docs/status-page.png from the browser test")

// The admin status page, loaded by a real headless Chromium from a running
// sidecar whose upstreams fail: in the DOM Chromium rendered, the instance
// that answers 503 is marked ejected with the end of its ejection, the
// service nothing answers for has its breaker open, and its failures are
// listed with their attempts and why they stopped. A screenshot is taken
// the same way (with -update-screenshot it becomes docs/status-page.png).
func TestStatusPageInBrowser(t *testing.T) {
	chromium := toolbin.Path(t, "chromium")
	ok := func(w http.ResponseWriter, r *http.Request) { _, _ = w.Write([]byte("ok\n")) }
	good1, good2 := httptest.NewServer(http.HandlerFunc(ok)), httptest.NewServer(http.HandlerFunc(ok))
	bad := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusServiceUnavailable)
	}))
	for _, s := range []*httptest.Server{good1, good2, bad} {
		defer s.Close()
	}
	addr := func(s *httptest.Server) string { return strings.TrimPrefix(s.URL, "http://") }
	down := []string{freePort(t), freePort(t)}
	rs := runSidecar(t, `discovery:
  static:
    user-service: [`+addr(good1)+`, `+addr(bad)+`, `+addr(good2)+`]
    orders: [`+strings.Join(down, ", ")+`]
policies:
  - service: "*"
    retry: {attempts: 3, backoff: {base: 1ms, max: 2ms}, on: [connect-failure, 503]}
    outlierDetection: {consecutiveFailures: 2, ejectionTime: 1m, maxEjectionPercent: 50}
  - service: orders
    circuitBreaker: {consecutiveFailures: 2, openDuration: 1m}
`)
	c := &http.Client{Timeout: 10 * time.Second}
	send := func(service string, n int) {
		for range n {
			req, _ := http.NewRequest(http.MethodGet, "http://"+rs.out+"/items/1", nil)
			req.Host = service
			resp, err := c.Do(req)
			if err != nil {
				t.Fatalf("GET %s: %v", service, err)
			}
			resp.Body.Close()
		}
	}
	send("user-service", 9) // bad is tried 3 times at least: ejected at its 2nd failure
	send("orders", 3)       // two failures open the breaker; the third is refused

	dir := t.TempDir()
	run := func(args ...string) []byte {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, chromium, append([]string{"--headless", "--no-sandbox", "--disable-gpu",
			"--disable-dev-shm-usage", "--no-first-run", "--user-data-dir=" + filepath.Join(dir, "profile")}, args...)...)
		cmd.Env = append(os.Environ(), "HOME="+dir)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("chromium %s: %v\n%s", strings.Join(args, " "), err, stderr.Bytes())
		}
		return out
	}
	page := "http://" + rs.admin + "/"
	dom, err := html.Parse(bytes.NewReader(run("--dump-dom", page)))
	if err != nil {
		t.Fatal(err)
	}

	users := find(dom, "tr", "data-service", "user-service")
	if users == nil {
		t.Fatalf("the page has no row of user-service:\n%s", render(dom))
	}
	ejected := findAll(users, "div", "class", "endpoint ejected mono")
	if len(ejected) != 1 || !strings.HasPrefix(text(ejected[0]), addr(bad)+"ejected until ") {
		t.Errorf("user-service's ejected endpoints on the page: %q, want %s ejected until ...", texts(ejected), addr(bad))
	}
	if n := len(findAll(users, "div", "class", "endpoint mono")); n != 2 {
		t.Errorf("user-service has %d endpoints in rotation on the page, want 2", n)
	}
	orders := find(dom, "tr", "data-service", "orders")
	if br := find(orders, "span", "class", "breaker state-open"); br == nil || text(br) != "open" {
		t.Errorf("orders' breaker on the page: %q, want open", text(br))
	}
	failures := findAll(dom, "tr", "class", "failure")
	if len(failures) != 3 {
		t.Fatalf("the page lists %d failures, want 3 (orders' two, then its refusal): %q", len(failures), texts(failures))
	}
	// Newest first: the refusal, then the two requests that failed.
	for i, want := range []struct {
		answer   string
		attempts int
		stop     string
	}{
		{"503 circuit_open", 0, "stopped: circuit breaker open: the request was not sent (circuitBreaker)"},
		{"502 upstream_connect_failure", 3, "stopped: attempts used up (retry.attempts: 3)"},
		{"502 upstream_connect_failure", 3, "stopped: attempts used up (retry.attempts: 3)"},
	} {
		f := failures[i]
		atts := findAll(f, "li", "class", "attempt")
		stop := find(f, "div", "class", "stop")
		if !strings.Contains(text(f), "GET orders/items/1") || !strings.Contains(text(find(f, "td", "class", "fail")), want.answer) ||
			len(atts) != want.attempts || text(stop) != want.stop {
			t.Errorf("failure %d on the page: %q with %d attempts, %q; want GET orders/items/1, %s, %d attempts, %q",
				i+1, text(f), len(atts), text(stop), want.answer, want.attempts, want.stop)
		}
		for j, a := range atts {
			if !strings.Contains(text(a), "connection refused") || (j > 0) != strings.HasPrefix(text(a), "retry on connect-failure after ") {
				t.Errorf("failure %d, attempt %d: %q", i+1, j+1, text(a))
			}
		}
	}
	for _, link := range []string{"/endpoints", "/resilience", "/policies", "/requests/failed", "/tap"} {
		if find(dom, "a", "href", link) == nil {
			t.Errorf("the page has no link to %s", link)
		}
	}

	shot := filepath.Join(dir, "status.png")
	run("--screenshot="+shot, "--window-size=1200,900", "--hide-scrollbars", page)
	png, err := os.ReadFile(shot)
	if err != nil || !bytes.HasPrefix(png, []byte("\x89PNG\r\n\x1a\n")) || len(png) < 10<<10 {
		t.Fatalf("chromium's screenshot of the page: %d bytes (%v), want a PNG", len(png), err)
	}
	if *updateScreenshot {
		if err := os.WriteFile(filepath.Join(repoRoot, "docs", "status-page.png"), png, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// find is the first element under n named tag whose attribute key is val.
func find(n *html.Node, tag, key, val string) *html.Node {
	all := findAll(n, tag, key, val)
	if len(all) == 0 {
		return nil
	}
	return all[0]
}

func findAll(n *html.Node, tag, key, val string) []*html.Node {
	var out []*html.Node
	if n == nil {
		return nil
	}
	for d := range n.Descendants() {
		if d.Type != html.ElementNode || d.Data != tag {
			continue
		}
		for _, a := range d.Attr {
			if a.Key == key && a.Val == val {
				out = append(out, d)
			}
		}
	}
	return out
}

// text is the text under n, its runs of white space made one space.
func text(n *html.Node) string {
	if n == nil {
		return ""
	}
	var b strings.Builder
	for d := range n.Descendants() {
		if d.Type == html.TextNode {
			b.WriteString(d.Data)
		}
	}
	return strings.Join(strings.Fields(b.String()), " ")
}

func texts(ns []*html.Node) []string {
	var out []string
	for _, n := range ns {
		out = append(out, text(n))
	}
	return out
}

func render(n *html.Node) string {
	var b bytes.Buffer
	_ = html.Render(&b, n)
	return b.String()
}
