package tracing

import (
	"fmt"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"

	"github.com/sidecar-mesh/sidecar/internal/clip"
)

// MaxText is the longest string a span gets from the wire (a path, a
// status, an error's text), in bytes: Envoy's max_path_tag_length.
const MaxText = 256

// Text is s as a span may hold it: valid UTF-8 (OTLP refuses a batch that
// holds one invalid string, every span of it lost), cut to MaxText bytes
// on a character's boundary. Every string a peer, an app or an upstream
// chose goes into a span through it.
func Text(s string) string { return clip.String(s, MaxText) }

// Fail marks span failed with err, its text as Text keeps it: the
// exception event of span.RecordError and the status, neither of them
// longer than MaxText.
func Fail(span trace.Span, err error) {
	msg := Text(err.Error())
	span.AddEvent(semconv.ExceptionEventName, trace.WithAttributes(
		semconv.ExceptionType(fmt.Sprintf("%T", err)), semconv.ExceptionMessage(msg)))
	span.SetStatus(codes.Error, msg)
}

// String is attribute.String of Text(v).
func String(k, v string) attribute.KeyValue { return attribute.String(k, Text(v)) }
