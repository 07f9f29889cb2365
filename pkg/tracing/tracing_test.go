package tracing

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
	"unicode/utf8"

	"go.uber.org/goleak"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// blockingExporter holds every export until released, or fails them.
type blockingExporter struct {
	mu      sync.Mutex
	release chan struct{}
	fail    bool
	got     int
}

func (e *blockingExporter) ExportSpans(ctx context.Context, spans []sdktrace.ReadOnlySpan) error {
	<-e.release
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.fail {
		return errors.New("collector down")
	}
	e.got += len(spans)
	return nil
}

func (e *blockingExporter) Shutdown(context.Context) error { return nil }

// A full queue drops spans without blocking the caller, and counts them;
// so does a failed export.
func TestExportQueueCountsDrops(t *testing.T) {
	exp := &blockingExporter{release: make(chan struct{})}
	q := newExportQueue(exp, 10, slog.New(slog.NewTextHandler(io.Discard, nil)))
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(q), sdktrace.WithSampler(sdktrace.AlwaysSample()))
	tr := tp.Tracer("test")
	for range 600 { // the exporter is held: what the batch and the queue can't take drops
		_, span := tr.Start(context.Background(), "s")
		span.End()
	}
	if d := q.dropped.Load(); d == 0 || d > 600-10 {
		t.Fatalf("%d of 600 spans dropped with a held exporter and a queue of 10, want some but not all", d)
	}
	exp.mu.Lock()
	exp.fail = true
	exp.mu.Unlock()
	close(exp.release)
	if err := tp.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	if q.dropped.Load()+q.exported.Load() != 600 {
		t.Fatalf("dropped %d + exported %d, want all 600 spans accounted for", q.dropped.Load(), q.exported.Load())
	}
	// Unsampled spans never reach the queue.
	exp2 := &blockingExporter{release: make(chan struct{})}
	close(exp2.release)
	q2 := newExportQueue(exp2, 10, slog.New(slog.DiscardHandler))
	tp2 := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(q2), sdktrace.WithSampler(sdktrace.NeverSample()))
	_, span := tp2.Tracer("test").Start(context.Background(), "s")
	span.End()
	if err := tp2.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	if q2.dropped.Load()+q2.exported.Load() != 0 {
		t.Fatal("an unsampled span was queued")
	}
}

func TestSetupValidates(t *testing.T) {
	p, err := Setup(context.Background(), Config{})
	if err != nil || p.Enabled() || p.Dropped() != 0 {
		t.Fatalf("no endpoint: %v %v, want tracing off", p, err)
	}
	for _, cfg := range []Config{
		{Endpoint: "127.0.0.1:1", Sampler: "sometimes"},
		{Endpoint: "127.0.0.1:1", SamplerArg: 2},
		{Endpoint: "127.0.0.1:1", Protocol: "thrift"},
		{Endpoint: "127.0.0.1:1", Propagators: []string{"smoke-signals"}},
		{Endpoint: "http://user:SECRETPW@bad host:4317/?token=SECRETQ"},
		{Endpoint: "ftp://collector:4317"},
		{Endpoint: "collector"},
	} {
		_, err := Setup(context.Background(), cfg)
		if err == nil {
			t.Errorf("Setup(%+v) accepted", cfg)
		} else if strings.Contains(err.Error(), "SECRET") {
			t.Errorf("Setup(%+v): %v, quoting a secret of the endpoint", cfg, err)
		}
	}
	p, err = Setup(context.Background(), Config{Endpoint: "127.0.0.1:1", Propagators: []string{"b3", "tracecontext"}, Service: "orders"})
	if err != nil || !p.Enabled() {
		t.Fatalf("valid config: %v", err)
	}
	if err := p.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// A Shutdown whose deadline passes while an export hangs returns, cuts the
// export short and leaves no goroutine behind (goleak checks). In a
// testing/synctest bubble: the deadline is virtual.
func TestShutdownBounded(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		exp := &hangingExporter{}
		q := newExportQueue(exp, 10, slog.New(slog.DiscardHandler))
		tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(q), sdktrace.WithSampler(sdktrace.AlwaysSample()))
		_, span := tp.Tracer("test").Start(context.Background(), "s")
		span.End()
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		start := time.Now()
		if err := tp.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Shutdown with a hanging collector: %v, want the deadline", err)
		}
		if took := time.Since(start); took != 50*time.Millisecond {
			t.Fatalf("Shutdown with a hanging collector returned after %v, want its 50ms deadline", took)
		}
		if q.dropped.Load() != 1 || !exp.shut.Load() {
			t.Fatalf("dropped %d, exporter shut %v; want the span dropped and the exporter closed", q.dropped.Load(), exp.shut.Load())
		}
	})
}

// hangingExporter never finishes an export before its context ends.
type hangingExporter struct{ shut atomic.Bool }

func (e *hangingExporter) ExportSpans(ctx context.Context, _ []sdktrace.ReadOnlySpan) error {
	<-ctx.Done()
	return ctx.Err()
}
func (e *hangingExporter) Shutdown(context.Context) error { e.shut.Store(true); return nil }

func TestText(t *testing.T) {
	if got := Text("Serv\xffce " + strings.Repeat("a", 300)); !utf8.ValidString(got) || len(got) > MaxText {
		t.Errorf("Text kept %d bytes, valid UTF-8 %v", len(got), utf8.ValidString(got))
	}
}
