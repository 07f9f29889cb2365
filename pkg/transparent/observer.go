package transparent

// Protocols a redirected connection is taken for, as Observer labels.
const (
	ProtocolHTTP = "http"
	ProtocolTCP  = "tcp"
)

// Reasons a redirected connection is refused, as Observer labels.
const (
	// RefusedLoop: the original destination is one of the sidecar's own
	// listeners.
	RefusedLoop = "loop"
	// RefusedNotAllowed: Config.AllowTCP refused the destination.
	RefusedNotAllowed = "not_allowed"
	// RefusedConnectFailure: the original destination could not be reached
	// within the connect timeout.
	RefusedConnectFailure = "connect_failure"
)

// Directions of passed-through bytes, as Observer labels.
const (
	// DirectionSent: from the app to the original destination.
	DirectionSent = "sent"
	// DirectionReceived: from the original destination to the app.
	DirectionReceived = "received"
)

// Observer is told what happens to redirected connections, for metrics.
// Every label is one of the constants above (bounded). Methods are called
// on the connection path: they must be cheap, must not block and must be
// safe for concurrent use.
type Observer interface {
	// Accepted: a redirected connection was taken for protocol.
	Accepted(protocol string)
	// Refused: a redirected connection was closed for reason.
	Refused(reason string)
	// PassthroughOpened and PassthroughClosed bracket a connection passed
	// through to its original destination.
	PassthroughOpened()
	PassthroughClosed()
	// Bytes: n bytes were passed through in direction.
	Bytes(direction string, n int)
}

// NopObserver observes nothing; embed it to implement only some methods.
type NopObserver struct{}

func (NopObserver) Accepted(string)    {}
func (NopObserver) Refused(string)     {}
func (NopObserver) PassthroughOpened() {}
func (NopObserver) PassthroughClosed() {}
func (NopObserver) Bytes(string, int)  {}

var _ Observer = NopObserver{}
