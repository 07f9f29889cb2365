package admin

import (
	"io"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/outbound"
	"github.com/sidecar-mesh/sidecar/pkg/requestlog"
)

// GET / is a small HTML page that loads nothing from elsewhere (no
// script, no URL outside the admin API, a CSP that allows nothing more),
// shows a service's ejected endpoint with the end of its ejection and a
// failure with its attempts, and escapes what came from the wire.
func TestStatusPage(t *testing.T) {
	static, _ := discovery.NewStatic(map[string][]string{"users": {"10.0.0.1:80", "10.0.0.2:80"}})
	rec := requestlog.New(requestlog.Config{})
	defer rec.Close()
	rec.Record(&requestlog.Request{Service: "users", Method: "GET", Path: "/<script>x</script>", Status: 503,
		Stop: requestlog.StopAttemptsUsedUp, Attempts: []requestlog.Attempt{{Endpoint: "10.0.0.2:80", Outcome: "503"}}})
	until := time.Date(2030, 1, 1, 12, 30, 0, 0, time.UTC)
	srv := httptest.NewServer(Handler(Sources{Config: func() any { return nil }, Resolver: discovery.Chain{static}, Requests: rec,
		Resilience: func() []outbound.ServiceStatus {
			st := outbound.ServiceStatus{Service: "users", Ejected: []outbound.EjectedEndpoint{{Addr: "10.0.0.2:80", Until: until}}}
			st.Breaker.State = "closed"
			return []outbound.ServiceStatus{st}
		}}))
	defer srv.Close()
	tr := &http.Transport{}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr}).Get(srv.URL + "/")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	page := string(body)
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "text/html; charset=utf-8" ||
		!strings.HasPrefix(resp.Header.Get("Content-Security-Policy"), "default-src 'none'") {
		t.Fatalf("GET /: %d %s, CSP %q", resp.StatusCode, resp.Header.Get("Content-Type"), resp.Header.Get("Content-Security-Policy"))
	}
	if len(body) > 16<<10 {
		t.Errorf("the page is %d bytes, want it small", len(body))
	}
	if strings.Contains(page, "<script") || regexp.MustCompile(`(src|href)="(https?:)?//`).MatchString(page) {
		t.Errorf("the page runs a script or loads from elsewhere:\n%s", page)
	}
	for _, want := range []string{`<div class="endpoint ejected mono">10.0.0.2:80<span>ejected until 12:30:00</span></div>`,
		`<div class="endpoint mono">10.0.0.1:80</div>`, `GET users/&lt;script&gt;x&lt;/script&gt;`,
		`<li class="attempt"><span class="mono">10.0.0.2:80</span> 503`, `stopped: attempts used up (retry.attempts: 1)`,
		`<meta http-equiv="refresh" content="2">`} {
		if !strings.Contains(page, want) {
			t.Errorf("the page lacks %s", want)
		}
	}
	if code := status(t, &http.Client{Transport: tr}, srv.URL+"/nothing"); code != 404 {
		t.Errorf("GET /nothing: %d, want 404", code)
	}
}
