package outbound

import (
	"context"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/policy"
	"github.com/sidecar-mesh/sidecar/pkg/requestlog"
)

// BenchmarkHotPath is the per-request bookkeeping of the resilience chain
// without any I/O: budget count, breaker allow and record, a round-robin
// pick that skips ejected endpoints, and the outlier record.
func BenchmarkHotPath(b *testing.B) {
	p := policy.Effective("svc", nil)
	set := &discovery.EndpointSet{Service: "svc", Endpoints: []discovery.Endpoint{{Addr: "10.0.0.1:80"}, {Addr: "10.0.0.2:80"}, {Addr: "10.0.0.3:80"}}}
	r := &stateRegistry{observer: NopObserver{}}
	st := r.get("svc", &p)
	bal := newBalancer(set, set.Endpoints, p.LoadBalancer, &st.endpoints, time.Now(), true, nil)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			now := time.Now()
			st.budget.request(now)
			done, err := st.breaker.Load().Allow()
			if err != nil {
				b.Fatal(err)
			}
			i := bal.pick(&st.outliers, nil, now)
			st.outliers.record(bal.eps[i].Addr, false, set, p.OutlierDetection, now)
			done(nil)
		}
	})
}

// BenchmarkChain is one request through the resilience and pick layers to
// a transport that answers at once: what the chain costs a request, its
// allocations included, with the failure recorder on as the sidecar runs
// it (nobody tapping).
func BenchmarkChain(b *testing.B) {
	static, _ := discovery.NewStatic(map[string][]string{"svc": {"10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"}})
	resp := &http.Response{StatusCode: 200, Header: http.Header{}}
	states := &stateRegistry{observer: NopObserver{}}
	rec := requestlog.New(requestlog.Config{})
	b.Cleanup(rec.Close)
	ch := &chain{policies: NewStaticPolicies(nil), states: states, observer: NopObserver{}, maxInFlight: DefaultMaxInFlight, recorder: rec,
		send: func(*http.Request, time.Duration) (*http.Response, error) {
			r := *resp
			r.Body = io.NopCloser(strings.NewReader(""))
			return &r, nil
		}}
	rt := rtFunc(func(req *http.Request) (*http.Response, error) {
		set, err := static.Resolve(req.Context(), "svc")
		if err != nil {
			return nil, err
		}
		return ch.do(ch.open("svc", set), req)
	})
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		req, _ := http.NewRequestWithContext(context.Background(), "GET", "http://svc/", nil)
		for pb.Next() {
			resp, err := rt.RoundTrip(req)
			if err != nil {
				b.Fatal(err)
			}
			_ = resp.Body.Close()
		}
	})
}
