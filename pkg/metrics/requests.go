// Package metrics holds the sidecar's Prometheus registry and its /metrics
// handler, the per-request metrics both proxies record, and the metrics of
// discovery, the policy store, transparent interception, tracing and the
// panics recovered. Labels are bounded by construction: service (only
// services known to discovery, or the app's own), direction, method (the
// standard ones, else "other"), status code class, source and fixed
// reasons. Never endpoint addresses or paths.
package metrics

import (
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Directions.
const (
	Outbound = "outbound"
	Inbound  = "inbound"
)

// DurationBuckets fit a proxy: from 100 µs (a loopback hop) to 30 s.
var DurationBuckets = []float64{0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}

// Requests are the request metrics of the sidecar. A nil *Requests records
// nothing. Safe for concurrent use.
type Requests struct {
	total    *prometheus.CounterVec
	duration *prometheus.HistogramVec
	rejected *prometheus.CounterVec
	grpc     *prometheus.CounterVec

	// series caches the children per direction, service and method, so
	// the request path does no label hashing and no allocation: an
	// immutable map, replaced (under mu) when a new combination appears.
	series atomic.Pointer[map[seriesKey]*Series]
	mu     sync.Mutex // serializes replacing series
}

type seriesKey struct{ direction, service, method string }

// NewRequests registers the request metrics on reg.
func NewRequests(reg prometheus.Registerer) *Requests {
	m := &Requests{
		total: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "sidecar_requests_total",
			Help: "Requests through the sidecar, by the status code class answered (the sidecar's own errors included)."},
			[]string{"direction", "service", "method", "code"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "sidecar_request_duration_seconds",
			Help: "Time from a request's arrival to the end of its answer, every attempt and backoff included.", Buckets: DurationBuckets},
			[]string{"direction", "service", "method"}),
		rejected: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "sidecar_rejected_requests_total",
			Help: "Requests refused before routing to a service (bad_request, unknown_service, not_allowed, ...), by reason."},
			[]string{"direction", "reason"}),
		grpc: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "sidecar_grpc_requests_total",
			Help: "gRPC calls through the sidecar by the grpc-status they ended with (0 to 16, else other; the sidecar's own errors included): a gRPC failure comes as HTTP 200, which sidecar_requests_total counts as 2xx."},
			[]string{"direction", "service", "grpc_code"}),
	}
	reg.MustRegister(m.total, m.duration, m.rejected, m.grpc)
	return m
}

// Series is the metrics of one direction, service and method. A nil
// *Series records nothing.
type Series struct {
	codes    [6]prometheus.Counter // by status class: 0 for other, then 1xx..5xx
	duration prometheus.Observer
	// grpc are the gRPC outcomes, by grpc-status 0 to 16 then other,
	// made on first use: most services never see one.
	grpc      [len(grpcCodes)]atomic.Pointer[prometheus.Counter]
	grpcVec   *prometheus.CounterVec
	direction string
	service   string
}

// grpcCodes are the grpc_code label's values: the codes gRPC defines, then
// "other" for anything an upstream wrote.
var grpcCodes = [...]string{"0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16", "other"}

// GRPC records the end of a gRPC call with grpc-status code ("" counts
// nothing: not a gRPC answer, or its status unknown).
func (s *Series) GRPC(code string) {
	if s == nil || code == "" {
		return
	}
	i := len(grpcCodes) - 1
	if n, err := strconv.Atoi(code); err == nil && n >= 0 && n <= 16 && strconv.Itoa(n) == code {
		i = n
	}
	c := s.grpc[i].Load()
	if c == nil {
		cc := s.grpcVec.WithLabelValues(s.direction, s.service, grpcCodes[i])
		s.grpc[i].CompareAndSwap(nil, &cc)
		c = s.grpc[i].Load()
	}
	(*c).Inc()
}

var codeClasses = [6]string{"other", "1xx", "2xx", "3xx", "4xx", "5xx"}

// For returns the series of direction, service and method.
func (m *Requests) For(direction, service, method string) *Series {
	if m == nil {
		return nil
	}
	key := seriesKey{direction, service, Method(method)}
	if cur := m.series.Load(); cur != nil {
		if s, ok := (*cur)[key]; ok {
			return s
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	cur := m.series.Load()
	if cur != nil {
		if s, ok := (*cur)[key]; ok {
			return s
		}
	}
	s := &Series{duration: m.duration.WithLabelValues(key.direction, key.service, key.method),
		grpcVec: m.grpc, direction: key.direction, service: key.service}
	for i, c := range codeClasses {
		s.codes[i] = m.total.WithLabelValues(key.direction, key.service, key.method, c)
	}
	next := make(map[seriesKey]*Series, 1)
	if cur != nil {
		for k, v := range *cur {
			next[k] = v
		}
	}
	next[key] = s
	m.series.Store(&next)
	return s
}

// Done records one request answered status after d; traceID, when set (the
// request's span is sampled), goes with the duration as an exemplar.
func (s *Series) Done(status int, d time.Duration, traceID string) {
	if s == nil {
		return
	}
	class := status / 100
	if class < 1 || class > 5 {
		class = 0
	}
	s.codes[class].Inc()
	if traceID != "" {
		if eo, ok := s.duration.(prometheus.ExemplarObserver); ok {
			eo.ObserveWithExemplar(d.Seconds(), prometheus.Labels{"trace_id": traceID})
			return
		}
	}
	s.duration.Observe(d.Seconds())
}

// Rejected records a request refused before routing, for reason.
func (m *Requests) Rejected(direction, reason string) {
	if m == nil {
		return
	}
	m.rejected.WithLabelValues(direction, reason).Inc()
}

// Method is m as a label: a standard method, or "other".
func Method(m string) string {
	switch m {
	case http.MethodGet, http.MethodHead, http.MethodPost, http.MethodPut, http.MethodDelete,
		http.MethodPatch, http.MethodOptions, http.MethodConnect, http.MethodTrace:
		return m
	}
	return "other" // methods are case-sensitive: "get" is not GET
}
