package outbound

import (
	"cmp"
	"io"
	"net/http"
	"sync"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"

	"github.com/sidecar-mesh/sidecar/pkg/metrics"
	"github.com/sidecar-mesh/sidecar/pkg/tracing"
)

// telemetryLayer is the chain's first layer: the request's client span,
// under the trace context the app sent (if any), and its metrics. The
// attempts below get their own spans (pickLayer). Local errors of the chain
// (circuit_open, no_healthy_endpoints, overloaded, upstream_timeout) end
// the span with an error status and their reason.
type telemetryLayer struct {
	tracer  trace.Tracer // nil: no spans
	prop    propagation.TextMapPropagator
	metrics *metrics.Requests // nil: no request metrics
	next    http.RoundTripper
}

var _ http.RoundTripper = (*telemetryLayer)(nil)

func (l *telemetryLayer) RoundTrip(req *http.Request) (*http.Response, error) {
	service := req.URL.Host
	series := l.metrics.For(metrics.Outbound, service, req.Method)
	start := time.Now()
	var span trace.Span
	if l.tracer != nil {
		ctx := l.prop.Extract(req.Context(), tracing.HeaderCarrier(req.Header))
		// A span not sampled drops its name: it is built only for the
		// sampled ones.
		ctx, span = l.tracer.Start(ctx, "request", clientSpan)
		if span.IsRecording() {
			span.SetName(req.Method + " " + service)
			span.SetAttributes(attribute.String("sidecar.service", service),
				attribute.String("http.request.method", req.Method),
				attribute.String("url.path", req.URL.Path),
				attribute.String("network.protocol.version", protoVersion(req)))
		}
		req = req.WithContext(ctx)
	}
	resp, err := l.next.RoundTrip(req)
	if err != nil {
		e := errorFor(service, err)
		endRequest(span, series, start, e.Status, e.Reason, e.Error())
		return nil, err
	}
	if series == nil && span == nil {
		return resp, nil
	}
	if resp.StatusCode == http.StatusSwitchingProtocols {
		endRequest(span, series, start, resp.StatusCode, "", "")
		return resp, nil
	}
	resp.Body = &telemetryBody{ReadCloser: resp.Body, span: span, series: series, start: start, resp: resp}
	return resp, nil
}

// clientSpan is the start option of the client spans, made once.
var clientSpan = trace.WithSpanKind(trace.SpanKindClient)

func protoVersion(req *http.Request) string {
	if req.ProtoMajor == 2 {
		return "2"
	}
	return "1.1"
}

// endRequest records a finished request: its metrics, and its span's
// status (an error for 5xx, with the sidecar's reason when it answered
// itself).
func endRequest(span trace.Span, series *metrics.Series, start time.Time, status int, reason, detail string) {
	traceID := ""
	if span != nil {
		if sc := span.SpanContext(); sc.IsSampled() {
			traceID = sc.TraceID().String()
		}
		if span.IsRecording() {
			span.SetAttributes(attribute.Int("http.response.status_code", status))
			if reason != "" {
				span.SetAttributes(attribute.String("sidecar.error", reason))
			}
			if status >= 500 || reason != "" {
				span.SetStatus(codes.Error, cmp.Or(detail, reason, http.StatusText(status)))
			}
		}
		span.End()
	}
	series.Done(status, time.Since(start), traceID)
}

// telemetryBody ends the request's span and records its metrics when the
// response body is closed.
type telemetryBody struct {
	io.ReadCloser
	once   sync.Once
	span   trace.Span
	series *metrics.Series
	start  time.Time
	resp   *http.Response
}

func (b *telemetryBody) Close() error {
	err := b.ReadCloser.Close()
	b.once.Do(func() {
		if b.span != nil && b.span.IsRecording() {
			// A gRPC call's outcome is in its trailers, known by now.
			if g := grpcStatus(b.resp); g != "" {
				b.span.SetAttributes(attribute.String("rpc.grpc.status_code", g))
				if g != "0" {
					b.span.SetStatus(codes.Error, "grpc-status "+g)
				}
			}
		}
		endRequest(b.span, b.series, b.start, b.resp.StatusCode, "", "")
	})
	return err
}
