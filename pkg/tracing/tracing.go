// Package tracing owns the sidecar's OpenTelemetry setup: the tracer
// provider with its resource, sampler and OTLP exporter, the propagators,
// and an export queue that never holds up a request and counts the spans it
// drops.
package tracing

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"go.opentelemetry.io/contrib/propagators/autoprop"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
)

// Config configures tracing. The zero value is tracing off: no spans, and
// trace headers passed through untouched.
type Config struct {
	// Endpoint is the OTLP collector (Jaeger, an OpenTelemetry collector):
	// host:port or a URL. Empty: tracing off.
	Endpoint string
	// Protocol is "grpc" (default) or "http/protobuf".
	Protocol string
	// Sampler is an OTEL_TRACES_SAMPLER name: always_on, always_off,
	// traceidratio, parentbased_always_on, parentbased_always_off,
	// parentbased_traceidratio (default).
	Sampler string
	// SamplerArg is the ratio of the ratio samplers. Default 0.01.
	SamplerArg float64
	// Propagators are OTEL_PROPAGATORS names (tracecontext, baggage, b3,
	// b3multi, jaeger, xray, ottrace). Default: tracecontext, baggage.
	Propagators []string
	// Service is the service.name of the spans.
	Service string
	// QueueSize bounds the spans waiting for export; beyond it spans are
	// dropped and counted. Default 4096.
	QueueSize int
	// Logger receives export failures, at most once a minute each.
	Logger *slog.Logger
}

// Provider is the tracing of a running sidecar. Safe for concurrent use.
type Provider struct {
	tp         trace.TracerProvider
	sdk        *sdktrace.TracerProvider // nil when tracing is off
	queue      *exportQueue             // nil when tracing is off
	propagator propagation.TextMapPropagator
}

