package tracing

import (
	"github.com/sidecar-mesh/sidecar/pkg/panics"

	"context"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
)

// exportQueue is the span processor: a bounded queue drained by one
// goroutine that exports batches. It is written here rather than taken from
// the SDK because the SDK's BatchSpanProcessor drops spans on a full queue
// without telling anyone, and the sidecar must count what it drops
// (sidecar_tracing_dropped_spans_total). OnEnd never blocks: a full queue
// or a collector that refuses a batch drops spans, never a request.
type exportQueue struct {
	exporter sdktrace.SpanExporter
	log      *slog.Logger
	spans    chan sdktrace.ReadOnlySpan
	flush    chan chan struct{}
	stop     chan struct{}
	done     chan struct{}
	stopOnce sync.Once
	// ctx bounds every export; Shutdown cancels it when its own deadline
	// passes, so that no export outlives it.
	ctx    context.Context
	cancel context.CancelFunc

	dropped  atomic.Uint64
	exported atomic.Uint64
	lastWarn atomic.Int64 // unix seconds of the last export failure logged
}

const (
	batchSize     = 512
	batchInterval = time.Second
	exportTimeout = 5 * time.Second
)

var _ sdktrace.SpanProcessor = (*exportQueue)(nil)

func newExportQueue(exp sdktrace.SpanExporter, size int, log *slog.Logger) *exportQueue {
	if size <= 0 {
		size = 4096
	}
	q := &exportQueue{exporter: exp, log: log, spans: make(chan sdktrace.ReadOnlySpan, size),
		flush: make(chan chan struct{}), stop: make(chan struct{}), done: make(chan struct{})}
	q.ctx, q.cancel = context.WithCancel(context.Background())
	go func() {
		defer close(q.done)
		panics.Run(q.ctx, "tracing.export", func(context.Context) { q.run() })
	}()
	return q
}

func (q *exportQueue) OnStart(context.Context, sdktrace.ReadWriteSpan) {}

func (q *exportQueue) OnEnd(s sdktrace.ReadOnlySpan) {
	if !s.SpanContext().IsSampled() {
		return
	}
	select {
	case q.spans <- s:
	default:
		q.dropped.Add(1)
	}
}

func (q *exportQueue) run() {
	tick := time.NewTicker(batchInterval)
	defer tick.Stop()
	batch := make([]sdktrace.ReadOnlySpan, 0, batchSize)
	for {
		select {
		case s := <-q.spans:
			if batch = append(batch, s); len(batch) == batchSize {
				batch = q.export(batch)
			}
		case <-tick.C:
			batch = q.export(batch)
		case ack := <-q.flush:
			batch = q.export(q.drain(batch))
			close(ack)
		case <-q.stop:
			q.export(q.drain(batch))
			return
		}
	}
}

// drain adds every queued span to batch, exporting full batches on the way.
func (q *exportQueue) drain(batch []sdktrace.ReadOnlySpan) []sdktrace.ReadOnlySpan {
	for {
		select {
		case s := <-q.spans:
			if batch = append(batch, s); len(batch) == batchSize {
				batch = q.export(batch)
			}
		default:
			return batch
		}
	}
}

// export sends batch and returns it emptied for reuse.
func (q *exportQueue) export(batch []sdktrace.ReadOnlySpan) []sdktrace.ReadOnlySpan {
	if len(batch) == 0 {
		return batch
	}
	ctx, cancel := context.WithTimeout(q.ctx, exportTimeout)
	err := q.exporter.ExportSpans(ctx, batch)
	cancel()
	if err != nil {
		q.dropped.Add(uint64(len(batch)))
		if now := time.Now().Unix(); now-q.lastWarn.Load() >= 60 {
			q.lastWarn.Store(now)
			q.log.Warn("spans dropped: the collector did not take them", "spans", len(batch), "err", err.Error())
		}
	} else {
		q.exported.Add(uint64(len(batch)))
	}
	clear(batch)
	return batch[:0]
}

// ForceFlush exports everything queued now.
func (q *exportQueue) ForceFlush(ctx context.Context) error {
	ack := make(chan struct{})
	select {
	case q.flush <- ack:
	case <-q.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case <-ack:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Shutdown exports what is queued and shuts the exporter down, within ctx:
// when ctx ends first, the exports in progress are cut short (their spans
// count as dropped) and the exporter is closed all the same.
func (q *exportQueue) Shutdown(ctx context.Context) error {
	q.stopOnce.Do(func() { close(q.stop) })
	var err error
	select {
	case <-q.done:
	case <-ctx.Done():
		err = ctx.Err()
		q.cancel()
		<-q.done
	}
	q.cancel()
	sctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if ctx.Err() == nil {
		sctx = ctx
	}
	return errors.Join(err, q.exporter.Shutdown(sctx))
}
