package inbound

import (
	"encoding/json"
	"log/slog"
	"net/http"
	"sort"
	"strings"
	"sync/atomic"

	"github.com/sidecar-mesh/sidecar/pkg/loopback"
)

// Check is one named condition of a readiness endpoint.
type Check struct {
	// Name says what is checked ("outbound", "policy"); it keys the reason
	// in the answer.
	Name string
	// Err is nil while the condition holds and otherwise says why not. It
	// is called on every health request, so it must be cheap and must not
	// block. Nil: the condition always holds.
	Err func() error
}

// HealthConfig says what the health endpoints answer from. Every field is
// optional: with the zero value /healthz/* answer 200 and /app-health/* 404.
type HealthConfig struct {
	// Sidecar are the conditions of the sidecar's own readiness (the
	// outbound listener is up), answered at /healthz/sidecar for a native
	// sidecar's startupProbe. They are also conditions of /healthz/ready.
	// Empty: always ready.
	Sidecar []Check
	// Ready are the further conditions of /healthz/ready (the policy is
	// loaded). Empty: none.
	Ready []Check
	// Liveness, Readiness and Startup are the app's probes, answered at
	// /app-health/livez, /app-health/readyz and /app-health/startupz. Nil:
	// that endpoint answers 404. Readiness is also the condition "app" of
	// /healthz/ready.
	Liveness, Readiness, Startup *Prober
	// Logger receives readiness transitions as the endpoints see them; nil
	// discards them.
	Logger *slog.Logger
}

// Health is the http.Handler of the health port (0.0.0.0:15020):
//
//	/healthz/live         200 while the sidecar serves
//	/healthz/ready        200 when the Sidecar and Ready conditions hold, the
//	                      app's readiness probe passes and no drain is on
//	/healthz/sidecar      200 when the Sidecar conditions hold
//	/app-health/livez     the app's liveness probe: 200 passing, 503 failing
//	/app-health/readyz    the app's readiness probe; 503 during a drain too
//	/app-health/startupz  the app's startup probe
//
// A 503 carries a small JSON body naming each failing condition and why,
// for loopback callers only (an operator in the pod): to others, the
// kubelet among them, the body is the status alone, since the reasons hold
// the app's probe URLs, dial errors and addresses. Safe for concurrent use;
// the zero value is not usable, call NewHealthHandler.
type Health struct {
	sidecar   []Check
	ready     []Check
	liveness  *Prober
	readiness *Prober
	startup   *Prober
	log       *slog.Logger

	draining  atomic.Bool
	lastReady atomic.Int32 // readiness last answered: 0 none yet, 1 ready, 2 not ready
}

var _ http.Handler = (*Health)(nil)

// NewHealthHandler returns the health endpoints for cfg.
func NewHealthHandler(cfg HealthConfig) *Health {
	h := &Health{
		sidecar:   cfg.Sidecar,
		ready:     cfg.Ready,
		liveness:  cfg.Liveness,
		readiness: cfg.Readiness,
		startup:   cfg.Startup,
		log:       componentLogger(cfg.Logger, "inbound.health"),
	}
	if cfg.Readiness != nil {
		h.ready = append(h.ready[:len(h.ready):len(h.ready)], Check{Name: "app", Err: cfg.Readiness.Err})
	}
	return h
}

// Drain makes /healthz/ready and /app-health/readyz answer 503 from now on,
// so the kubelet and load balancers stop sending traffic. Liveness is not
// affected.
func (h *Health) Drain() {
	if !h.draining.Swap(true) {
		h.log.Info("draining: reporting not ready")
	}
}

// Draining reports whether Drain was called.
func (h *Health) Draining() bool { return h.draining.Load() }

// Ready returns the failing conditions of /healthz/ready by name; empty
// means ready.
func (h *Health) Ready() map[string]string {
	failing := failingChecks(nil, h.sidecar)
	failing = failingChecks(failing, h.ready)
	if h.draining.Load() {
		failing = addFailing(failing, "drain", "the sidecar is shutting down")
	}
	return failing
}

