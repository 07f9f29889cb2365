// Package admin is the sidecar's admin API on 127.0.0.1:15000: JSON views
// of the effective configuration, the endpoints, the resilience state and
// the policies per service, and the drain and quit actions.
package admin

import (
	"encoding/json"
	"errors"
	"net/http"
	"net/http/pprof"
	"net/url"
	"strings"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/loopback"
	"github.com/sidecar-mesh/sidecar/pkg/outbound"
	"github.com/sidecar-mesh/sidecar/pkg/policy"
	"github.com/sidecar-mesh/sidecar/pkg/requestlog"
)

// Sources supplies what the admin API shows. Each func is called per request
// and must not block.
type Sources struct {
	// Config returns the effective configuration, ready for JSON, whose
	// JSON form hides its secrets (*config.Config does, see pkg/redact).
	Config func() any
	// Resolver lists the services and their endpoint sets.
	Resolver discovery.Resolver
	// Version describes the binary.
	Version any
	// Resilience returns the per-service breaker, budget and ejection
	// state; nil omits the endpoint.
	Resilience func() []outbound.ServiceStatus
	// Drain starts draining (not ready, deregistered, keep-alive connections
	// closed) and Quit starts the shutdown SIGTERM starts; both return at
	// once. Nil omits the endpoint.
	Drain, Quit func()
	// Policies reports the policies in force; nil omits the endpoints.
	Policies PolicyStatuses
	// Requests keeps the failed requests and feeds the tap; nil omits
	// GET /requests/failed and GET /tap.
	Requests *requestlog.Recorder
	// Profiling serves Go's runtime profiles (net/http/pprof) under
	// /debug/pprof/, to loopback clients only, whatever address the admin
	// listener is bound to. False omits the endpoints.
	Profiling bool
}

// PolicyStatuses reports the policy in force per service; *policy.Store
// implements it. Its methods must not block.
type PolicyStatuses interface {
	// Statuses lists "*", every service with a policy document or a
	// rejected update, and every service called, sorted by service.
	Statuses() []policy.Status
	// Status reports one service, called or not, and false if service is
	// neither "*" nor a valid service name.
	Status(service string) (policy.Status, bool)
}

