package main

import (
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promauto"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/inbound"
	"github.com/sidecar-mesh/sidecar/pkg/outbound"
	"github.com/sidecar-mesh/sidecar/pkg/panics"
)

// newRegistry is the sidecar's Prometheus registry: process and Go runtime
// collectors, and discovery's view of every service in use.
func newRegistry(resolver discovery.Resolver) *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		collectors.NewGoCollector(),
		&discoveryCollector{resolver: resolver},
		panicCollector{},
	)
	return reg
}

// panicCollector reports the panics recovered so far (package panics), by
// where they happened: a request handler, a watcher, a background loop.
type panicCollector struct{}

var panicsDesc = prometheus.NewDesc("sidecar_panics_total",
	"Panics recovered without stopping the process, by where they happened; each is a bug worth reporting.",
	[]string{"where"}, nil)

func (panicCollector) Describe(ch chan<- *prometheus.Desc) { ch <- panicsDesc }

func (panicCollector) Collect(ch chan<- prometheus.Metric) {
	for _, c := range panics.Counts() {
		ch <- prometheus.MustNewConstMetric(panicsDesc, prometheus.CounterValue, float64(c.N), c.Where)
	}
}

// resilienceMetrics counts what the outbound resilience chain decides (it
// is the chain's outbound.Observer) and reports its state at each scrape.
// Labels are service names (only services known to discovery reach the
// chain), retry reasons and states: all bounded.
type resilienceMetrics struct {
	retries     *prometheus.CounterVec
	exhausted   *prometheus.CounterVec
	transitions *prometheus.CounterVec
	ejections   *prometheus.CounterVec
	shed        *prometheus.CounterVec
	attempts    *prometheus.CounterVec
	refused     *prometheus.CounterVec
	streamsCut  *prometheus.CounterVec
	// attemptsBy caches the attempts counter per service: Attempted runs
	// on every attempt, and label hashing is not free.
	attemptsBy sync.Map
	proxy      atomic.Pointer[outbound.Proxy] // set once the proxy exists; read at scrape time
	inbound    atomic.Pointer[inbound.Proxy]  // nil without an app
}

var _ outbound.Observer = (*resilienceMetrics)(nil)

func newResilienceMetrics(reg prometheus.Registerer) *resilienceMetrics {
	f := promauto.With(reg)
	m := &resilienceMetrics{
		retries: f.NewCounterVec(prometheus.CounterOpts{Name: "sidecar_retries_total",
			Help: "Outbound attempts retried, by the retry.on condition that caused the retry."}, []string{"service", "reason"}),
		exhausted: f.NewCounterVec(prometheus.CounterOpts{Name: "sidecar_retry_budget_exhausted_total",
			Help: "Retries not made because the service's retry budget was spent."}, []string{"service"}),
		transitions: f.NewCounterVec(prometheus.CounterOpts{Name: "sidecar_circuit_breaker_transitions_total",
			Help: "Circuit breaker state changes, by the state entered."}, []string{"service", "state"}),
		ejections: f.NewCounterVec(prometheus.CounterOpts{Name: "sidecar_outlier_ejections_total",
			Help: "Endpoints taken out of rotation by outlier detection."}, []string{"service"}),
		shed: f.NewCounterVec(prometheus.CounterOpts{Name: "sidecar_shed_requests_total",
			Help: "Outbound requests refused without an upstream attempt: overloaded (concurrency limits) or circuit_open."},
			[]string{"service", "reason"}),
	}
	m.attempts = f.NewCounterVec(prometheus.CounterOpts{Name: "sidecar_attempts_total",
		Help: "Outbound attempts sent to an endpoint, first tries and retries."}, []string{"service"})
	m.refused = f.NewCounterVec(prometheus.CounterOpts{Name: "sidecar_refused_endpoints_total",
		Help: "Endpoints discovery named that are never called, by reason (own_listener: one of the sidecar's own listeners), counted once per endpoint set that holds them."},
		[]string{"service", "reason"})
	m.streamsCut = f.NewCounterVec(prometheus.CounterOpts{Name: "sidecar_streams_cut_total",
		Help: "Streaming answers (gRPC, text/event-stream, bodies of unknown length) the sidecar ended, by reason: idle (nothing from the upstream for streamIdleTimeout) or deadline (the caller's grpc-timeout passed)."},
		[]string{"service", "reason"})
	reg.MustRegister(&resilienceCollector{m: m})
	return m
}

func (m *resilienceMetrics) Retried(service, reason string) {
	m.retries.WithLabelValues(service, reason).Inc()
}
func (m *resilienceMetrics) RetryBudgetExhausted(service string) {
	m.exhausted.WithLabelValues(service).Inc()
}
func (m *resilienceMetrics) BreakerStateChanged(service, _, to string) {
	m.transitions.WithLabelValues(service, to).Inc()
}
func (m *resilienceMetrics) EndpointEjected(service string) {
	m.ejections.WithLabelValues(service).Inc()
}
func (m *resilienceMetrics) Shed(service, reason string) {
	m.shed.WithLabelValues(service, reason).Inc()
}
func (m *resilienceMetrics) EndpointRefused(service, reason string) {
	m.refused.WithLabelValues(service, reason).Inc()
}
func (m *resilienceMetrics) StreamCut(service, reason string) {
	m.streamsCut.WithLabelValues(service, reason).Inc()
}

