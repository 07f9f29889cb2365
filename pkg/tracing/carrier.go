package tracing

import (
	"context"
	"net/http"

	"go.opentelemetry.io/otel/propagation"
)

// HeaderCarrier is propagation.HeaderCarrier for the request path: the
// W3C propagators ask for "traceparent", "tracestate" and "baggage" in
// lower case, which http.Header canonicalizes into a new string on every
// call; here those three map to their canonical form without allocating.
// Other keys behave as with propagation.HeaderCarrier. Not safe for
// concurrent use, like the header it wraps.
type HeaderCarrier http.Header

var (
	_ propagation.TextMapCarrier = HeaderCarrier(nil)
	_ propagation.ValuesGetter   = HeaderCarrier(nil)
)

func canonical(key string) string {
	switch key {
	case "traceparent":
		return "Traceparent"
	case "tracestate":
		return "Tracestate"
	case "baggage":
		return "Baggage"
	}
	return key // http.Header canonicalizes it
}

// Get returns the first value of key.
func (h HeaderCarrier) Get(key string) string { return http.Header(h).Get(canonical(key)) }

// Values returns every value of key.
func (h HeaderCarrier) Values(key string) []string { return http.Header(h).Values(canonical(key)) }

// Set sets key to value.
func (h HeaderCarrier) Set(key, value string) { http.Header(h).Set(canonical(key), value) }

// Keys lists the header's keys.
func (h HeaderCarrier) Keys() []string { return propagation.HeaderCarrier(h).Keys() }

// Fields are the headers prop reads and writes, in http.Header's
// canonical form: what Replace clears.
func Fields(prop propagation.TextMapPropagator) []string {
	if prop == nil {
		return nil
	}
	var out []string
	for _, f := range prop.Fields() {
		out = append(out, http.CanonicalHeaderKey(f))
	}
	return out
}

// Replace writes ctx's trace context into h in place of the trace headers
// h came with (fields, from Fields): a caller's headers the propagator
// could not read (a malformed traceparent) do not travel on beside the
// new context (W3C Trace Context: a tracestate is never passed on with a
// traceparent other than its own).
func Replace(prop propagation.TextMapPropagator, fields []string, ctx context.Context, h http.Header) {
	for _, f := range fields {
		delete(h, f)
	}
	prop.Inject(ctx, HeaderCarrier(h))
}
