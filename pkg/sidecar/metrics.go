package sidecar

import (
	"sync"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"

	"github.com/sidecar-mesh/sidecar/pkg/inbound"
	"github.com/sidecar-mesh/sidecar/pkg/metrics"
	"github.com/sidecar-mesh/sidecar/pkg/outbound"
)

// registerMetrics builds the sidecar's registry: the process, Go runtime
// and recovered panics, discovery's view of every service in use, the
// policy store's updates, the outbound resilience chain, the requests
// (unless requestMetrics is off) and the spans dropped.
func (s *Sidecar) registerMetrics() {
	reg := metrics.NewRegistry()
	reg.MustRegister(metrics.NewDiscoveryCollector(s.resolver))
	if s.consul != nil {
		reg.MustRegister(metrics.NewDroppedEndpointsCollector(s.consul))
	}
	reg.MustRegister(metrics.NewPolicyCollector(s.policies.store))
	s.resilience, s.registry = newResilienceMetrics(reg), reg
	if s.cfg.RequestMetrics == nil || *s.cfg.RequestMetrics {
		s.requests = metrics.NewRequests(reg)
	}
	reg.MustRegister(metrics.NewDroppedSpansCounter(s.tracing.Dropped))
	reg.MustRegister(metrics.NewDroppedLogLinesCounter(func() uint64 {
		if s.recorder == nil {
			return 0
		}
		return uint64(s.recorder.DroppedLogLines())
	}))
}

// registerHealthMetrics reports, at each scrape, whether each of the app's
// probes that is configured passes, and whether /healthz/ready would
// answer 200.
func (s *Sidecar) registerHealthMetrics(readiness, liveness, startup *inbound.Prober) {
	for _, p := range []struct {
		name   string
		prober *inbound.Prober
	}{{"readiness", readiness}, {"liveness", liveness}, {"startup", startup}} {
		if p.prober != nil {
			s.registry.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "sidecar_app_probe_passing",
				Help: "1 while the app passes the probe (after its thresholds), else 0.", ConstLabels: prometheus.Labels{"probe": p.name}},
				func() float64 { return b2f(p.prober.OK()) }))
		}
	}
	s.registry.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "sidecar_ready",
		Help: "1 while /healthz/ready answers 200: outbound up, the app ready, no drain."},
		func() float64 { return b2f(len(s.healthH.Ready()) == 0) }))
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
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
	hedges      *prometheus.CounterVec
	hedgesWon   *prometheus.CounterVec
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
	m.hedges = f.NewCounterVec(prometheus.CounterOpts{Name: "sidecar_hedges_total",
		Help: "Hedges sent: attempts of an idempotent request sent to another endpoint once hedge.delay passed without an answer."},
		[]string{"service"})
	m.hedgesWon = f.NewCounterVec(prometheus.CounterOpts{Name: "sidecar_hedges_won_total",
		Help: "Hedges whose answer was the one the app got (the attempts before them were cancelled)."},
		[]string{"service"})
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
func (m *resilienceMetrics) Hedged(service string) {
	m.hedges.WithLabelValues(service).Inc()
}
func (m *resilienceMetrics) HedgeWon(service string) {
	m.hedgesWon.WithLabelValues(service).Inc()
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
	limitDesc = prometheus.NewDesc("sidecar_concurrency_limit",
		"Outbound requests to a service allowed in flight now: concurrency.maxInFlight, or the adaptive limit (concurrency.adaptive).", []string{"service"}, nil)
	endpointAttemptsDesc = prometheus.NewDesc("sidecar_endpoint_attempts_total",
		"Outbound attempts the balancer sent to each endpoint of a service since the endpoint joined its set: their shares are the balancer's choices.",
		[]string{"service", "endpoint"}, nil)
)

func (c *resilienceCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- breakerStateDesc
	ch <- inFlightDesc
	ch <- serviceInFlightDesc
	ch <- ejectedDesc
	ch <- limitDesc
	ch <- endpointAttemptsDesc
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
		ch <- prometheus.MustNewConstMetric(limitDesc, prometheus.GaugeValue, float64(st.Limit), st.Service)
		if b := st.Balancer; b != nil {
			for _, ep := range b.Endpoints {
				ch <- prometheus.MustNewConstMetric(endpointAttemptsDesc, prometheus.CounterValue, float64(ep.Picks), st.Service, ep.Addr)
			}
		}
	}
}
