package main

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/sidecar-mesh/sidecar/internal/faultserver"
	"github.com/sidecar-mesh/sidecar/pkg/policy"
)

// slowUpstream answers 200 after the duration in its ?sleep= query.
func slowUpstream(t *testing.T) string {
	t.Helper()
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		d, _ := time.ParseDuration(r.URL.Query().Get("sleep"))
		select {
		case <-time.After(d):
		case <-r.Context().Done():
		}
		io.WriteString(w, "ok")
	}))
	t.Cleanup(up.Close)
	return strings.TrimPrefix(up.URL, "http://")
}

// callSlow calls service through the sidecar at out, asking its upstream
// to take sleep; it returns the status and the sidecar's error reason.
func callSlow(c *http.Client, out, service string, sleep time.Duration) (int, string) {
	req, _ := http.NewRequest("GET", "http://"+out+"/?sleep="+sleep.String(), nil)
	req.Host = service
	resp, err := c.Do(req)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	return resp.StatusCode, resp.Header.Get("X-Sidecar-Error")
}

// policyStatus reads GET /policies/{service} from the admin API.
func policyStatus(t *testing.T, admin, service string) policy.Status {
	t.Helper()
	resp, err := http.Get("http://" + admin + "/policies/" + service)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var st policy.Status
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil || resp.StatusCode != 200 {
		t.Fatalf("GET /policies/%s: %d %v", service, resp.StatusCode, err)
	}
	return st
}

// metricValue reads one sample (the name with its labels, as exposed)
// from the metrics endpoint.
func metricValue(t *testing.T, metrics, sample string) float64 {
	t.Helper()
	for _, line := range strings.Split(fetch(t, "http://"+metrics+"/metrics"), "\n") {
		if v, ok := strings.CutPrefix(line, sample+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("metric line %q: %v", line, err)
			}
			return f
		}
	}
	t.Fatalf("/metrics has no sample %s", sample)
	return 0
}

// eventually polls cond until it holds, for up to 10 s; cond returns what
// it saw, for the failure message.
func eventually(t *testing.T, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		ok, saw := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 10s; last saw %s", what, saw)
		}
		time.Sleep(20 * time.Millisecond) // polling the sidecar from outside, not on a request path
	}
}

