package metrics

import (
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestRequests(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := NewRequests(reg)
	m.For(Outbound, "users", "GET").Done(200, time.Millisecond, "")
	m.For(Outbound, "users", "GET").Done(503, time.Millisecond, "")
	m.For(Outbound, "users", "get").Done(404, time.Millisecond, "0af7651916cd43dd8448eb211c80319c")
	m.For(Inbound, "app", "BREW").Done(999, time.Second, "")
	m.Rejected(Outbound, "unknown_service")
	for _, c := range []struct {
		labels []string
		want   float64
	}{{[]string{"outbound", "users", "GET", "2xx"}, 1}, {[]string{"outbound", "users", "GET", "5xx"}, 1},
		{[]string{"outbound", "users", "other", "4xx"}, 1}, {[]string{"inbound", "app", "other", "other"}, 1}} {
		if got := value(m.total.WithLabelValues(c.labels...)); got != c.want {
			t.Errorf("requests_total%v = %v, want %v", c.labels, got, c.want)
		}
	}
	if got := value(m.rejected.WithLabelValues(Outbound, "unknown_service")); got != 1 {
		t.Errorf("rejected = %v, want 1", got)
	}
	var nilM *Requests
	nilM.For(Outbound, "x", "GET").Done(200, 0, "") // a nil *Requests records nothing, without panicking
	nilM.Rejected(Outbound, "x")
}

func value(c prometheus.Counter) float64 {
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		panic(err)
	}
	return m.GetCounter().GetValue()
}

func BenchmarkFor(b *testing.B) {
	m := NewRequests(prometheus.NewRegistry())
	b.ReportAllocs()
	for b.Loop() {
		m.For(Outbound, "users", "GET").Done(200, time.Millisecond, "")
	}
}
