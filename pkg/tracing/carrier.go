package tracing

import (
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
