package metrics

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"

	"github.com/sidecar-mesh/sidecar/pkg/transparent"
)

// Transparent counts redirected connections: it is the
// transparent.Listener's Observer. Every label is a fixed word. Safe for
// concurrent use.
type Transparent struct {
	accepted *prometheus.CounterVec
	refused  *prometheus.CounterVec
	bytes    *prometheus.CounterVec
	opened   prometheus.Counter
	active   prometheus.Gauge
}

var _ transparent.Observer = (*Transparent)(nil)

// NewTransparent registers the metrics of transparent interception on reg.
func NewTransparent(reg prometheus.Registerer) *Transparent {
	f := promauto.With(reg)
	return &Transparent{
		accepted: f.NewCounterVec(prometheus.CounterOpts{Name: "sidecar_intercepted_connections_total",
			Help: "Connections redirected to the outbound port (transparent interception), by the protocol they were taken for: http or tcp."},
			[]string{"protocol"}),
		refused: f.NewCounterVec(prometheus.CounterOpts{Name: "sidecar_intercepted_refused_total",
			Help: "Redirected connections closed without being served: loop (to the sidecar's own listener), not_allowed (tcpPassthrough), connect_failure (the original destination did not answer)."},
			[]string{"reason"}),
		bytes: f.NewCounterVec(prometheus.CounterOpts{Name: "sidecar_tcp_passthrough_bytes_total",
			Help: "Bytes of TCP passed through to original destinations: sent (app to destination) or received."},
			[]string{"direction"}),
		opened: f.NewCounter(prometheus.CounterOpts{Name: "sidecar_tcp_passthrough_connections_total",
			Help: "TCP connections passed through to their original destination."}),
		active: f.NewGauge(prometheus.GaugeOpts{Name: "sidecar_tcp_passthrough_active_connections",
			Help: "TCP connections being passed through now."}),
	}
}

func (m *Transparent) Accepted(protocol string) { m.accepted.WithLabelValues(protocol).Inc() }
func (m *Transparent) Refused(reason string)    { m.refused.WithLabelValues(reason).Inc() }
func (m *Transparent) PassthroughOpened() {
	m.opened.Inc()
	m.active.Inc()
}
func (m *Transparent) PassthroughClosed() { m.active.Dec() }
func (m *Transparent) Bytes(direction string, n int) {
	m.bytes.WithLabelValues(direction).Add(float64(n))
}
