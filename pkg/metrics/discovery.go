package metrics

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/sidecar-mesh/sidecar/pkg/discovery"
)

// NewDiscoveryCollector reports, per service resolver knows, its healthy
// endpoints and how long ago its source last confirmed them. Labels are
// service names and sources only, never endpoint addresses.
func NewDiscoveryCollector(resolver discovery.Resolver) prometheus.Collector {
	return &discoveryCollector{resolver: resolver}
}

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

// NewDroppedEndpointsCollector reports the endpoints Consul answered that
// were not used because they point at the sidecar's own host, by reason.
func NewDroppedEndpointsCollector(consul *discovery.Consul) prometheus.Collector {
	return droppedCollector{consul}
}

type droppedCollector struct{ consul *discovery.Consul }

var droppedDesc = prometheus.NewDesc("sidecar_discovery_dropped_endpoints_total",
	"Endpoints from Consul not used, each counted once when it appears, by reason: loopback, link-local, unspecified (an address, or a host name resolving to one, of the sidecar's own host: discovery.consul.allowLoopbackEndpoints), malformed (an address that is neither an IP address nor a host name).",
	[]string{"reason"}, nil)

func (droppedCollector) Describe(ch chan<- *prometheus.Desc) { ch <- droppedDesc }

func (c droppedCollector) Collect(ch chan<- prometheus.Metric) {
	for reason, n := range c.consul.DroppedEndpoints() {
		ch <- prometheus.MustNewConstMetric(droppedDesc, prometheus.CounterValue, float64(n), reason)
	}
}