// The policy file is reloaded on an atomic rename and on an edit in place;
// a bad edit is rejected with its field path (logged, counted, shown in
// /policies) and the last good file stays in force, also once the file is
// deleted.
func TestPolicyFileHotReload(t *testing.T) {
	up := slowUpstream(t)
	dir := t.TempDir()
	path := filepath.Join(dir, "policies.yaml")
	write := func(content string) {
		t.Helper()
		if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("service: svc\ntimeout: 5s\n")
	rs := runSidecar(t, "discovery: {static: {svc: ["+up+"]}}\npolicyFile: "+path+"\n")
	out, admin, metrics := rs.out, rs.admin, rs.metrics
	c := &http.Client{Timeout: 10 * time.Second}
	if code, reason := callSlow(c, out, "svc", 300*time.Millisecond); code != 200 {
		t.Fatalf("300ms upstream under a 5s timeout: %d %q, want 200", code, reason)
	}

	// Atomic rename, as editors and ConfigMap updates do.
	renamed := "service: svc\ntimeout: 100ms\n"
	tmp := filepath.Join(dir, ".policies.yaml.tmp")
	if err := os.WriteFile(tmp, []byte(renamed), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
	eventually(t, "a 100ms timeout renamed into place enforced", func() (bool, string) {
		code, reason := callSlow(c, out, "svc", 300*time.Millisecond)
		return code == 504 && reason == "upstream_timeout", strconv.Itoa(code) + " " + reason
	})
	if st := policyStatus(t, admin, "svc"); st.Source != "file:"+path || st.Version != policy.ContentVersion([]byte(renamed)) {
		t.Fatalf("/policies/svc: source %q version %q; want file:%s version %s", st.Source, st.Version, path, policy.ContentVersion([]byte(renamed)))
	}

	// An edit in place.
	edited := "service: svc\ntimeout: 2s\n"
	write(edited)
	eventually(t, "a 2s timeout edited in place enforced", func() (bool, string) {
		code, reason := callSlow(c, out, "svc", 300*time.Millisecond)
		return code == 200, strconv.Itoa(code) + " " + reason
	})

	// A bad edit: rejected, shown, counted; the 2s timeout stays.
	bad := "service: svc\ntimeout: 50ms\nretry: {attempts: 0}\n"
	write(bad)
	eventually(t, "the bad edit shown in /policies", func() (bool, string) {
		st := policyStatus(t, admin, "svc")
		return st.LastRejection != nil, "no lastRejection"
	})
	st := policyStatus(t, admin, "svc")
	if r := st.LastRejection; r.Source != "file:"+path || r.Version != policy.ContentVersion([]byte(bad)) ||
		!strings.Contains(r.Error, path+":1: document 1: retry.attempts: 0 is not allowed (allowed: 1 to 10)") {
		t.Fatalf("lastRejection %+v; want the file, the bad content's version and the field path", r)
	}
	if st.Version != policy.ContentVersion([]byte(edited)) || st.Effective.Timeout.D() != 2*time.Second {
		t.Fatalf("after a rejected edit: version %q timeout %v; want the last good file (%s, 2s)", st.Version, st.Effective.Timeout, policy.ContentVersion([]byte(edited)))
	}
	if code, reason := callSlow(c, out, "svc", 300*time.Millisecond); code != 200 {
		t.Fatalf("after a rejected edit: %d %q, want 200 under the last good 2s timeout", code, reason)
	}
	for sample, want := range map[string]float64{
		`sidecar_policy_reloads_total{source="file"}`:      3, // startup, rename, edit
		`sidecar_policy_rejections_total{source="file"}`:   1,
		`sidecar_policy_reloads_total{source="inline"}`:    1,
		`sidecar_policy_rejections_total{source="consul"}`: 0,
	} {
		if got := metricValue(t, metrics, sample); got != want {
			t.Errorf("%s = %v, want %v", sample, got, want)
		}
	}

	// The file deleted: the last good policy stays.
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if code, reason := callSlow(c, out, "svc", 300*time.Millisecond); code != 200 {
		t.Fatalf("after the file was deleted: %d %q, want 200 under the last good 2s timeout", code, reason)
	}
	write(renamed)
	eventually(t, "the file back with a 100ms timeout", func() (bool, string) {
		code, reason := callSlow(c, out, "svc", 300*time.Millisecond)
		return code == 504, strconv.Itoa(code) + " " + reason
	})
}

// putKV writes a policy key and returns its ModifyIndex.
func putKV(t *testing.T, c *api.Client, service, value string) uint64 {
	t.Helper()
	key := policy.KVKey(service)
	if _, err := c.KV().Put(&api.KVPair{Key: key, Value: []byte(value)}, nil); err != nil {
		t.Fatalf("put %s: %v", key, err)
	}
	p, _, err := c.KV().Get(key, nil)
	if err != nil || p == nil {
		t.Fatalf("get %s: %v", key, err)
	}
	return p.ModifyIndex
}

// A policy put in Consul KV is enforced by a running sidecar within 1 s;
// an invalid value is rejected and the old policy stays; with Consul
// stopped the policies stay.
func TestPolicyConsulKV(t *testing.T) {
	up := slowUpstream(t)
	cs := startConsulSidecar(t, "--static", "svc="+up)
	cs.until(t, "svc", "sidecar serving", 10*time.Second, func(string) bool { return true })
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 200}}
	defer c.CloseIdleConnections()

	// Requests start every 10 ms while the policy goes in; the first one
	// cut at 100 ms bounds the propagation time.
	type result struct {
		start  time.Time
		reason string
	}
	results := make(chan result, 1000)
	var inFlight sync.WaitGroup
	t0 := time.Now()
	// (The breaker must not open on all these timeouts.)
	index := putKV(t, cs.consul, "svc", "timeout: 100ms\ncircuitBreaker: {consecutiveFailures: 100000, minRequests: 1000000}\n")
	putDone := time.Since(t0)
	var first time.Time
	tick := time.NewTicker(10 * time.Millisecond)
	for first.IsZero() && time.Since(t0) < 5*time.Second {
		inFlight.Add(1)
		go func(start time.Time) {
			defer inFlight.Done()
			_, reason := callSlow(c, cs.out, "svc", 300*time.Millisecond)
			results <- result{start, reason}
		}(time.Now())
		<-tick.C
	drain:
		for {
			select {
			case r := <-results:
				if r.reason == "upstream_timeout" && (first.IsZero() || r.start.Before(first)) {
					first = r.start
				}
			default:
				break drain
			}
		}
	}
	tick.Stop()
	inFlight.Wait()
	close(results)
	for r := range results {
		if r.reason == "upstream_timeout" && (first.IsZero() || r.start.Before(first)) {
			first = r.start
		}
	}
	if first.IsZero() {
		t.Fatal("the 100ms timeout put in Consul KV was not enforced within 5s")
	}
	propagation := first.Sub(t0)
	t.Logf("KV put (%v) to the first request enforcing it: %v", putDone.Round(time.Millisecond), propagation.Round(time.Millisecond))
	if propagation >= time.Second {
		t.Fatalf("the new timeout was enforced %v after the KV put, want < 1s", propagation)
	}
	if st := policyStatus(t, cs.adm, "svc"); st.Source != "consul:sidecar/policies/svc" || st.Version != strconv.FormatUint(index, 10) {
		t.Fatalf("/policies/svc: source %q version %q; want consul:sidecar/policies/svc version %d", st.Source, st.Version, index)
	}

	// An invalid value: rejected, shown and counted; 100ms stays. Another
	// service's good key in the same moment is taken.
	badIndex := putKV(t, cs.consul, "svc", "timeout: 5s\nretry: {attempts: 0}\n")
	otherIndex := putKV(t, cs.consul, "other", `{"timeout": "3s"}`)
	eventually(t, "the invalid value shown in /policies", func() (bool, string) {
		r := policyStatus(t, cs.adm, "svc").LastRejection
		return r != nil && r.Version == strconv.FormatUint(badIndex, 10), "lastRejection " + strconv.Quote(strings.TrimSpace(func() string {
			if r == nil {
				return ""
			}
			return r.Version + " " + r.Error
		}()))
	})
	st := policyStatus(t, cs.adm, "svc")
	if !strings.Contains(st.LastRejection.Error, "retry.attempts: 0 is not allowed (allowed: 1 to 10)") || st.Version != strconv.FormatUint(index, 10) {
		t.Fatalf("after an invalid value: version %q, rejection %+v; want version %d in force and the field path", st.Version, st.LastRejection, index)
	}
	if code, reason := callSlow(c, cs.out, "svc", 300*time.Millisecond); code != 504 || reason != "upstream_timeout" {
		t.Fatalf("after an invalid value: %d %q, want 504 upstream_timeout under the 100ms still in force", code, reason)
	}
	eventually(t, "the other service's key taken", func() (bool, string) {
		st := policyStatus(t, cs.adm, "other")
		return st.Version == strconv.FormatUint(otherIndex, 10), "version " + st.Version
	})
	if got := metricValue(t, cs.metrics, `sidecar_policy_rejections_total{source="consul"}`); got != 1 {
		t.Fatalf("sidecar_policy_rejections_total{source=\"consul\"} = %v, want 1", got)
	}

	// Consul gone: the policies stay.
	cs.agent.Stop()
	for i := range 5 {
		if code, reason := callSlow(c, cs.out, "svc", 300*time.Millisecond); code != 504 || reason != "upstream_timeout" {
			t.Fatalf("call %d with Consul stopped: %d %q, want the 100ms timeout still enforced", i, code, reason)
		}
	}
	if st := policyStatus(t, cs.adm, "svc"); st.Source != "consul:sidecar/policies/svc" || st.Effective.Timeout.D() != 100*time.Millisecond {
		t.Fatalf("with Consul stopped: %s %v, want the KV policy still in force", st.Source, st.Effective.Timeout)
	}
}

