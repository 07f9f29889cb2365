package discovery_test

import (
	"context"
	"fmt"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/sidecar-mesh/sidecar/internal/consultest"
	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/policy"
)

// The storm benchmarks measure the CPU that following a fast-changing
// Consul costs: the process's CPU time (getrusage) over b.N changes at a
// fixed rate against a real agent, minus that of the same changes with
// nothing following them. Run one at a time, e.g.
//
//	go test -run '^$' -bench Storm -benchtime 300x ./pkg/discovery/

// cpuTime is the user and system CPU time of this process so far.
func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// storm makes n changes, perSecond a second, and returns the CPU time the
// process spent meanwhile (and for settle after the last change).
func storm(b *testing.B, n, perSecond int, settle time.Duration, change func(i int)) time.Duration {
	tick := time.NewTicker(time.Second / time.Duration(perSecond))
	defer tick.Stop()
	start := cpuTime(b)
	for i := range n {
		<-tick.C
		change(i)
	}
	time.Sleep(settle)
	return cpuTime(b) - start
}

// reportStorm reports the CPU of the follower per change and as a share of
// one core at the storm's rate.
func reportStorm(b *testing.B, with, without time.Duration, perSecond int) {
	extra := max(with-without, 0)
	perChange := extra / time.Duration(b.N)
	b.ReportMetric(float64(perChange.Microseconds())/1000, "cpu-ms/change")
	b.ReportMetric(100*perChange.Seconds()*float64(perSecond), "%core")
	b.ReportMetric(0, "ns/op")
}

// BenchmarkPolicyKVStorm: one of 200 policy keys written 100 times a
// second, followed by the policy watch pushing into a real policy.Store.
func BenchmarkPolicyKVStorm(b *testing.B) {
	const keys, perSecond = 200, 100
	agent := consultest.Start(b)
	c := client(b, agent)
	doc := func(i int) []byte {
		return fmt.Appendf(nil, "timeout: %dms\nretry: {attempts: 3, perTryTimeout: 300ms, on: [connect-failure, reset, 503]}\n"+
			"circuitBreaker: {consecutiveFailures: 5, failureRatio: 0.5, minRequests: 20, window: 10s, openDuration: 30s}\n"+
			"outlierDetection: {consecutiveFailures: 5, ejectionTime: 30s, maxEjectionPercent: 50}\n", 1000+i)
	}
	for i := range keys {
		if _, err := c.KV().Put(&api.KVPair{Key: policy.KVKey(fmt.Sprintf("svc-%03d", i)), Value: doc(i)}, nil); err != nil {
			b.Fatal(err)
		}
	}
	write := func(i int) {
		if _, err := c.KV().Put(&api.KVPair{Key: policy.KVKey("svc-000"), Value: doc(i % 2)}, nil); err != nil {
			b.Fatal(err)
		}
	}
	b.ResetTimer()
	without := storm(b, b.N, perSecond, 200*time.Millisecond, write)

	store := policy.NewStore(policy.StoreOptions{})
	w, err := discovery.WatchPolicies(discovery.PolicyWatchConfig{Client: c}, func(docs map[string]policy.KVDocument) { _ = store.SetConsul(docs) })
	if err != nil {
		b.Fatal(err)
	}
	defer w.Close()
	<-w.Synced()
	with := storm(b, b.N, perSecond, 200*time.Millisecond, write)
	b.StopTimer()
	reportStorm(b, with, without, perSecond)
}

// BenchmarkEndpointStorm: one of 100 instances of a service in use whose
// check flips 70 times a second.
func BenchmarkEndpointStorm(b *testing.B) {
	const instances, perSecond = 100, 70
	agent := consultest.Start(b)
	c := client(b, agent)
	for i := range instances {
		reg := &api.AgentServiceRegistration{ID: fmt.Sprintf("web-%03d", i), Name: "web", Port: 8080,
			Address: fmt.Sprintf("10.1.%d.%d", i/250, i%250+1), Tags: []string{"v1", "blue"},
			Meta:  map[string]string{"version": "1.2.3", "zone": "eu-west-1a"},
			Check: &api.AgentServiceCheck{CheckID: fmt.Sprintf("web-%03d-ttl", i), TTL: "10m", Status: api.HealthPassing}}
		if err := c.Agent().ServiceRegister(reg); err != nil {
			b.Fatal(err)
		}
	}
	flip := func(i int) {
		status := api.HealthCritical
		if i%2 == 1 {
			status = api.HealthPassing
		}
		if err := c.Agent().UpdateTTL("web-000-ttl", "", status); err != nil {
			b.Fatal(err)
		}
	}
	b.ResetTimer()
	without := storm(b, b.N, perSecond, 200*time.Millisecond, flip)

	d, err := discovery.NewConsul(discovery.ConsulConfig{Client: c})
	if err != nil {
		b.Fatal(err)
	}
	defer d.Close()
	if set, err := d.Resolve(context.Background(), "web"); err != nil || len(set.Endpoints) < instances-1 {
		b.Fatalf("Resolve(web) = %v, %v; want %d endpoints", set, err, instances)
	}
	with := storm(b, b.N, perSecond, 200*time.Millisecond, flip)
	b.StopTimer()
	reportStorm(b, with, without, perSecond)
}
