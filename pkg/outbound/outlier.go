package outbound

import (
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/policy"
)

// outliers tracks, per endpoint of one service, consecutive failures and
// ejections. An ejected endpoint is skipped by the picker until its
// ejection ends; each repeat ejection lasts longer. Never more than
// maxEjectionPercent of the endpoints (and never all) are ejected. Safe for
// concurrent use; state survives endpoint-set and policy changes.
type outliers struct {
	mu        sync.Mutex // guards endpoints
	endpoints map[string]*endpointHealth
}

type endpointHealth struct {
	consecutive  int
	ejections    int
	ejectedUntil time.Time
}

// ejected reports whether addr is ejected at now.
func (o *outliers) ejected(addr string, now time.Time) bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	h := o.endpoints[addr]
	return h != nil && now.Before(h.ejectedUntil)
}

// record counts an attempt's outcome on addr and ejects it when it reaches
// the policy's consecutive failures, within the ejection cap over set.
// It reports whether addr was ejected now.
func (o *outliers) record(addr string, failed bool, set *discovery.EndpointSet, od *policy.OutlierDetection, now time.Time) bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.endpoints == nil {
		o.endpoints = map[string]*endpointHealth{}
	}
	h := o.endpoints[addr]
	if h == nil {
		h = &endpointHealth{}
		o.endpoints[addr] = h
	}
	if !failed {
		h.consecutive = 0
		return false
	}
	h.consecutive++
	if h.consecutive < *od.ConsecutiveFailures || now.Before(h.ejectedUntil) {
		return false
	}
	ejected := 0
	for _, ep := range set.Endpoints {
		if e := o.endpoints[ep.Addr]; e != nil && now.Before(e.ejectedUntil) {
			ejected++
		}
	}
	n := len(set.Endpoints)
	if ejected+1 > n**od.MaxEjectionPercent/100 || ejected+1 >= n {
		return false // at the cap: keep routing to it rather than to too few
	}
	h.ejections++
	h.consecutive = 0
	h.ejectedUntil = now.Add(od.EjectionTime.D() * time.Duration(min(h.ejections, 10)))
	return true
}

// attemptFailed is the outlier detector's view of an attempt: transport
// failures and 5xx answers; never the client's own cancellation.
func attemptFailed(resp *http.Response, err error) bool {
	return breakerOutcome(resp, err) == errUpstreamFailed
}

// ejectedList lists the endpoints ejected at now, sorted by address.
func (o *outliers) ejectedList(now time.Time) []EjectedEndpoint {
	o.mu.Lock()
	defer o.mu.Unlock()
	out := []EjectedEndpoint{}
	for addr, h := range o.endpoints {
		if now.Before(h.ejectedUntil) {
			out = append(out, EjectedEndpoint{Addr: addr, Until: h.ejectedUntil, Ejections: h.ejections})
		}
	}
	slices.SortFunc(out, func(a, b EjectedEndpoint) int { return strings.Compare(a.Addr, b.Addr) })
	return out
}