// healthBody is the JSON answer of every endpoint.
type healthBody struct {
	// Status is "ok", "failing", "not_configured" (404) or "not_allowed"
	// (405).
	Status string `json:"status"`
	// Failing gives why, per condition; only loopback callers get it.
	Failing map[string]string `json:"failing,omitempty"`
}

// ServeHTTP answers one health request.
func (h *Health) ServeHTTP(rw http.ResponseWriter, r *http.Request) {
	w := healthWriter{ResponseWriter: rw, detailed: loopback.Peer(r)}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		writeHealth(w, http.StatusMethodNotAllowed, healthBody{Status: "not_allowed",
			Failing: map[string]string{"method": r.Method + " is not allowed; use GET"}})
		return
	}
	switch r.URL.Path {
	case "/healthz/live":
		writeHealth(w, http.StatusOK, healthBody{Status: "ok"})
	case "/healthz/ready":
		failing := h.Ready()
		h.noteReadiness(failing)
		answer(w, failing)
	case "/healthz/sidecar":
		answer(w, failingChecks(nil, h.sidecar))
	case "/app-health/livez":
		h.appProbe(w, "liveness", h.liveness, false)
	case "/app-health/readyz":
		h.appProbe(w, "readiness", h.readiness, true)
	case "/app-health/startupz":
		h.appProbe(w, "startup", h.startup, false)
	default:
		writeHealth(w, http.StatusNotFound, healthBody{Status: "not_configured",
			Failing: map[string]string{"path": "no health endpoint at " + r.URL.Path}})
	}
}

func (h *Health) appProbe(w healthWriter, name string, p *Prober, drains bool) {
	if p == nil {
		writeHealth(w, http.StatusNotFound, healthBody{Status: "not_configured",
			Failing: map[string]string{name: "no " + name + " probe of the app is configured"}})
		return
	}
	var failing map[string]string
	if err := p.Err(); err != nil {
		failing = addFailing(failing, name, err.Error())
	}
	if drains && h.draining.Load() {
		failing = addFailing(failing, "drain", "the sidecar is shutting down")
	}
	answer(w, failing)
}

// noteReadiness logs a change of the readiness answered.
func (h *Health) noteReadiness(failing map[string]string) {
	now := int32(1)
	if len(failing) > 0 {
		now = 2
	}
	if h.lastReady.Swap(now) == now {
		return
	}
	if now == 1 {
		h.log.Info("sidecar ready")
		return
	}
	names := make([]string, 0, len(failing))
	for k := range failing {
		names = append(names, k)
	}
	sort.Strings(names)
	h.log.Warn("sidecar not ready", "failing", strings.Join(names, ","))
}

func failingChecks(failing map[string]string, checks []Check) map[string]string {
	for _, c := range checks {
		if c.Err == nil {
			continue
		}
		if err := c.Err(); err != nil {
			failing = addFailing(failing, c.Name, err.Error())
		}
	}
	return failing
}

func addFailing(failing map[string]string, name, why string) map[string]string {
	if failing == nil {
		failing = make(map[string]string, 2)
	}
	failing[name] = why
	return failing
}

func answer(w healthWriter, failing map[string]string) {
	if len(failing) > 0 {
		writeHealth(w, http.StatusServiceUnavailable, healthBody{Status: "failing", Failing: failing})
		return
	}
	writeHealth(w, http.StatusOK, healthBody{Status: "ok"})
}

// healthWriter answers one request; detailed says whether the answer may
// say why (the caller is on this host).
type healthWriter struct {
	http.ResponseWriter
	detailed bool
}

func writeHealth(w healthWriter, code int, body healthBody) {
	if !w.detailed {
		body.Failing = nil
	}
	b, _ := json.Marshal(body)
	b = append(b, '\n')
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	_, _ = w.Write(b)
}
