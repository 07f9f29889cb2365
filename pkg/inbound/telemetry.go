package inbound

import (
	"cmp"
	"net/http"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"

	"github.com/sidecar-mesh/sidecar/pkg/metrics"
	"github.com/sidecar-mesh/sidecar/pkg/tracing"
)

// Telemetry is the Observer that makes a server span for each inbound
// request, under the caller's trace context, hands the app that span's
// context in the trace headers, and records the request metrics
// (direction=inbound). A nil tracer makes no spans; nil metrics record
// nothing. Safe for concurrent use.
type Telemetry struct {
	tracer  trace.Tracer
	prop    propagation.TextMapPropagator
	fields  []string // prop's headers (tracing.Fields)
	metrics *metrics.Requests
	service string
}

var _ Observer = (*Telemetry)(nil)

// NewTelemetry returns the inbound Observer for the app named service.
func NewTelemetry(tracer trace.Tracer, prop propagation.TextMapPropagator, m *metrics.Requests, service string) *Telemetry {
	if service == "" {
		service = "app"
	}
	return &Telemetry{tracer: tracer, prop: prop, fields: tracing.Fields(prop), metrics: m, service: service}
}

// serverSpan is the start option of the server spans, made once.
var serverSpan = trace.WithSpanKind(trace.SpanKindServer)

// Start implements Observer.
func (t *Telemetry) Start(r *http.Request) *http.Request {
	if t.tracer == nil {
		return r
	}
	ctx := t.prop.Extract(r.Context(), tracing.HeaderCarrier(r.Header))
	// A span not sampled drops its name: it is built only for the sampled.
	ctx, span := t.tracer.Start(ctx, "request", serverSpan)
	if span.IsRecording() {
		span.SetName(tracing.Text(r.Method + " " + t.service))
		// What the peer wrote is escaped and cut (tracing.Text says why).
		span.SetAttributes(tracing.String("http.request.method", r.Method),
			tracing.String("url.path", r.URL.EscapedPath()), attribute.String("sidecar.direction", metrics.Inbound))
	}
	tracing.Replace(t.prop, t.fields, ctx, r.Header)
	return r.WithContext(ctx)
}

// End implements Observer.
func (t *Telemetry) End(r *http.Request, res Result) {
	traceID := ""
	if t.tracer != nil {
		span := trace.SpanFromContext(r.Context())
		if sc := span.SpanContext(); sc.IsSampled() {
			traceID = sc.TraceID().String()
		}
		if span.IsRecording() {
			span.SetAttributes(attribute.Int("http.response.status_code", res.Status))
			if res.Reason != "" {
				span.SetAttributes(attribute.String("sidecar.error", res.Reason))
			}
			if res.Status >= 500 || res.Reason != "" || res.Aborted {
				span.SetStatus(codes.Error, tracing.Text(cmp.Or(res.Reason, http.StatusText(res.Status))))
			}
		}
		span.End()
	}
	series := t.metrics.For(metrics.Inbound, t.service, r.Method)
	series.Done(res.Status, res.Duration, traceID)
	series.GRPC(res.GRPCStatus)
}
