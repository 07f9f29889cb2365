package outbound_test

import (
	"bufio"
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"testing"

	"golang.org/x/net/http/httpguts"

	"github.com/sidecar-mesh/sidecar/internal/attacktest"
	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/outbound"
	"github.com/sidecar-mesh/sidecar/pkg/policy"
	"github.com/sidecar-mesh/sidecar/pkg/upstream"
)

// The routing fuzz target's world: one service and two allow-listed
// external hosts. Dials are recorded and fail, so nothing leaves the test.
const (
	fuzzEndpoint = "127.0.0.2:9"
	fuzzAllowed  = "allowed.example:8080" // this port only
	fuzzExternal = "ext.example"          // any port
)

// FuzzRouting holds the outbound proxy to "never an open proxy", for any
// request target and Host header net/http's server would accept: the only
// addresses it dials are the service's endpoint and the allow-listed
// hosts, an IP-literal authority is refused before routing, and nothing
// is ever answered 200 (every dial fails).
func FuzzRouting(f *testing.F) {
	for _, s := range attacktest.Seeds() {
		f.Add(s.Method, s.Target, s.Host)
	}
	f.Add("GET", "http://ALLOWED.example:8080/x", "svc")
	f.Add("GET", "/", "allowed.example:8081")
	f.Add("CONNECT", "ext.example:443", "ext.example:443")
	f.Add("GET", "/", "svc.service.consul.:80")

	var (
		mu    sync.Mutex
		dials []string
	)
	static, err := discovery.NewStatic(map[string][]string{"svc": {fuzzEndpoint}})
	if err != nil {
		f.Fatal(err)
	}
	ps, err := policy.Parse([]byte("service: svc\nretry: {attempts: 1}\n"+
		"circuitBreaker: {consecutiveFailures: 100000, minRequests: 1000000}\noutlierDetection: {consecutiveFailures: 100000}\n"), "fuzz")
	if err != nil {
		f.Fatal(err)
	}
	p, err := outbound.New(outbound.Config{
		Resolver:   discovery.Chain{static},
		Policies:   outbound.NewStaticPolicies(ps),
		AllowHosts: []string{fuzzAllowed, fuzzExternal},
		Transport: upstream.TransportConfig{DialContext: func(_ context.Context, _, addr string) (net.Conn, error) {
			mu.Lock()
			dials = append(dials, addr)
			mu.Unlock()
			return nil, errors.New("fuzz: no network")
		}},
	})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(p.Close)

	f.Fuzz(func(t *testing.T, method, target, host string) {
		r := serverRequest(method, target, host)
		if r == nil {
			return
		}
		mu.Lock()
		dials = dials[:0]
		mu.Unlock()
		rec := httptest.NewRecorder()
		func() {
			defer func() {
				if v := recover(); v != nil && v != http.ErrAbortHandler {
					panic(v)
				}
			}()
			p.ServeHTTP(rec, r)
		}()
		mu.Lock()
		got := append([]string(nil), dials...)
		mu.Unlock()
		for _, d := range got {
			if h, _, _ := net.SplitHostPort(d); d != fuzzEndpoint && d != fuzzAllowed && h != fuzzExternal {
				t.Fatalf("%s %s (Host %q) dialed %s: only %s, %s and %s:* may be dialed", method, target, r.Host, d, fuzzEndpoint, fuzzAllowed, fuzzExternal)
			}
		}
		if ipAuthority(r.Host) && (len(got) > 0 || (rec.Code != 403 && rec.Code != 400)) {
			t.Fatalf("%s %s: authority %q is an IP address, yet the answer is %d with dials %v; want 403 (or 400) and none", method, target, r.Host, rec.Code, got)
		}
		if rec.Code == 200 {
			t.Fatalf("%s %s (Host %q): 200, though every dial fails", method, target, r.Host)
		}
	})
}

// serverRequest parses a request as net/http's server would, or returns
// nil where the server would refuse it itself.
func serverRequest(method, target, host string) *http.Request {
	if strings.ContainsAny(method+target+host, "\r\n") {
		return nil
	}
	r, err := http.ReadRequest(bufio.NewReader(strings.NewReader(method + " " + target + " HTTP/1.1\r\nHost: " + host + "\r\n\r\n")))
	if err != nil || !httpguts.ValidHostHeader(host) {
		return nil
	}
	if r.Method == http.MethodConnect && r.URL.Host == "" {
		return nil
	}
	r.RemoteAddr = "127.0.0.1:5555"
	r.RequestURI = target
	return r.WithContext(context.Background())
}

// ipAuthority is an independent reading of "this authority is an IP
// address": without port, brackets, zone, trailing dots and Consul
// suffixes, it parses as one.
func ipAuthority(authority string) bool {
	h := strings.ToLower(authority)
	if hh, _, err := net.SplitHostPort(h); err == nil {
		h = hh
	}
	h = strings.TrimSuffix(strings.TrimPrefix(h, "["), "]")
	if i := strings.IndexByte(h, '%'); i >= 0 {
		h = h[:i]
	}
	for {
		n := strings.TrimSuffix(strings.TrimSuffix(h, "."), ".service.consul")
		if n == h {
			break
		}
		h = n
	}
	_, err := netip.ParseAddr(h)
	return err == nil
}