// Handler returns the admin API:
//
//	GET /           the status page (HTML, reloads itself, nothing
//	                fetched from elsewhere): services and their endpoints,
//	                ejected ones marked, breakers, retry budget use, in
//	                flight and queued, policies, recent failures
//	GET /config     the effective configuration
//	GET /endpoints  every known service with its endpoints, source and age
//	GET /version    the build
//	GET /resilience per service called: circuit breaker, in-flight, retry
//	                budget use, ejected endpoints
//	GET /policies   per service: the policy in force, its source and
//	                version, and the last rejected update ([]policy.Status)
//	GET /policies/{service}  one service's, called or not (policy.Status)
//	GET /requests/failed[?service=S]  the most recent failed requests,
//	                newest first, with their attempts ([]requestlog.Request)
//	GET /tap[?service=S][&failures=true]  a live stream, one JSON line per
//	                request (requestlog.Request), rate-capped, for a few
//	                watchers at once (429 to more)
//	POST /drain     start draining and keep running (for jobs that end on
//	                their own terms)
//	POST /quitquitquit  drain, then exit, as on SIGTERM
//	GET /debug/pprof/...  Go's CPU, heap, allocation, goroutine and mutex
//	                profiles (with Profiling)
//
// Whatever address it is bound to, it answers 403 to a request whose Host
// is not a loopback name (localhost, 127.0.0.0/8, [::1], any port), whose
// Origin is not a loopback page, or whose Sec-Fetch-Site is cross-site or
// same-site: a web page the pod's user opens can neither rebind a name of
// its own to 127.0.0.1 nor post a form here. The lifecycle actions and the
// profiles answer loopback peers only (403 to others).
func Handler(s Sources) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", statusPageHandler(s))
	mux.HandleFunc("GET /config", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, s.Config())
	})
	mux.HandleFunc("GET /endpoints", func(w http.ResponseWriter, r *http.Request) {
		type service struct {
			*discovery.EndpointSet
			AgeSeconds float64 `json:"ageSeconds"`
		}
		out := struct {
			Services []service `json:"services"`
		}{Services: []service{}}
		now := time.Now()
		for _, set := range s.Resolver.Services() {
			out.Services = append(out.Services, service{EndpointSet: set, AgeSeconds: now.Sub(set.UpdatedAt).Seconds()})
		}
		writeJSON(w, out)
	})
	mux.HandleFunc("GET /version", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, s.Version)
	})
	if s.Resilience != nil {
		mux.HandleFunc("GET /resilience", func(w http.ResponseWriter, r *http.Request) {
			writeJSON(w, s.Resilience())
		})
	}
	if s.Policies != nil {
		mux.HandleFunc("GET /policies", func(w http.ResponseWriter, r *http.Request) {
			writeJSON(w, s.Policies.Statuses())
		})
		mux.HandleFunc("GET /policies/{service}", func(w http.ResponseWriter, r *http.Request) {
			st, ok := s.Policies.Status(r.PathValue("service"))
			if !ok {
				w.Header().Set("Content-Type", "application/json")
				w.WriteHeader(http.StatusNotFound)
				_ = json.NewEncoder(w).Encode(map[string]string{"error": `not a service name: want "*" or lower-case letters, digits and '-'`})
				return
			}
			writeJSON(w, st)
		})
	}
	if s.Requests != nil {
		mux.HandleFunc("GET /requests/failed", func(w http.ResponseWriter, r *http.Request) {
			service, ok := serviceParam(w, r)
			if ok {
				writeJSON(w, s.Requests.Failed(service))
			}
		})
		mux.HandleFunc("GET /tap", func(w http.ResponseWriter, r *http.Request) {
			if service, ok := serviceParam(w, r); ok {
				tap(w, r, s.Requests, requestlog.TapFilter{Service: service, FailuresOnly: r.URL.Query().Get("failures") == "true"})
			}
		})
	}
	for path, fn := range map[string]func(){"POST /drain": s.Drain, "POST /quitquitquit": s.Quit} {
		if fn != nil {
			mux.Handle(path, loopbackOnly(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				fn()
				writeJSON(w, map[string]string{"status": "accepted"})
			})))
		}
	}
	if s.Profiling {
		mux.Handle("/debug/pprof/", loopbackOnly(http.HandlerFunc(pprof.Index)))
		mux.Handle("/debug/pprof/cmdline", loopbackOnly(http.HandlerFunc(pprof.Cmdline)))
		mux.Handle("/debug/pprof/profile", loopbackOnly(http.HandlerFunc(pprof.Profile)))
		mux.Handle("/debug/pprof/symbol", loopbackOnly(http.HandlerFunc(pprof.Symbol)))
		mux.Handle("/debug/pprof/trace", loopbackOnly(http.HandlerFunc(pprof.Trace)))
	}
	return sameHostOnly(mux)
}

// sameHostOnly refuses, with 403, every request that a browser may have
// sent on behalf of a page of another site: a Host that is not a loopback
// name (DNS rebinding: attacker.example resolving to 127.0.0.1 makes the
// browser treat the admin API as the attacker's own origin), an Origin that
// is not the admin API's own (a page of another local server, say a
// developer's on localhost:3000, is another site, also in browsers that
// send no Sec-Fetch-Site), or a Sec-Fetch-Site that says another site made
// the request. Tools (curl, sidecar status, the hooks) send none of those.
func sameHostOnly(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch origin := r.Header.Get("Origin"); {
		case !loopback.Host(r.Host):
			forbidden(w, "the admin API answers requests for localhost, 127.0.0.1 or [::1] only (Host "+policy.Quote(r.Host)+")")
		case origin != "" && !sameOrigin(origin, r.Host):
			forbidden(w, "the admin API refuses requests from web pages of other sites (Origin "+policy.Quote(origin)+")")
		case crossSite(r.Header.Get("Sec-Fetch-Site")):
			forbidden(w, "the admin API refuses requests from web pages of other sites (Sec-Fetch-Site "+policy.Quote(r.Header.Get("Sec-Fetch-Site"))+")")
		default:
			h.ServeHTTP(w, r)
		}
	})
}

