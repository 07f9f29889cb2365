package forward

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/sidecar-mesh/sidecar/internal/clip"
	"github.com/sidecar-mesh/sidecar/pkg/downstream"
	"github.com/sidecar-mesh/sidecar/pkg/upstream"
)

// Reasons of the errors the sidecar produces itself (DESIGN.md). They are the
// value of the x-sidecar-error header and the "error" field of the body.
const (
	ReasonUnknownService     = "unknown_service"
	ReasonNoHealthyEndpoints = "no_healthy_endpoints"
	ReasonCircuitOpen        = "circuit_open"
	ReasonOverloaded         = "overloaded"
	ReasonUpstreamTimeout    = "upstream_timeout"
	ReasonConnectFailure     = "upstream_connect_failure"
	ReasonUpstreamReset      = "upstream_reset"
	// ReasonUpstreamBadResponse: the upstream's answer broke HTTP's framing
	// or a limit (header size, interim responses); it is not passed on.
	ReasonUpstreamBadResponse = "upstream_bad_response"
	ReasonBadRequest          = "bad_request"
	ReasonRequestTimeout      = "request_timeout"
	ReasonNotAllowed          = "not_allowed"
	// ReasonLoop: the request came back to the sidecar that sent it, or
	// every endpoint of the service is one of the sidecar's own listeners.
	ReasonLoop = "loop"
	// ReasonNotAuthorized: the mesh's intentions do not allow the calling
	// service (its certificate's identity) to call this one.
	ReasonNotAuthorized = "not_authorized"
	// ReasonUpstreamTLSFailure: the mesh's TLS handshake with an endpoint
	// failed, or the endpoint did not prove to be the service called.
	ReasonUpstreamTLSFailure = "upstream_tls_failure"
	// ReasonClientClosed: the client went away before it was answered.
	// Recorded, never written.
	ReasonClientClosed = "client_closed"
)

// StatusClientClosed is the status recorded for a request whose client went
// away before it was answered (nginx's 499). It is never written.
const StatusClientClosed = 499

// statusOf is the status of each reason (DESIGN.md, "Errors the sidecar
// itself produces").
func statusOf(reason string) int {
	switch reason {
	case ReasonUnknownService, ReasonNoHealthyEndpoints, ReasonCircuitOpen, ReasonOverloaded:
		return http.StatusServiceUnavailable
	case ReasonUpstreamTimeout:
		return http.StatusGatewayTimeout
	case ReasonConnectFailure, ReasonUpstreamReset, ReasonUpstreamBadResponse, ReasonUpstreamTLSFailure:
		return http.StatusBadGateway
	case ReasonBadRequest:
		return http.StatusBadRequest
	case ReasonRequestTimeout:
		return http.StatusRequestTimeout
	case ReasonNotAllowed, ReasonNotAuthorized:
		return http.StatusForbidden
	case ReasonLoop:
		return http.StatusLoopDetected
	case ReasonClientClosed:
		return StatusClientClosed
	}
	return http.StatusInternalServerError
}

// Refuse is the local error for reason, with its status: the one place a
// LocalError is made, with LocalReply. service may be empty (the request
// named none).
func Refuse(reason, service, detail string) *LocalError {
	return &LocalError{Status: statusOf(reason), Reason: reason, Service: service, Detail: clip.String(detail, MaxDetail)}
}

// MaxDetail bounds a LocalError's detail: it may quote what an endpoint or
// a client sent, and it goes to the client, the recorder and the logs.
const MaxDetail = 512

// LocalReply maps an error that ended a request on either proxy, on its
// way to service (the service the request was routed to; the app on the
// inbound side), to what the client is answered: a LocalError as it is,
// the client's own failures (its body broke or stalled, it went away), a
// deadline, a connect failure, a broken answer, else a reset. A request
// whose client is gone maps to ReasonClientClosed: nobody is answered.
func LocalReply(service string, err error) *LocalError {
	var le *LocalError
	if errors.As(err, &le) {
		return le
	}
	var ce *downstream.ClientError
	var conn *upstream.ConnectError
	var bad *upstream.BadResponseError
	var tlsErr *upstream.TLSError
	reason := ReasonUpstreamReset
	switch {
	case errors.As(err, &ce) && ce.Timeout():
		reason = ReasonRequestTimeout
	case errors.As(err, &ce) && ce.Gone():
		reason = ReasonClientClosed
	case errors.As(err, &ce):
		reason = ReasonBadRequest
	case errors.Is(err, context.Canceled):
		reason = ReasonClientClosed
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, upstream.ErrResponseHeaderTimeout):
		reason = ReasonUpstreamTimeout
	case errors.As(err, &tlsErr):
		reason = ReasonUpstreamTLSFailure
	case errors.As(err, &conn):
		reason = ReasonConnectFailure
	case errors.As(err, &bad):
		reason = ReasonUpstreamBadResponse
	}
	return Refuse(reason, service, err.Error())
}

