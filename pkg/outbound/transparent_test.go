package outbound_test

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"

	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/downstream"
	"github.com/sidecar-mesh/sidecar/pkg/outbound"
	"github.com/sidecar-mesh/sidecar/pkg/policy"
	"github.com/sidecar-mesh/sidecar/pkg/transparent"
)

// redirector stands in for iptables: a connection from source address
// 127.0.0.N counts as redirected, with the original destination registered
// for N; one from 127.0.0.1 as made to the listener itself.
type redirector struct {
	mu   sync.Mutex // guards dsts
	dsts map[netip.Addr]netip.AddrPort
	next byte
}

func (r *redirector) originalDst(c net.Conn) (netip.AddrPort, bool) {
	src := c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr()
	r.mu.Lock()
	defer r.mu.Unlock()
	dst, ok := r.dsts[src]
	return dst, ok
}

// client is an HTTP client of an app that dialed dst and was redirected
// to the sidecar at addr; an invalid dst: a client of the listener itself.
func (r *redirector) client(t *testing.T, addr string, dst netip.AddrPort) *http.Client {
	t.Helper()
	local := netip.MustParseAddr("127.0.0.1")
	if dst.IsValid() {
		r.mu.Lock()
		r.next++
		local = netip.AddrFrom4([4]byte{127, 0, 0, 10 + r.next})
		r.dsts[local] = dst
		r.mu.Unlock()
	}
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: local.AsSlice()}}
	tr := &http.Transport{DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
		return d.DialContext(ctx, network, addr)
	}}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 10 * time.Second}
}

func startTransparent(t *testing.T, static map[string][]string, allow []string) (string, *redirector) {
	t.Helper()
	st, err := discovery.NewStatic(static)
	if err != nil {
		t.Fatal(err)
	}
	ps, _ := policy.Parse([]byte(""), "none")
	proxy, err := outbound.New(outbound.Config{Resolver: discovery.Chain{st}, Policies: outbound.NewStaticPolicies(ps), AllowHosts: allow})
	if err != nil {
		t.Fatal(err)
	}
	srv, err := downstream.Listen("outbound", "127.0.0.1:0", proxy, downstream.Limits{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	red := &redirector{dsts: map[netip.Addr]netip.AddrPort{}}
	var tl *transparent.Listener
	srv.WrapListener(func(ln net.Listener) net.Listener {
		tl = transparent.NewListener(transparent.Config{OriginalDst: red.originalDst}, ln)
		return tl
	})
	done := make(chan error, 1)
	go func() { done <- srv.Serve() }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
		_ = tl.Shutdown(ctx)
		<-done
		proxy.Close()
	})
	return srv.Addr().String(), red
}