// sameOrigin reports whether origin, a browser's Origin header, is the
// admin API's own: http, a loopback host, and the host and port the
// request was made to.
func sameOrigin(origin, host string) bool {
	u, err := url.Parse(origin)
	return err == nil && u.Scheme == "http" && loopback.Origin(origin) && strings.EqualFold(u.Host, host)
}

// crossSite reports whether a browser's Sec-Fetch-Site says a page of
// another origin made the request: "same-site" is another port or
// subdomain, "cross-site" another site; "same-origin" and "none" (typed
// into the address bar) are fine.
func crossSite(secFetchSite string) bool {
	return secFetchSite == "cross-site" || secFetchSite == "same-site"
}

// loopbackOnly refuses clients that are not on this host: the lifecycle
// actions stop the pod's traffic, and profiles show memory contents and
// cost CPU, so only an operator on the pod gets them, whatever address
// the admin listener is bound to.
func loopbackOnly(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !loopback.Peer(r) {
			forbidden(w, r.URL.Path+" is served to clients on this host (loopback) only")
			return
		}
		h.ServeHTTP(w, r)
	})
}

// serviceParam is the request's ?service=, "" for none; an invalid one is
// answered with 400.
func serviceParam(w http.ResponseWriter, r *http.Request) (string, bool) {
	service := r.URL.Query().Get("service")
	if service != "" && !discovery.ValidServiceName(service) {
		writeError(w, http.StatusBadRequest, "service "+policy.Quote(service)+" is not a service name")
		return "", false
	}
	return service, true
}

// tapWriteTimeout bounds each write of a tap: a client that stops reading
// loses its tap then, which frees its slot and never holds the admin
// server's shutdown longer.
var tapWriteTimeout = 10 * time.Second

// tap streams the requests f matches, one JSON line each, until the
// client goes away, stops reading for tapWriteTimeout, or the recorder
// ends its taps (the admin server's shutdown). The admin server's write
// timeout does not apply to it: each write has tapWriteTimeout.
func tap(w http.ResponseWriter, r *http.Request, rec *requestlog.Recorder, f requestlog.TapFilter) {
	t, err := rec.Tap(f)
	switch {
	case errors.Is(err, requestlog.ErrClosed):
		writeError(w, http.StatusServiceUnavailable, err.Error())
		return
	case err != nil:
		writeError(w, http.StatusTooManyRequests, "a few taps at most watch at once: "+err.Error())
		return
	}
	defer t.Stop()
	rc := http.NewResponseController(w)
	_ = rc.SetWriteDeadline(time.Now().Add(tapWriteTimeout))
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
	_ = rc.Flush()
	enc := json.NewEncoder(w)
	var told int64 // requests missed the client was told of
	for {
		select {
		case <-r.Context().Done():
			return
		case req, ok := <-t.Lines():
			if !ok {
				return
			}
			_ = rc.SetWriteDeadline(time.Now().Add(tapWriteTimeout))
			// Requests the tap missed (over its rate, or this stream
			// behind) are said, as a line of their own: {"dropped": N}.
			if d := t.Dropped(); d > told {
				if enc.Encode(TapGap{Dropped: d - told}) != nil {
					return
				}
				told = d
			}
			if enc.Encode(req) != nil {
				return
			}
			// Flush what came together at once.
			for more := len(t.Lines()); more > 0; more-- {
				if req, ok = <-t.Lines(); !ok || enc.Encode(req) != nil {
					return
				}
			}
			if rc.Flush() != nil {
				return
			}
		}
	}
}

// TapGap is the line of a tap's stream that says how many requests it
// missed since the line before (over its rate, or its reader behind).
type TapGap struct {
	Dropped int64 `json:"dropped"`
}

func writeError(w http.ResponseWriter, status int, why string) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]string{"error": why})
}

func forbidden(w http.ResponseWriter, why string) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusForbidden)
	_ = json.NewEncoder(w).Encode(map[string]string{"error": why})
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}