// Setup builds the tracing of cfg. With no endpoint, tracing is off and
// Setup never fails.
func Setup(ctx context.Context, cfg Config) (*Provider, error) {
	if cfg.Endpoint == "" {
		return &Provider{tp: noop.NewTracerProvider(), propagator: propagation.NewCompositeTextMapPropagator()}, nil
	}
	prop, err := propagators(cfg.Propagators)
	if err != nil {
		return nil, err
	}
	sampler, err := sampler(cfg.Sampler, cfg.SamplerArg)
	if err != nil {
		return nil, err
	}
	exp, err := exporter(ctx, cfg)
	if err != nil {
		return nil, err
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	q := newExportQueue(exp, cfg.QueueSize, log.With("component", "tracing"))
	tp := sdktrace.NewTracerProvider(
		sdktrace.WithResource(serviceResource(cfg.Service)),
		sdktrace.WithSampler(sampler),
		sdktrace.WithSpanProcessor(q),
		// A backstop: the sidecar's own attributes are bounded where they
		// are set (Text), and no span may grow past these.
		sdktrace.WithRawSpanLimits(sdktrace.SpanLimits{
			AttributeValueLengthLimit:   MaxText,
			AttributeCountLimit:         64,
			EventCountLimit:             16,
			LinkCountLimit:              0,
			AttributePerEventCountLimit: 8,
			AttributePerLinkCountLimit:  0,
		}),
	)
	return &Provider{tp: tp, sdk: tp, queue: q, propagator: prop}, nil
}

// Enabled reports whether spans are made at all.
func (p *Provider) Enabled() bool { return p.sdk != nil }

// Tracer is the sidecar's tracer (a no-op one when tracing is off).
func (p *Provider) Tracer() trace.Tracer {
	return p.tp.Tracer("github.com/sidecar-mesh/sidecar")
}

// Propagator reads and writes the trace headers.
func (p *Provider) Propagator() propagation.TextMapPropagator { return p.propagator }

// Dropped is the number of spans dropped so far: queue full, or the
// collector unreachable.
func (p *Provider) Dropped() uint64 {
	if p.queue == nil {
		return 0
	}
	return p.queue.dropped.Load()
}

// Exported is the number of spans the collector accepted.
func (p *Provider) Exported() uint64 {
	if p.queue == nil {
		return 0
	}
	return p.queue.exported.Load()
}

// Shutdown exports what is queued, within ctx, and stops.
func (p *Provider) Shutdown(ctx context.Context) error {
	if p.sdk == nil {
		return nil
	}
	return p.sdk.Shutdown(ctx)
}

func propagators(names []string) (propagation.TextMapPropagator, error) {
	if len(names) == 0 {
		names = []string{"tracecontext", "baggage"}
	}
	prop, err := autoprop.TextMapPropagator(names...)
	if err != nil {
		return nil, fmt.Errorf("tracing.propagators: %w", err)
	}
	return prop, nil
}

func sampler(name string, arg float64) (sdktrace.Sampler, error) {
	if arg == 0 {
		arg = 0.01
	}
	if arg < 0 || arg > 1 {
		return nil, fmt.Errorf("tracing.samplerArg: %g is not allowed (allowed: 0 to 1)", arg)
	}
	switch name {
	case "", "parentbased_traceidratio":
		return sdktrace.ParentBased(sdktrace.TraceIDRatioBased(arg)), nil
	case "traceidratio":
		return sdktrace.TraceIDRatioBased(arg), nil
	case "always_on":
		return sdktrace.AlwaysSample(), nil
	case "always_off":
		return sdktrace.NeverSample(), nil
	case "parentbased_always_on":
		return sdktrace.ParentBased(sdktrace.AlwaysSample()), nil
	case "parentbased_always_off":
		return sdktrace.ParentBased(sdktrace.NeverSample()), nil
	}
	return nil, fmt.Errorf("tracing.sampler: %q is not allowed (allowed: always_on, always_off, traceidratio, "+
		"parentbased_always_on, parentbased_always_off, parentbased_traceidratio)", name)
}

// exporter is the OTLP exporter of cfg. It does not retry: a span batch the
// collector refuses is dropped and counted, rather than held while requests
// keep making new spans.
func exporter(ctx context.Context, cfg Config) (sdktrace.SpanExporter, error) {
	endpoint := cfg.Endpoint
	hasScheme := strings.Contains(endpoint, "://")
	// Checked here, where the exporters would otherwise log a URL they
	// cannot parse, credentials and all, and export to their default
	// (localhost:4317) instead. Errors never quote the endpoint: it may
	// hold a password.
	shown := endpoint
	if hasScheme {
		u, err := url.Parse(endpoint)
		if err != nil || u.Host == "" || u.Scheme != "http" && u.Scheme != "https" {
			return nil, errors.New("tracing.endpoint: not a URL the exporter can use (want host:port, or http:// or https:// and a host)")
		}
		shown = u.Redacted()
	} else if _, port, err := net.SplitHostPort(endpoint); err != nil || port == "" {
		return nil, errors.New("tracing.endpoint: want host:port, or a URL with http:// or https://")
	}
	var client otlptrace.Client
	switch cfg.Protocol {
	case "", "grpc":
		opts := []otlptracegrpc.Option{otlptracegrpc.WithTimeout(5 * time.Second),
			otlptracegrpc.WithRetry(otlptracegrpc.RetryConfig{Enabled: false}),
			// Reconnect within seconds of the collector's return, not the
			// two minutes grpc-go's default backoff may reach.
			otlptracegrpc.WithDialOption(grpc.WithConnectParams(grpc.ConnectParams{
				Backoff:           backoff.Config{BaseDelay: 500 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 5 * time.Second},
				MinConnectTimeout: 5 * time.Second,
			}))}
		if hasScheme {
			opts = append(opts, otlptracegrpc.WithEndpointURL(endpoint))
		} else {
			opts = append(opts, otlptracegrpc.WithEndpoint(endpoint), otlptracegrpc.WithInsecure())
		}
		client = otlptracegrpc.NewClient(opts...)
	case "http/protobuf":
		opts := []otlptracehttp.Option{otlptracehttp.WithTimeout(5 * time.Second),
			otlptracehttp.WithRetry(otlptracehttp.RetryConfig{Enabled: false})}
		if hasScheme {
			opts = append(opts, otlptracehttp.WithEndpointURL(endpoint))
		} else {
			opts = append(opts, otlptracehttp.WithEndpoint(endpoint), otlptracehttp.WithInsecure())
		}
		client = otlptracehttp.NewClient(opts...)
	default:
		return nil, fmt.Errorf("tracing.protocol: %q is not allowed (allowed: grpc, http/protobuf)", cfg.Protocol)
	}
	exp, err := otlptrace.New(ctx, client)
	if err != nil {
		return nil, fmt.Errorf("tracing: OTLP exporter for %s: %w", shown, err)
	}
	return exp, nil
}

// serviceResource names the spans' source: the service, this instance, and
// the pod and namespace when the downward API provides them.
func serviceResource(service string) *resource.Resource {
	if service == "" {
		service = "sidecar"
	}
	instance := os.Getenv("POD_NAME")
	if instance == "" {
		instance, _ = os.Hostname()
	}
	attrs := []attribute.KeyValue{
		semconv.ServiceName(service),
		semconv.ServiceInstanceID(instance + "-" + strconv.Itoa(os.Getpid())),
	}
	if v := os.Getenv("POD_NAME"); v != "" {
		attrs = append(attrs, semconv.K8SPodName(v))
	}
	if v := os.Getenv("POD_NAMESPACE"); v != "" {
		attrs = append(attrs, semconv.K8SNamespaceName(v))
	}
	return resource.NewWithAttributes(semconv.SchemaURL, attrs...)
}