func (m *resilienceMetrics) Attempted(service string) {
	c, ok := m.attemptsBy.Load(service)
	if !ok {
		c, _ = m.attemptsBy.LoadOrStore(service, m.attempts.WithLabelValues(service))
	}
	c.(prometheus.Counter).Inc()
}

// setInbound gives the scrape-time collector the inbound proxy to read.
func (m *resilienceMetrics) setInbound(p *inbound.Proxy) { m.inbound.Store(p) }

// setProxy gives the scrape-time collector the proxy to read.
func (m *resilienceMetrics) setProxy(p *outbound.Proxy) {
	m.proxy.Store(p)
}

// resilienceCollector reports the chain's state at scrape time.
type resilienceCollector struct{ m *resilienceMetrics }

var (
	breakerStateDesc = prometheus.NewDesc("sidecar_circuit_breaker_state",
		"1 for the circuit breaker's current state (closed, half-open, open), 0 for the others.", []string{"service", "state"}, nil)
	inFlightDesc = prometheus.NewDesc("sidecar_requests_in_flight",
		"Requests in flight through the sidecar.", []string{"direction"}, nil)
	serviceInFlightDesc = prometheus.NewDesc("sidecar_service_requests_in_flight",
		"Outbound requests in flight to a service.", []string{"service"}, nil)
	ejectedDesc = prometheus.NewDesc("sidecar_outlier_ejected_endpoints",
		"Endpoints of a service out of rotation now.", []string{"service"}, nil)
)

func (c *resilienceCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- breakerStateDesc
	ch <- inFlightDesc
	ch <- serviceInFlightDesc
	ch <- ejectedDesc
}

func (c *resilienceCollector) Collect(ch chan<- prometheus.Metric) {
	p := c.m.proxy.Load()
	if p == nil {
		return
	}
	ch <- prometheus.MustNewConstMetric(inFlightDesc, prometheus.GaugeValue, float64(p.InFlight()), "outbound")
	if in := c.m.inbound.Load(); in != nil {
		ch <- prometheus.MustNewConstMetric(inFlightDesc, prometheus.GaugeValue, float64(in.InFlight()), "inbound")
	}
	for _, st := range p.Status() {
		for _, state := range []string{"closed", "half-open", "open"} {
			v := 0.0
			if st.Breaker.State == state {
				v = 1
			}
			ch <- prometheus.MustNewConstMetric(breakerStateDesc, prometheus.GaugeValue, v, st.Service, state)
		}
		ch <- prometheus.MustNewConstMetric(serviceInFlightDesc, prometheus.GaugeValue, float64(st.InFlight), st.Service)
		ch <- prometheus.MustNewConstMetric(ejectedDesc, prometheus.GaugeValue, float64(len(st.Ejected)), st.Service)
	}
}

// discoveryCollector reports, per known service, its healthy endpoints and
// how long ago its source last confirmed them. Labels are service names
// only, never endpoint addresses.
type discoveryCollector struct {
	resolver discovery.Resolver
}

var (
	endpointsDesc = prometheus.NewDesc("sidecar_discovery_endpoints",
		"Healthy endpoints of a service, as discovery sees them now.", []string{"service", "source"}, nil)
	stalenessDesc = prometheus.NewDesc("sidecar_discovery_staleness_seconds",
		"Seconds since the source last confirmed a service's endpoints; it grows while Consul is unreachable.",
		[]string{"service", "source"}, nil)
)

func (c *discoveryCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- endpointsDesc
	ch <- stalenessDesc
}

func (c *discoveryCollector) Collect(ch chan<- prometheus.Metric) {
	now := time.Now()
	for _, s := range c.resolver.Services() {
		ch <- prometheus.MustNewConstMetric(endpointsDesc, prometheus.GaugeValue, float64(len(s.Endpoints)), s.Service, s.Source)
		staleness := 0.0
		if s.Source != "static" {
			staleness = now.Sub(s.UpdatedAt).Seconds()
		}
		ch <- prometheus.MustNewConstMetric(stalenessDesc, prometheus.GaugeValue, staleness, s.Service, s.Source)
	}
}

// droppedCollector reports the endpoints Consul answered that were not
// used because they point at the sidecar's own host, by reason.
type droppedCollector struct{ consul *discovery.Consul }

var droppedDesc = prometheus.NewDesc("sidecar_discovery_dropped_endpoints_total",
	"Endpoints from Consul not used because they point at the sidecar's own host (discovery.consul.allowLoopbackEndpoints), each counted once when it appears, by reason: loopback, link-local, unspecified.",
	[]string{"reason"}, nil)

func (droppedCollector) Describe(ch chan<- *prometheus.Desc) { ch <- droppedDesc }

func (c droppedCollector) Collect(ch chan<- prometheus.Metric) {
	for reason, n := range c.consul.DroppedEndpoints() {
		ch <- prometheus.MustNewConstMetric(droppedDesc, prometheus.CounterValue, float64(n), reason)
	}
}

// metricsHandler serves the registry at GET (and HEAD) /metrics, with
// OpenMetrics when asked for; any other path is 404 and any other method
// 405.
func metricsHandler(reg *prometheus.Registry) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{EnableOpenMetrics: true, Registry: reg}))
	return mux
}
