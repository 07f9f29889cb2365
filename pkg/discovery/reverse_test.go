package discovery_test

import (
	"context"
	"errors"
	"net/netip"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/sidecar-mesh/sidecar/internal/consultest"
	"github.com/sidecar-mesh/sidecar/pkg/discovery"
)

func TestStaticServiceAt(t *testing.T) {
	s, err := discovery.NewStatic(map[string][]string{
		"users":  {"10.0.0.1:80", "[fd00::1]:80"},
		"orders": {"10.0.0.2:80"},
		"b-dup":  {"10.0.0.3:80"},
		"a-dup":  {"10.0.0.3:80"},
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for _, tc := range []struct {
		addr, want string
	}{
		{"10.0.0.1:80", "users"},
		{"[fd00::1]:80", "users"},
		{"[::ffff:10.0.0.2]:80", "orders"}, // v4-mapped is the same address
		{"10.0.0.3:80", "a-dup"},           // shared: the first by name
		{"10.0.0.1:81", ""},                // another port
		{"10.0.0.9:80", ""},
	} {
		got, err := s.ServiceAt(ctx, netip.MustParseAddrPort(tc.addr))
		if tc.want == "" {
			if !errors.Is(err, discovery.ErrUnknownService) {
				t.Errorf("ServiceAt(%s) = %q, %v; want ErrUnknownService", tc.addr, got, err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("ServiceAt(%s) = %q, %v; want %q", tc.addr, got, err, tc.want)
		}
	}
}

// failing is a ReverseResolver that can't answer.
type failing struct{ discovery.Static }

func (failing) ServiceAt(context.Context, netip.AddrPort) (string, error) {
	return "", errors.New("source down")
}

func TestChainServiceAt(t *testing.T) {
	a, _ := discovery.NewStatic(map[string][]string{"users": {"10.0.0.1:80"}})
	b, _ := discovery.NewStatic(map[string][]string{"other": {"10.0.0.1:80"}, "orders": {"10.0.0.2:80"}})
	chain := discovery.Chain{a, &failing{}, b}
	ctx := context.Background()
	if got, err := chain.ServiceAt(ctx, netip.MustParseAddrPort("10.0.0.1:80")); err != nil || got != "users" {
		t.Errorf("ServiceAt = %q, %v; want users (the first source wins)", got, err)
	}
	if got, err := chain.ServiceAt(ctx, netip.MustParseAddrPort("10.0.0.2:80")); err != nil || got != "orders" {
		t.Errorf("ServiceAt = %q, %v; want orders (a failing source does not hide a later answer)", got, err)
	}
	_, err := chain.ServiceAt(ctx, netip.MustParseAddrPort("10.0.0.9:80"))
	if err == nil || errors.Is(err, discovery.ErrUnknownService) {
		t.Errorf("ServiceAt(unknown) = %v; want the failing source's error, not 'unknown'", err)
	}
	if _, err := (discovery.Chain{a}).ServiceAt(ctx, netip.MustParseAddrPort("10.0.0.9:80")); !errors.Is(err, discovery.ErrUnknownService) {
		t.Errorf("ServiceAt(unknown) = %v; want ErrUnknownService", err)
	}
}

func TestConsulServiceAt(t *testing.T) {
	agent := consultest.Start(t)
	c := client(t, agent)
	register(t, c, &api.AgentServiceRegistration{ID: "users-1", Name: "users", Address: "10.0.0.2", Port: 8080})
	register(t, c, &api.AgentServiceRegistration{ID: "users-6", Name: "users", Address: "fd00::2", Port: 8080})
	// No address of its own: at its node's (the dev agent's 127.0.0.1).
	register(t, c, &api.AgentServiceRegistration{ID: "bare-1", Name: "bare", Port: 9005})
	register(t, c, &api.AgentServiceRegistration{ID: "sick-1", Name: "sick", Address: "10.0.0.9", Port: 80,
		Check: &api.AgentServiceCheck{TTL: "1m", Status: api.HealthCritical}})
	d := newConsul(t, discovery.ConsulConfig{Client: c})
	ctx := context.Background()

	for _, tc := range []struct {
		addr, want string
	}{
		{"10.0.0.2:8080", "users"},
		{"[fd00::2]:8080", "users"},
		{"127.0.0.1:9005", "bare"},
		{"10.0.0.9:80", "sick"}, // failing its check, still its service's address
		{"10.0.0.2:8081", ""},
		{"10.0.0.77:80", ""},
	} {
		got, err := d.ServiceAt(ctx, netip.MustParseAddrPort(tc.addr))
		if tc.want == "" {
			if !errors.Is(err, discovery.ErrUnknownService) {
				t.Errorf("ServiceAt(%s) = %q, %v; want ErrUnknownService", tc.addr, got, err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("ServiceAt(%s) = %q, %v; want %q", tc.addr, got, err, tc.want)
		}
	}

	// A new instance at an address looked up before is found once the
	// "none" answer expires (5 s), or at once when its service is watched.
	register(t, c, &api.AgentServiceRegistration{ID: "users-3", Name: "users", Address: "10.0.0.77", Port: 80})
	start := time.Now()
	eventually(t, "a new instance found by address", func() string {
		got, err := d.ServiceAt(ctx, netip.MustParseAddrPort("10.0.0.77:80"))
		if err != nil || got != "users" {
			return "ServiceAt(10.0.0.77:80) = " + got + ", " + errString(err) + "; want users"
		}
		return ""
	})
	if took := time.Since(start); took > 7*time.Second {
		t.Errorf("a new instance was found by address after %v, want within the 5 s of a remembered miss", took)
	}
}

func errString(err error) string {
	if err == nil {
		return "<nil>"
	}
	return err.Error()
}