// 100 policy updates through Consul KV while four clients call through the
// sidecar: not one request fails. The upstream takes 5 ms, so that
// requests are in flight across the swaps.
func TestPolicyReloadsUnderLoad(t *testing.T) {
	up := faultserver.New(t, faultserver.Faults{Latency: 5 * time.Millisecond})
	cs := startConsulSidecar(t, "--static", "svc="+up.Addr())
	cs.until(t, "svc", "sidecar serving", 10*time.Second, func(string) bool { return true })
	base := up.Requests()

	ctx, stop := context.WithCancel(context.Background())
	var ok, failed atomic.Int64
	var firstFailure atomic.Pointer[string]
	var clients sync.WaitGroup
	nClients := chaosSize(4, 16) // the fault suite's policy-reload scenario
	for range nClients {
		clients.Add(1)
		go func() {
			defer clients.Done()
			c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{}}
			defer c.CloseIdleConnections()
			for ctx.Err() == nil {
				code, reason := callSlow(c, cs.out, "svc", 0)
				if code == 200 {
					ok.Add(1)
					continue
				}
				failed.Add(1)
				msg := strconv.Itoa(code) + " " + reason
				firstFailure.CompareAndSwap(nil, &msg)
			}
		}()
	}
	start := time.Now()
	for i := 1; i <= 100; i++ {
		doc := "timeout: " + strconv.Itoa(1000+i) + "ms\nretry: {attempts: " + strconv.Itoa(1+i%3) + "}\n"
		if i%10 == 0 { // every tenth update also replaces the breaker
			doc += "circuitBreaker: {openDuration: " + strconv.Itoa(10+i) + "s}\n"
		}
		index := strconv.FormatUint(putKV(t, cs.consul, "svc", doc), 10)
		eventually(t, "update "+strconv.Itoa(i)+" in force", func() (bool, string) {
			st := policyStatus(t, cs.adm, "svc")
			return st.Version == index, "version " + st.Version + ", want " + index
		})
	}
	took := time.Since(start)
	stop()
	clients.Wait()
	chaosFigure(t, "policy reloads", "100 Consul KV updates in %v under %d clients: %d requests, lost %d",
		took.Round(time.Millisecond), nClients, ok.Load()+failed.Load(), failed.Load())
	if n := failed.Load(); n != 0 {
		t.Fatalf("%d of %d requests failed during 100 policy reloads, want 0 (first: %s)", n, n+ok.Load(), *firstFailure.Load())
	}
	if ok.Load() < 100 {
		t.Fatalf("only %d requests during 100 reloads: the load was not steady", ok.Load())
	}
	if got := up.Requests() - base; got != ok.Load() {
		t.Fatalf("the upstream saw %d requests, the clients got %d answers: want the same", got, ok.Load())
	}
	if got := metricValue(t, cs.metrics, `sidecar_policy_reloads_total{source="consul"}`); got != 100 {
		t.Fatalf("sidecar_policy_reloads_total{source=\"consul\"} = %v, want 100", got)
	}
	if got := metricValue(t, cs.metrics, `sidecar_policy_rejections_total{source="consul"}`); got != 0 {
		t.Fatalf("sidecar_policy_rejections_total{source=\"consul\"} = %v, want 0", got)
	}
}
