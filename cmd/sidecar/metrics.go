package main

import (
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/sidecar-mesh/sidecar/pkg/discovery"
)

// newRegistry is the sidecar's Prometheus registry: process and Go runtime
// collectors, and discovery's view of every service in use.
func newRegistry(resolver discovery.Resolver) *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		collectors.NewGoCollector(),
		&discoveryCollector{resolver: resolver},
	)
	return reg
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

// metricsHandler serves the registry, with OpenMetrics when asked for.
func metricsHandler(reg *prometheus.Registry) http.Handler {
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{EnableOpenMetrics: true, Registry: reg})
}