func TestRoutingByOriginalDestination(t *testing.T) {
	var failing, healthy, external *server
	failing = newUpstream(t, func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusServiceUnavailable) })
	healthy = newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Seen-Forwarded-For", r.Header.Get("X-Forwarded-For"))
		w.Header().Set("X-Seen-Host", r.Host)
		_, _ = io.WriteString(w, "users")
	})
	external = newUpstream(t, func(w http.ResponseWriter, r *http.Request) { _, _ = io.WriteString(w, "external") })
	addr, red := startTransparent(t,
		map[string][]string{"users": {failing.addr(), healthy.addr()}},
		[]string{external.addr()})
	endpoint := netip.MustParseAddrPort(failing.addr())
	unknown := netip.MustParseAddrPort("198.18.0.99:80") // never dialed

	for _, tc := range []struct {
		name       string
		dst        netip.AddrPort // invalid: not redirected
		host       string
		wantStatus int
		wantBody   string
		wantReason string
	}{
		{"ip-host-of-an-endpoint", endpoint, endpoint.String(), 200, "users", ""},
		{"cluster-dns-name-of-an-endpoint", endpoint, "users.default.svc.cluster.local", 200, "users", ""},
		{"known-host-wins", unknown, "users", 200, "users", ""},
		{"allow-listed-destination", netip.MustParseAddrPort(external.addr()), external.addr(), 200, "external", ""},
		{"unknown-destination-ip-host", unknown, unknown.String(), 403, "", "not_allowed"},
		{"unknown-destination-unknown-name", unknown, "example.com", 403, "", "not_allowed"},
		{"not-redirected-ip-host", netip.AddrPort{}, endpoint.String(), 403, "", "not_allowed"},
		{"not-redirected-unknown-name", netip.AddrPort{}, "example.com", 503, "", "unknown_service"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := red.client(t, addr, tc.dst)
			// Several calls: round robin reaches the failing instance, and
			// retries take the call to the healthy one.
			for i := 0; i < 4; i++ {
				req, _ := http.NewRequest(http.MethodGet, "http://"+tc.host+"/users/1", nil)
				resp, err := c.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != tc.wantStatus {
					t.Fatalf("GET http://%s/ (original destination %v): %d %s, want %d", tc.host, tc.dst, resp.StatusCode, body, tc.wantStatus)
				}
				if tc.wantReason != "" {
					var e struct{ Error, Detail string }
					_ = json.Unmarshal(body, &e)
					if got := resp.Header.Get("x-sidecar-error"); got != tc.wantReason {
						t.Fatalf("x-sidecar-error = %q, want %q (%s)", got, tc.wantReason, e.Detail)
					}
					return
				}
				if string(body) != tc.wantBody {
					t.Fatalf("body %q, want %q", body, tc.wantBody)
				}
				if tc.wantBody == "users" {
					if resp.Header.Get("X-Seen-Forwarded-For") == "" || resp.Header.Get("X-Seen-Host") != tc.host {
						t.Errorf("upstream saw X-Forwarded-For %q and Host %q; want the sidecar's header and Host %q as sent",
							resp.Header.Get("X-Seen-Forwarded-For"), resp.Header.Get("X-Seen-Host"), tc.host)
					}
				}
			}
		})
	}
	if failing.requests.Load() == 0 {
		t.Error("the failing instance was never tried: the calls were not load balanced over the service")
	}

	t.Run("h2c-prior-knowledge", func(t *testing.T) {
		red.mu.Lock()
		red.next++
		local := netip.AddrFrom4([4]byte{127, 0, 0, 10 + red.next})
		red.dsts[local] = endpoint
		red.mu.Unlock()
		d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: local.AsSlice()}}
		tr := &http2.Transport{AllowHTTP: true, DialTLSContext: func(ctx context.Context, network, _ string, _ *tls.Config) (net.Conn, error) {
			return d.DialContext(ctx, network, addr)
		}}
		defer tr.CloseIdleConnections()
		for i := 0; i < 3; i++ {
			resp, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Get("http://" + endpoint.String() + "/users/1")
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 || string(body) != "users" || resp.ProtoMajor != 2 {
				t.Fatalf("h2c GET by address: %s %d %q (x-sidecar-error %q), want HTTP/2 200 users",
					resp.Proto, resp.StatusCode, body, resp.Header.Get("x-sidecar-error"))
			}
		}
	})
}

// A request routed by its original destination is answered for the service
// it was routed to, not for the name in its Host: a connect failure to the
// endpoint of "users" that the app called as users.default.svc.cluster.local
// says "users", as the metrics and spans do.
func TestRoutedByDestinationErrorNamesTheService(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := netip.MustParseAddrPort(ln.Addr().String())
	ln.Close() // connections to it are refused
	addr, red := startTransparent(t, map[string][]string{"users": {dead.String()}}, nil)
	resp, err := red.client(t, addr, dead).Get("http://users.default.svc.cluster.local/users/1")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var e struct{ Error, Service, Detail string }
	if err := json.NewDecoder(resp.Body).Decode(&e); err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusBadGateway || e.Error != "upstream_connect_failure" || e.Service != "users" {
		t.Fatalf("%d %+v; want 502 upstream_connect_failure for service users", resp.StatusCode, e)
	}
}
