package metrics

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/sidecar-mesh/sidecar/pkg/policy"
)

// NewPolicyCollector reports the store's reloads and rejections per source
// at scrape time. The source label is one of inline, file and consul.
func NewPolicyCollector(store *policy.Store) prometheus.Collector {
	return policyCollector{store: store}
}

type policyCollector struct{ store *policy.Store }

var (
	policyReloadsDesc = prometheus.NewDesc("sidecar_policy_reloads_total",
		"Policy updates accepted, by source (inline, file, consul): a policy file counts once per new content, a Consul key once per new value or deletion.",
		[]string{"source"}, nil)
	policyRejectionsDesc = prometheus.NewDesc("sidecar_policy_rejections_total",
		"Policy updates rejected (the last good policy stayed in force), by source (inline, file, consul).",
		[]string{"source"}, nil)
)

func (c policyCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- policyReloadsDesc
	ch <- policyRejectionsDesc
}

func (c policyCollector) Collect(ch chan<- prometheus.Metric) {
	for _, st := range c.store.Stats() {
		ch <- prometheus.MustNewConstMetric(policyReloadsDesc, prometheus.CounterValue, float64(st.Reloads), st.Source)
		ch <- prometheus.MustNewConstMetric(policyRejectionsDesc, prometheus.CounterValue, float64(st.Rejections), st.Source)
	}
}
