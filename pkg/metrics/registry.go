package metrics

import (
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/sidecar-mesh/sidecar/pkg/panics"
)

// NewRegistry is a registry for the sidecar's metrics, holding already the
// process and Go runtime collectors and the panics recovered.
func NewRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		collectors.NewGoCollector(),
		panicCollector{},
	)
	return reg
}

// Handler serves reg at GET (and HEAD) /metrics, with OpenMetrics when
// asked for; any other path is 404 and any other method 405.
func Handler(reg *prometheus.Registry) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{EnableOpenMetrics: true, Registry: reg}))
	return mux
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

// NewDroppedSpansCounter reports dropped, the number of sampled spans the
// tracing provider could not export (tracing.Provider's Dropped).
func NewDroppedSpansCounter(dropped func() uint64) prometheus.Collector {
	return prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "sidecar_tracing_dropped_spans_total",
		Help: "Sampled spans dropped: export queue full or the collector unreachable."},
		func() float64 { return float64(dropped()) })
}

// NewDroppedLogLinesCounter reports dropped, the number of access log lines
// not written because the log's writer was behind (requestlog.Recorder's
// DroppedLogLines), as Envoy counts its access logs' dropped lines.
func NewDroppedLogLinesCounter(dropped func() uint64) prometheus.Collector {
	return prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "sidecar_access_log_dropped_lines_total",
		Help: "Access log lines dropped because the log's writer (stderr) was behind: the requests were served, their lines not written."},
		func() float64 { return float64(dropped()) })
}
