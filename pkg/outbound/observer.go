package outbound

// Observer is told what the resilience chain decides, for metrics. Its
// methods are called on the request path (BreakerStateChanged under the
// breaker's lock): they must be cheap, must not block and must be safe for
// concurrent use. Service names are bounded (only services known to
// discovery reach the chain); endpoints are not, so they are never passed
// where a label could be made of them.
type Observer interface {
	// Retried: an attempt failed for reason (a retry.on condition) and is
	// tried again.
	Retried(service, reason string)
	// RetryBudgetExhausted: a retry was due but the budget had none left.
	RetryBudgetExhausted(service string)
	// BreakerStateChanged: the service's breaker moved from one state to
	// another ("closed", "open", "half-open").
	BreakerStateChanged(service, from, to string)
	// EndpointEjected: outlier detection took an endpoint of the service
	// out of rotation.
	EndpointEjected(service string)
	// Shed: a request was refused without an upstream attempt, for reason
	// ("overloaded" or "circuit_open").
	Shed(service, reason string)
	// Attempted: an attempt was sent to an endpoint of the service.
	Attempted(service string)
	// EndpointRefused: discovery named an endpoint of the service that is
	// never called, for reason ("own_listener": one of the sidecar's own
	// listeners). Told once per endpoint set that holds it.
	EndpointRefused(service, reason string)
	// StreamCut: the chain ended a streaming answer of the service, for
	// reason (StreamCutIdle: silent for streamIdleTimeout;
	// StreamCutDeadline: the caller's deadline passed).
	StreamCut(service, reason string)
	// Hedged: a hedge of a request to the service was sent (hedge.delay
	// passed without an answer).
	Hedged(service string)
	// HedgeWon: a hedge's answer was the one the app got.
	HedgeWon(service string)
}

// NopObserver observes nothing; embed it to implement only some methods.
type NopObserver struct{}

func (NopObserver) Retried(service, reason string)               {}
func (NopObserver) RetryBudgetExhausted(service string)          {}
func (NopObserver) BreakerStateChanged(service, from, to string) {}
func (NopObserver) EndpointEjected(service string)               {}
func (NopObserver) Shed(service, reason string)                  {}
func (NopObserver) Attempted(service string)                     {}
func (NopObserver) EndpointRefused(service, reason string)       {}
func (NopObserver) StreamCut(service, reason string)             {}
func (NopObserver) Hedged(service string)                        {}
func (NopObserver) HedgeWon(service string)                      {}

var _ Observer = NopObserver{}
