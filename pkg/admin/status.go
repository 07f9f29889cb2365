package admin

import (
	"bytes"
	_ "embed"
	"html/template"
	"net/http"
	"slices"
	"strconv"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/outbound"
	"github.com/sidecar-mesh/sidecar/pkg/policy"
	"github.com/sidecar-mesh/sidecar/pkg/requestlog"
)

// statusHTML is the status page's template: one file, its style inline,
// no script and nothing fetched from elsewhere; it reloads itself.
//
//go:embed status.html
var statusHTML string

var statusPage = template.Must(template.New("status").Funcs(template.FuncMap{
	"clock":  func(t time.Time) string { return t.UTC().Format("15:04:05") },
	"millis": requestlog.Millis,
}).Parse(statusHTML))

// maxPageFailures is how many recent failures the status page shows.
const maxPageFailures = 20

// statusData is what the status page shows.
type statusData struct {
	Now      time.Time
	Refresh  int // seconds between reloads
	Services []serviceRow
	Policies []policy.Status
	Failures []requestlog.Request
	// What this sidecar serves: the page leaves out what it lacks.
	HasResilience, HasPolicies, HasRequests bool
}

// serviceRow is one service: its endpoints, as discovery has them and as
// outlier detection left them, and its resilience state once called.
type serviceRow struct {
	Service   string
	Source    string
	Endpoints []endpointCell
	Called    bool // the rest is known only once the service was called
	Status    outbound.ServiceStatus
}

type endpointCell struct {
	Addr         string
	EjectedUntil time.Time // zero: in rotation
}

// statusPageHandler serves the status page: what GET /endpoints,
// /resilience, /policies and /requests/failed show, on one page for
// people.
func statusPageHandler(s Sources) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		d := statusData{Now: time.Now(), Refresh: 2, HasResilience: s.Resilience != nil, HasPolicies: s.Policies != nil,
			HasRequests: s.Requests != nil}
		var called []outbound.ServiceStatus
		if s.Resilience != nil {
			called = s.Resilience()
		}
		for _, set := range s.Resolver.Services() {
			row := serviceRow{Service: set.Service, Source: set.Source}
			if i := slices.IndexFunc(called, func(st outbound.ServiceStatus) bool { return st.Service == set.Service }); i >= 0 {
				row.Called, row.Status = true, called[i]
			}
			for _, ep := range set.Endpoints {
				cell := endpointCell{Addr: ep.Addr}
				for _, e := range row.Status.Ejected {
					if e.Addr == ep.Addr {
						cell.EjectedUntil = e.Until
					}
				}
				row.Endpoints = append(row.Endpoints, cell)
			}
			d.Services = append(d.Services, row)
		}
		if s.Policies != nil {
			d.Policies = s.Policies.Statuses()
		}
		if s.Requests != nil {
			d.Failures = s.Requests.Failed("")
			d.Failures = d.Failures[:min(len(d.Failures), maxPageFailures)]
		}
		var b bytes.Buffer
		if err := statusPage.Execute(&b, d); err != nil {
			writeError(w, http.StatusInternalServerError, "status page: "+err.Error())
			return
		}
		h := w.Header()
		h.Set("Content-Type", "text/html; charset=utf-8")
		h.Set("Cache-Control", "no-store")
		h.Set("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'")
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Content-Length", strconv.Itoa(b.Len()))
		_, _ = w.Write(b.Bytes())
	}
}
