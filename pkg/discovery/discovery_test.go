package discovery

import (
	"context"
	"errors"
	"strings"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestServiceName(t *testing.T) {
	for host, want := range map[string]string{
		"user-service":                     "user-service",
		"user-service:80":                  "user-service",
		"user-service.service.consul":      "user-service",
		"User-Service.Service.Consul.":     "user-service",
		"user-service.service.consul:8080": "user-service",
		"":                                 "",
	} {
		if got := ServiceName(host); got != want {
			t.Errorf("ServiceName(%q) = %q, want %q", host, got, want)
		}
	}
}

func TestIsIPLiteral(t *testing.T) {
	for host, want := range map[string]bool{
		"10.0.0.1": true, "10.0.0.1:80": true, "[::1]:8080": true, "::1": true, "[fe80::1%eth0]:80": true,
		"user-service": false, "user-service:80": false, "1.2.3.example": false,
	} {
		if got := IsIPLiteral(host); got != want {
			t.Errorf("IsIPLiteral(%q) = %v, want %v", host, got, want)
		}
	}
}

func TestStatic(t *testing.T) {
	s, err := NewStatic(map[string][]string{"a": {"127.0.0.1:1", "[::1]:2"}, "empty": {}})
	if err != nil {
		t.Fatal(err)
	}
	set, err := s.Resolve(context.Background(), "a")
	if err != nil || len(set.Endpoints) != 2 || set.Endpoints[1].Addr != "[::1]:2" || set.Source != "static" {
		t.Fatalf("Resolve(a) = %+v, %v", set, err)
	}
	if set, err := s.Resolve(context.Background(), "empty"); err != nil || len(set.Endpoints) != 0 {
		t.Fatalf("a known service with no endpoints: %+v, %v; want an empty set, no error", set, err)
	}
	if _, err := s.Resolve(context.Background(), "nope"); !errors.Is(err, ErrUnknownService) {
		t.Fatalf("Resolve(nope) error %v, want ErrUnknownService", err)
	}
	if got := s.Services(); len(got) != 2 || got[0].Service != "a" {
		t.Fatalf("Services() = %+v", got)
	}
}

func TestStaticRejects(t *testing.T) {
	for _, tc := range []struct {
		services map[string][]string
		want     string
	}{
		{map[string][]string{"a": {"localhost:80"}}, "want an IP address"},
		{map[string][]string{"a": {"127.0.0.1"}}, "want IP:port"},
		{map[string][]string{"a": {"127.0.0.1:0"}}, "out of range"},
		{map[string][]string{"A": {"127.0.0.1:1"}}, "lower-case"},
		{map[string][]string{"a.service.consul": {"127.0.0.1:1"}}, "without port or .service.consul"},
	} {
		if _, err := NewStatic(tc.services); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("NewStatic(%v) error %v, want one saying %q", tc.services, err, tc.want)
		}
	}
}

func TestChainOrder(t *testing.T) {
	first, _ := NewStatic(map[string][]string{"a": {"127.0.0.1:1"}})
	second, _ := NewStatic(map[string][]string{"a": {"127.0.0.1:2"}, "b": {"127.0.0.1:3"}})
	c := Chain{first, second}
	if set, _ := c.Resolve(context.Background(), "a"); set.Endpoints[0].Addr != "127.0.0.1:1" {
		t.Fatalf("a resolved to %v, want the first source's endpoint", set.Endpoints)
	}
	if set, _ := c.Resolve(context.Background(), "b"); set.Endpoints[0].Addr != "127.0.0.1:3" {
		t.Fatalf("b resolved to %v, want the second source's endpoint", set.Endpoints)
	}
	if _, err := c.Resolve(context.Background(), "c"); !errors.Is(err, ErrUnknownService) {
		t.Fatalf("c: %v, want ErrUnknownService", err)
	}
	if got := len(c.Services()); got != 2 {
		t.Fatalf("Services() lists %d, want 2 (a once)", got)
	}
}
