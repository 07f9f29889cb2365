package outbound

import (
	"cmp"
	"context"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	"github.com/sidecar-mesh/sidecar/pkg/metrics"
	"github.com/sidecar-mesh/sidecar/pkg/tracing"
)

// startRequest starts the call's client span, under the trace context
// the app sent (if any), and returns the request under it. The attempts
// get spans of their own (startAttempt). Without a tracer it returns req
// and a nil span.
func (ch *chain) startRequest(c *call, req *http.Request) (*http.Request, trace.Span) {
	if ch.tracer == nil {
		return req, nil
	}
	ctx, span := ch.startSpan(c, req)
	return req.WithContext(ctx), span
}

// startSpan starts the request's span, its parent what the request's
// headers carry; ctx holds it.
func (ch *chain) startSpan(c *call, req *http.Request) (ctx context.Context, span trace.Span) {
	ctx = ch.prop.Extract(req.Context(), tracing.HeaderCarrier(req.Header))
	// A span not sampled drops its name: it is built only for the sampled
	// ones.
	ctx, span = ch.tracer.Start(ctx, "request", clientSpan)
	if span.IsRecording() {
		span.SetName(tracing.Text(req.Method + " " + c.service))
		// What the app wrote is escaped and cut (tracing.Text says why).
		span.SetAttributes(tracing.String("sidecar.service", c.service),
			tracing.String("http.request.method", req.Method),
			tracing.String("url.path", req.URL.EscapedPath()),
			attribute.String("network.protocol.version", protoVersion(req)))
	}
	return ctx, span
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
				span.SetStatus(codes.Error, tracing.Text(cmp.Or(detail, reason, http.StatusText(status))))
			}
		}
		span.End()
	}
	series.Done(status, time.Since(start), traceID)
}

// telemetryBody ends the request's span and records its metrics when the
// response body is closed; with a chain, it also hands the call to the
// recorder then (a gRPC answer, whose outcome is in its trailers).
type telemetryBody struct {
	io.ReadCloser
	once   sync.Once
	span   trace.Span
	series *metrics.Series
	start  time.Time
	resp   *http.Response
	chain  *chain // nil: nothing to record
	call   *call
	req    *http.Request
}

func (b *telemetryBody) Close() error {
	err := b.ReadCloser.Close()
	b.once.Do(func() {
		if b.span != nil && b.span.IsRecording() {
			// A gRPC call's outcome is in its trailers, known by now.
			if g := grpcStatus(b.resp); g != "" {
				b.span.SetAttributes(tracing.String("rpc.grpc.status_code", g))
				if g != "0" {
					b.span.SetStatus(codes.Error, tracing.Text("grpc-status "+g))
				}
			}
		}
		endRequest(b.span, b.series, b.start, b.resp.StatusCode, "", "")
		if isGRPCResponse(b.resp) {
			b.series.GRPC(grpcStatus(b.resp))
		}
		if b.chain != nil {
			b.chain.record(b.call, b.req, b.span, b.start, b.resp, nil)
		}
	})
	return err
}

// startAttempt starts the span of one attempt, under the request's span,
// named so that a retry and its reason read at a glance in a trace view:
// "attempt 2 (retry: 503)", "attempt 2 (hedge)".
func (ch *chain) startAttempt(c *call, t *try, parent context.Context, req *http.Request) (context.Context, trace.Span) {
	ctx, span := ch.tracer.Start(parent, "attempt", clientSpan)
	if span.IsRecording() {
		// Named only when sampled: the others drop their name.
		name := "attempt " + strconv.Itoa(t.n)
		switch t.retryOf {
		case "":
		case Hedge:
			name += " (hedge)"
		default:
			name += " (retry: " + t.retryOf + ")"
		}
		span.SetName(name)
		host, port, _ := net.SplitHostPort(t.endpoint)
		portN, _ := strconv.Atoi(port)
		span.SetAttributes(
			attribute.Int("sidecar.attempt", t.n),
			tracing.String("sidecar.service", c.service),
			tracing.String("server.address", host),
			attribute.Int("server.port", portN),
			attribute.String("sidecar.breaker.state", c.state.breaker.Load().State().String()),
			tracing.String("http.request.method", req.Method),
		)
		switch t.retryOf {
		case "":
		case Hedge:
			span.SetAttributes(attribute.Bool("sidecar.hedge", true),
				attribute.Int("http.request.resend_count", t.n-1))
		default:
			span.SetAttributes(attribute.String("sidecar.retry.reason", t.retryOf),
				attribute.Float64("sidecar.retry.backoff_ms", float64(t.backoff)/float64(time.Millisecond)),
				attribute.Int("http.request.resend_count", t.n-1))
		}
	}
	return ctx, span
}

// endAttempt ends an attempt's span with its outcome: the status, or the
// failure.
func endAttempt(span trace.Span, resp *http.Response, err error) {
	if span.IsRecording() {
		if err != nil {
			tracing.Fail(span, err)
		} else {
			span.SetAttributes(attribute.Int("http.response.status_code", resp.StatusCode))
			if g := grpcStatus(resp); g != "" {
				span.SetAttributes(tracing.String("rpc.grpc.status_code", g))
				if g != "0" {
					span.SetStatus(codes.Error, tracing.Text("grpc-status "+g))
				}
			}
			if resp.StatusCode >= 500 {
				// The code, not the upstream's reason phrase: that is
				// the upstream's to write, in any bytes.
				span.SetStatus(codes.Error, strconv.Itoa(resp.StatusCode)+" "+http.StatusText(resp.StatusCode))
			}
		}
	}
	span.End()
}
