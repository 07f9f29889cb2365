package consultest

import (
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
)

// Observer is a reverse proxy in front of an agent's HTTP API that records
// what clients ask: each request's path as sent (escapes kept) and the
// blocking queries (those with an index) in flight. Point a client at Addr
// to see what it costs the agent. Safe for concurrent use.
type Observer struct {
	srv *httptest.Server

	mu    sync.Mutex // guards paths
	paths []string

	blocking    atomic.Int64 // blocking queries in flight
	maxBlocking atomic.Int64
}

// Observe starts an Observer in front of a; it stops when t ends (after
// the cleanups registered later, such as a client's Close).
func Observe(t testing.TB, a *Agent) *Observer {
	t.Helper()
	target := &url.URL{Scheme: "http", Host: a.Addr()}
	tr := &http.Transport{MaxIdleConnsPerHost: 64}
	o := &Observer{}
	proxy := &httputil.ReverseProxy{
		Rewrite:   func(r *httputil.ProxyRequest) { r.SetURL(target) },
		Transport: tr,
		// A client that gives up its blocking query is no error to report.
		ErrorHandler: func(w http.ResponseWriter, _ *http.Request, _ error) { w.WriteHeader(http.StatusBadGateway) },
	}
	o.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		o.mu.Lock()
		o.paths = append(o.paths, r.URL.EscapedPath())
		o.mu.Unlock()
		if i := r.URL.Query().Get("index"); i != "" && i != "0" {
			n := o.blocking.Add(1)
			defer o.blocking.Add(-1)
			for m := o.maxBlocking.Load(); n > m && !o.maxBlocking.CompareAndSwap(m, n); m = o.maxBlocking.Load() {
			}
		}
		proxy.ServeHTTP(w, r)
	}))
	t.Cleanup(func() {
		o.srv.Close()
		tr.CloseIdleConnections()
	})
	return o
}

// Addr is the host:port clients use instead of the agent's.
func (o *Observer) Addr() string { return strings.TrimPrefix(o.srv.URL, "http://") }

// Paths returns the paths of the requests so far whose path starts with
// prefix ("" for all), in arrival order.
func (o *Observer) Paths(prefix string) []string {
	o.mu.Lock()
	defer o.mu.Unlock()
	var out []string
	for _, p := range o.paths {
		if strings.HasPrefix(p, prefix) {
			out = append(out, p)
		}
	}
	return out
}

// Blocking is the number of blocking queries in flight now.
func (o *Observer) Blocking() int { return int(o.blocking.Load()) }

// MaxBlocking is the most blocking queries there were in flight at once.
func (o *Observer) MaxBlocking() int { return int(o.maxBlocking.Load()) }
