package discovery

import (
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/sidecar-mesh/sidecar/internal/attacktest"
	"github.com/sidecar-mesh/sidecar/pkg/policy"
)

// FuzzHost holds the two readings of a request's authority to their
// promises, for any host a client may write:
//   - ServiceName is idempotent, lower-case, and blind to ASCII case;
//   - a host whose service name is an IP address is an IP literal, so the
//     outbound proxy refuses it instead of looking it up;
//   - a service name, decorated with a port, a trailing dot or
//     .service.consul in any case, names itself and is no IP literal;
//   - an IP address, bracketed, with a port, a zone or a trailing dot, is
//     an IP literal.
func FuzzHost(f *testing.F) {
	for _, s := range attacktest.Seeds() {
		f.Add(s.Host)
	}
	for _, h := range []string{"user-service", "User-Service.Service.Consul.:8080", "a..", "a.service.consul.service.consul",
		"[::1]:80", "::ffff:10.0.0.1", "[fe80::1%25eth0]", "10.0.0.1.service.consul.", "x:1:2", "[a]:b", ""} {
		f.Add(h)
	}
	f.Fuzz(func(t *testing.T, host string) {
		n := ServiceName(host)
		if again := ServiceName(n); again != n {
			t.Fatalf("ServiceName(%q) = %q, but ServiceName(%q) = %q: not idempotent", host, n, n, again)
		}
		if n != asciiLower(n) {
			t.Fatalf("ServiceName(%q) = %q: not lower-case", host, n)
		}
		if up := asciiUpper(host); ServiceName(up) != n || IsIPLiteral(up) != IsIPLiteral(host) {
			t.Fatalf("%q and %q read differently: %q %v, %q %v", host, up, n, IsIPLiteral(host), ServiceName(up), IsIPLiteral(up))
		}
		if net.ParseIP(n) != nil && !IsIPLiteral(host) {
			t.Fatalf("ServiceName(%q) = %q is an IP address, yet IsIPLiteral(%q) is false: it would be looked up as a service", host, n, host)
		}
		if policy.ValidServiceName(n) {
			for _, d := range []string{n, n + ":80", n + ".", strings.ToUpper(n) + ".SERVICE.CONSUL", n + ".service.consul.:8080"} {
				if got := ServiceName(d); got != n || IsIPLiteral(d) {
					t.Fatalf("ServiceName(%q) = %q, IsIPLiteral %v; want %q and false", d, got, IsIPLiteral(d), n)
				}
			}
		}
		if a, err := netip.ParseAddr(host); err == nil {
			forms := []string{a.String(), a.String() + ".", netip.AddrPortFrom(a, 80).String()}
			if a.Is6() && a.Zone() == "" {
				forms = append(forms, "["+a.String()+"]", "["+a.String()+"%25eth0]:443")
			}
			for _, form := range forms {
				if !IsIPLiteral(form) {
					t.Fatalf("IsIPLiteral(%q) = false for the address %v", form, a)
				}
			}
		}
	})
}

func asciiLower(s string) string { return strings.Map(mapASCII('A', 'Z', 'a'-'A'), s) }
func asciiUpper(s string) string { return strings.Map(mapASCII('a', 'z', 'A'-'a'), s) }

func mapASCII(lo, hi rune, shift rune) func(rune) rune {
	return func(r rune) rune {
		if lo <= r && r <= hi {
			return r + shift
		}
		return r
	}
}
