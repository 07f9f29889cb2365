// Package hostip helps test what a server answers to a peer on another
// host: it finds an address of this machine that is not loopback (a
// server listening there and a client dialing it from this machine make a
// connection whose peer address is not loopback), serves a handler on a
// real listener, and sends it requests.
package hostip

import (
	"io"
	"net"
	"net/http"
	"net/netip"
	"testing"
)

// NonLoopback returns an IPv4 address of one of this machine's interfaces
// that is neither loopback nor link-local, and skips the test when there
// is none.
func NonLoopback(t testing.TB) string {
	t.Helper()
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		t.Fatalf("listing this machine's addresses: %v", err)
	}
	for _, a := range addrs {
		p, err := netip.ParsePrefix(a.String())
		if err != nil {
			continue
		}
		ip := p.Addr()
		if ip.Is4() && !ip.IsLoopback() && !ip.IsLinkLocalUnicast() && !ip.IsUnspecified() {
			return ip.String()
		}
	}
	t.Skip("this machine has no IPv4 address other than loopback: the non-loopback peer is tested by table only")
	return ""
}

// Serve serves h on a listener at ip, any port, until the test ends, and
// returns its host:port.
func Serve(t testing.TB, ip string, h http.Handler) string {
	t.Helper()
	ln, err := net.Listen("tcp", net.JoinHostPort(ip, "0"))
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h}
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(ln) }()
	t.Cleanup(func() { srv.Close(); <-done })
	return ln.Addr().String()
}

// Call sends one request to the server at addr, on a connection of its
// own, with the Host (when not empty) and headers given, and returns the
// status and the body.
func Call(t testing.TB, addr, method, path, host string, header map[string]string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, "http://"+addr+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	if host != "" {
		req.Host = host
	}
	for k, v := range header {
		req.Header.Set(k, v)
	}
	c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s (Host %q): %v", method, path, host, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}