// HopHeader marks a request the outbound proxy forwarded with the proxy's
// own id, so that a request that comes back to it (discovery pointing at
// the sidecar itself, or at another proxy that points back) is refused
// instead of going round until the file descriptors run out. The inbound
// proxy removes it: a call the app makes while serving a request is a new
// request, not a loop.
const HopHeader = "X-Sidecar-Hop"

// ErrorHeader names the header that marks a local error, so a local failure
// never looks like an upstream answer.
const ErrorHeader = "X-Sidecar-Error"

// LocalError is an error the sidecar answers itself.
type LocalError struct {
	Status  int    `json:"-"`
	Reason  string `json:"error"`
	Service string `json:"service,omitempty"`
	Detail  string `json:"detail,omitempty"`
	// RetryAfter, when set, is sent as a Retry-After header (whole
	// seconds, rounded up) to a client that is not gRPC's.
	RetryAfter time.Duration `json:"-"`
}

func (e *LocalError) Error() string {
	s := e.Reason
	if e.Service != "" {
		s += " (" + e.Service + ")"
	}
	if e.Detail != "" {
		s += ": " + e.Detail
	}
	return s
}

// WriteError answers r with a local error: the x-sidecar-error header and a
// small JSON body, or, for a gRPC call, a trailers-only response with the
// matching grpc-status (GRPCCode) and the detail as grpc-message, which is
// what a gRPC client understands. A 400 or 408 also closes an HTTP/1.x
// connection, since its framing can no longer be trusted. An HTTP/2 stream's
// error is the stream's alone: there "Connection: close" would make net/http
// send a GOAWAY that ends every other stream's connection, and hide the
// connection error a later bad frame deserves.
func WriteError(w http.ResponseWriter, r *http.Request, e *LocalError) {
	// A client that stops reading its answers (say one that pipelines
	// requests it knows are refused) is cut off, as for answers the
	// Forwarder writes.
	_ = http.NewResponseController(w).SetWriteDeadline(time.Now().Add(LocalReplyWriteTimeout))
	h := w.Header()
	h.Set(ErrorHeader, e.Reason)
	if r != nil && upstream.IsGRPC(r) {
		h.Set("Content-Type", "application/grpc")
		h.Set("Grpc-Status", strconv.Itoa(GRPCCode(e.Status)))
		h.Set("Grpc-Message", grpcMessage(e.Error()))
		w.WriteHeader(http.StatusOK)
		return
	}
	body, _ := json.Marshal(e)
	body = append(body, '\n')
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(body)))
	h.Set("Cache-Control", "no-store")
	if e.RetryAfter > 0 {
		h.Set("Retry-After", strconv.FormatInt(int64((e.RetryAfter+time.Second-1)/time.Second), 10))
	}
	// A refused CONNECT ends its connection too: what the client sent
	// after it was meant for the tunnel, never to be read as requests.
	if (e.Status == http.StatusBadRequest || e.Status == http.StatusRequestTimeout || r != nil && r.Method == http.MethodConnect) &&
		(r == nil || r.ProtoMajor < 2) {
		h.Set("Connection", "close")
	}
	w.WriteHeader(e.Status)
	_, _ = w.Write(body)
}

// LocalReplyWriteTimeout bounds the writing of an answer of the sidecar's
// own (WriteError): a few hundred bytes, which only a client that stopped
// reading would take long to take. A variable for tests to shorten.
var LocalReplyWriteTimeout = 60 * time.Second

// GRPC status codes the sidecar answers with (google.golang.org/grpc/codes).
const (
	GRPCInternal         = 13
	GRPCUnavailable      = 14
	GRPCDeadlineExceeded = 4
	GRPCPermissionDenied = 7
)

// GRPCCode maps a local error's HTTP status to the gRPC status a gRPC
// client gets instead, as gRPC's own HTTP-to-gRPC mapping does: 502, 503
// (circuit open, no endpoints, overloaded) UNAVAILABLE; 504 and 408
// DEADLINE_EXCEEDED; 403 PERMISSION_DENIED; anything else INTERNAL.
func GRPCCode(status int) int {
	switch status {
	case http.StatusBadGateway, http.StatusServiceUnavailable:
		return GRPCUnavailable
	case http.StatusGatewayTimeout, http.StatusRequestTimeout:
		return GRPCDeadlineExceeded
	case http.StatusForbidden:
		return GRPCPermissionDenied
	}
	return GRPCInternal
}

// grpcMessage percent-encodes s as the gRPC spec asks for grpc-message.
func grpcMessage(s string) string {
	const hex = "0123456789ABCDEF"
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 0x20 && c <= 0x7e && c != '%' {
			b.WriteByte(c)
			continue
		}
		b.WriteByte('%')
		b.WriteByte(hex[c>>4])
		b.WriteByte(hex[c&15])
	}
	return b.String()
}
