package upstream

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
)

// refuseLoopback is a TransportConfig.RefuseResolved that refuses loopback
// addresses, as the sidecar's does for endpoints from Consul, and notes
// what it was asked about.
type refuseLoopback struct {
	mu    sync.Mutex // guards asked
	asked []netip.AddrPort
}

const loopbackReason = "loopback, the sidecar's own host"

func (r *refuseLoopback) refuse(ap netip.AddrPort) string {
	r.mu.Lock()
	r.asked = append(r.asked, ap)
	r.mu.Unlock()
	if ap.Addr().IsLoopback() {
		return loopbackReason
	}
	return ""
}

func (r *refuseLoopback) askedAbout() []netip.AddrPort {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]netip.AddrPort(nil), r.asked...)
}

// A host name that resolves to the sidecar's own host when the transport
// dials it (whatever it resolved to when discovery checked it) is not
// connected to: a *ConnectError says why, for HTTP/1.1, HTTP/2 and a
// tunnel's Dial alike. An IP literal is never put to the check: static
// endpoints on 127.0.0.1 are the operator's choice.
func TestRefuseResolvedHostName(t *testing.T) {
	var served atomic.Int64
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		served.Add(1)
		io.WriteString(w, "reached")
	}))
	defer up.Close()
	_, port, _ := net.SplitHostPort(strings.TrimPrefix(up.URL, "http://"))
	ip := "127.0.0.1:" + port

	for _, tc := range []struct {
		name string
		host string // the name dialled, resolving to 127.0.0.1
		// dial, when set, is the config's DialContext: it resolves host
		// itself.
		dial func(ctx context.Context, network, addr string) (net.Conn, error)
	}{
		{name: "net.Dialer, before connecting", host: "localhost"},
		{name: "DialContext, after connecting", host: "rebound.example",
			dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
				// A resolver of its own: the name now points at loopback.
				var d net.Dialer
				return d.DialContext(ctx, network, strings.Replace(addr, "rebound.example", "127.0.0.1", 1))
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rl := &refuseLoopback{}
			tr := NewTransport(TransportConfig{DialContext: tc.dial, RefuseResolved: rl.refuse})
			defer tr.Close()
			name := net.JoinHostPort(tc.host, port)
			before := served.Load()

			check := func(what string, err error) {
				t.Helper()
				var ce *ConnectError
				var re *RefusedAddrError
				if !errors.As(err, &ce) || !errors.As(err, &re) || !strings.Contains(err.Error(), loopbackReason) {
					t.Errorf("%s to %s: %v; want a *ConnectError refusing 127.0.0.1:%s as %s", what, name, err, port, loopbackReason)
				}
			}
			for _, proto := range []int{1, 2} {
				req, _ := http.NewRequest(http.MethodGet, "http://"+name+"/", nil)
				req.ProtoMajor = proto
				resp, err := tr.Send(req, 0)
				if resp != nil {
					resp.Body.Close()
				}
				check("HTTP/"+strconv.Itoa(proto)+" GET", err)
			}
			c, err := tr.Dial(context.Background(), name, 0)
			if c != nil {
				c.Close()
			}
			check("Dial", err)
			if n := served.Load() - before; n != 0 {
				t.Errorf("the endpoint served %d requests sent to %s; want none", n, name)
			}
			for _, ap := range rl.askedAbout() {
				if ap.String() != ip {
					t.Errorf("RefuseResolved was asked about %v; want only %s, what %s resolves to", ap, ip, name)
				}
			}

			// The IP literal itself is dialled, never asked about.
			n := len(rl.askedAbout())
			req, _ := http.NewRequest(http.MethodGet, "http://"+ip+"/", nil)
			resp, err := tr.Send(req, 0)
			if err != nil {
				t.Fatalf("GET http://%s/: %v; want the static endpoint's answer", ip, err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if string(b) != "reached" {
				t.Errorf("GET http://%s/ = %q; want %q", ip, b, "reached")
			}
			if len(rl.askedAbout()) != n {
				t.Errorf("RefuseResolved was asked about the IP literal %s: %v", ip, rl.askedAbout()[n:])
			}
		})
	}
}

// A name whose address RefuseResolved allows is connected to as ever.
func TestRefuseResolvedAllows(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "reached") }))
	defer up.Close()
	_, port, _ := net.SplitHostPort(strings.TrimPrefix(up.URL, "http://"))
	var asked atomic.Int64
	tr := NewTransport(TransportConfig{RefuseResolved: func(netip.AddrPort) string { asked.Add(1); return "" }})
	defer tr.Close()
	req, _ := http.NewRequest(http.MethodGet, "http://localhost:"+port+"/", nil)
	resp, err := tr.Send(req, 0)
	if err != nil {
		t.Fatalf("GET http://localhost:%s/: %v", port, err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(b) != "reached" || asked.Load() == 0 {
		t.Errorf("GET http://localhost:%s/ = %q, RefuseResolved asked %d times; want %q, asked", port, b, asked.Load(), "reached")
	}
}
