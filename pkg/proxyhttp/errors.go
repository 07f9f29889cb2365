package proxyhttp

import (
	"encoding/json"
	"net/http"
	"strconv"
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
	ReasonBadRequest         = "bad_request"
	ReasonRequestTimeout     = "request_timeout"
	ReasonNotAllowed         = "not_allowed"
)

// ErrorHeader names the header that marks a local error, so a local failure
// never looks like an upstream answer.
const ErrorHeader = "X-Sidecar-Error"

// LocalError is an error the sidecar answers itself.
type LocalError struct {
	Status  int    `json:"-"`
	Reason  string `json:"error"`
	Service string `json:"service,omitempty"`
	Detail  string `json:"detail,omitempty"`
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

// WriteError answers a request with a local error: the x-sidecar-error
// header and a small JSON body. A 400 also closes the connection, since the
// stream's framing can no longer be trusted.
func WriteError(w http.ResponseWriter, e *LocalError) {
	body, _ := json.Marshal(e)
	body = append(body, '\n')
	h := w.Header()
	h.Set(ErrorHeader, e.Reason)
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(body)))
	h.Set("Cache-Control", "no-store")
	if e.Status == http.StatusBadRequest || e.Status == http.StatusRequestTimeout {
		h.Set("Connection", "close")
	}
	w.WriteHeader(e.Status)
	_, _ = w.Write(body)
}
