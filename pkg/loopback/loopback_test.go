package loopback

import (
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestAddr(t *testing.T) {
	for _, tc := range []struct {
		remote string
		want   bool
	}{
		{"127.0.0.1:5000", true},
		{"127.8.9.10:1", true},
		{"[::1]:5000", true},
		{"[::ffff:127.0.0.1]:5000", true},
		{"10.1.2.3:5000", false},
		{"192.0.2.2:80", false},
		{"[2001:db8::1]:5000", false},
		{"[::ffff:10.0.0.1]:5000", false},
		{"0.0.0.0:80", false},
		{"127.0.0.1", false}, // no port: not what net/http sets
		{"localhost:80", false},
		{"", false},
		{"@", false}, // a Unix socket's peer
	} {
		if got := Addr(tc.remote); got != tc.want {
			t.Errorf("Addr(%q) = %v, want %v", tc.remote, got, tc.want)
		}
	}
}

func TestHost(t *testing.T) {
	for _, tc := range []struct {
		host string
		want bool
	}{
		{"localhost", true},
		{"LocalHost:15000", true},
		{"127.0.0.1", true},
		{"127.0.0.1:15000", true},
		{"127.1.2.3:80", true},
		{"[::1]", true},
		{"[::1]:15000", true},
		{"[::ffff:127.0.0.1]:15000", true},
		{"", false},
		{"attacker.example", false},
		{"attacker.example:15000", false},
		{"localhost.", false},
		{"localhost.attacker.example", false},
		{"127.0.0.1.nip.io:15000", false},
		{"127.1", false},
		{"0.0.0.0:15000", false},
		{"10.0.0.5:15000", false},
		{"[2001:db8::1]:15000", false},
		{"::1", true},
	} {
		if got := Host(tc.host); got != tc.want {
			t.Errorf("Host(%q) = %v, want %v", tc.host, got, tc.want)
		}
	}
}

func TestOrigin(t *testing.T) {
	for _, tc := range []struct {
		origin string
		want   bool
	}{
		{"http://localhost:15000", true},
		{"http://127.0.0.1:15000", true},
		{"https://[::1]:8443", true},
		{"http://localhost", true},
		{"null", false},
		{"", false},
		{"http://attacker.example", false},
		{"http://127.0.0.1.attacker.example", false},
		{"file://", false},
		{"ftp://127.0.0.1", false},
		{"http://user@127.0.0.1", false},
		{"http://127.0.0.1/page", false},
	} {
		if got := Origin(tc.origin); got != tc.want {
			t.Errorf("Origin(%q) = %v, want %v", tc.origin, got, tc.want)
		}
	}
}
