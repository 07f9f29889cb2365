package mesh_test

import (
	"net"
	"reflect"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/sidecar-mesh/sidecar/pkg/mesh"
)

func TestProxyRegistrationFields(t *testing.T) {
	got, err := mesh.ProxyRegistration(mesh.ProxyConfig{
		Service: "web", ServiceID: "web-10.0.0.7-15006", Address: "10.0.0.7", Port: 15008, AppPort: 8080,
	})
	if err != nil {
		t.Fatal(err)
	}
	want := &api.AgentServiceRegistration{
		Kind:    api.ServiceKindConnectProxy,
		ID:      "web-10.0.0.7-15006-sidecar-proxy",
		Name:    "web-sidecar-proxy",
		Address: "10.0.0.7",
		Port:    15008,
		Proxy: &api.AgentServiceConnectProxyConfig{
			DestinationServiceName: "web",
			DestinationServiceID:   "web-10.0.0.7-15006",
			LocalServiceAddress:    "127.0.0.1",
			LocalServicePort:       8080,
		},
		Checks: api.AgentServiceChecks{
			{
				CheckID:                        "service:web-10.0.0.7-15006-sidecar-proxy:1",
				Name:                           "Connect Sidecar Listening",
				TCP:                            "10.0.0.7:15008",
				Interval:                       "10s",
				Status:                         api.HealthPassing,
				DeregisterCriticalServiceAfter: "1m0s",
			},
			{
				CheckID:      "service:web-10.0.0.7-15006-sidecar-proxy:2",
				Name:         "Connect Sidecar Aliasing web-10.0.0.7-15006",
				AliasService: "web-10.0.0.7-15006",
			},
		},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("ProxyRegistration = %+v\nwant %+v", got, want)
	}

	v6, err := mesh.ProxyRegistration(mesh.ProxyConfig{Service: "web", ServiceID: "w", Address: "fd00::7", Port: 15008, AppPort: 8080})
	if err != nil || v6.Checks[0].TCP != "[fd00::7]:15008" {
		t.Errorf("ProxyRegistration on an IPv6 address: TCP check %q, error %v; want [fd00::7]:15008", v6.Checks[0].TCP, err)
	}

	for _, cfg := range []mesh.ProxyConfig{
		{ServiceID: "w", Address: "a", Port: 1, AppPort: 1},
		{Service: "web", Address: "a", Port: 1, AppPort: 1},
		{Service: "web", ServiceID: "w", Port: 1, AppPort: 1},
		{Service: "web", ServiceID: "w", Address: "a", AppPort: 1},
		{Service: "web", ServiceID: "w", Address: "a", Port: 1},
	} {
		if reg, err := mesh.ProxyRegistration(cfg); err == nil {
			t.Errorf("ProxyRegistration(%+v) = %+v, nil; want an error", cfg, reg)
		}
	}
}

// TestProxyRegistrationInConsul: the agent takes the registration, lists
// the proxy as the app's mesh instance, and its health follows the app's.
func TestProxyRegistrationInConsul(t *testing.T) {
	_, c := meshAgent(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0") // the inbound TLS listener, for the TCP check
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			conn.Close()
		}
	}()
	port := ln.Addr().(*net.TCPAddr).Port

	app := &api.AgentServiceRegistration{
		ID: "web-1", Name: "web", Address: "127.0.0.1", Port: 15006,
		Check: &api.AgentServiceCheck{CheckID: "service:web-1", TTL: "1m", Status: api.HealthPassing},
	}
	if err := c.Agent().ServiceRegister(app); err != nil {
		t.Fatalf("register the app: %v", err)
	}
	reg, err := mesh.ProxyRegistration(mesh.ProxyConfig{Service: "web", ServiceID: "web-1", Address: "127.0.0.1", Port: port, AppPort: 8080})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Agent().ServiceRegister(reg); err != nil {
		t.Fatalf("register %+v: %v", reg, err)
	}

	passing := func() []*api.ServiceEntry {
		entries, _, err := c.Health().Connect("web", "", true, nil)
		if err != nil {
			t.Fatalf("GET /v1/health/connect/web?passing: %v", err)
		}
		return entries
	}
	waitFor(t, 5*time.Second, "the proxy listed as web's passing mesh instance", func() bool { return len(passing()) == 1 })
	s := passing()[0].Service
	if s.Kind != api.ServiceKindConnectProxy || s.ID != "web-1-sidecar-proxy" || s.Port != port ||
		s.Proxy == nil || s.Proxy.DestinationServiceName != "web" || s.Proxy.DestinationServiceID != "web-1" || s.Proxy.LocalServicePort != 8080 {
		t.Errorf("web's mesh instance = %+v (proxy %+v), want kind connect-proxy, ID web-1-sidecar-proxy, port %d, destination web/web-1, local port 8080", s, s.Proxy, port)
	}

	if err := c.Agent().UpdateTTL("service:web-1", "app not ready", api.HealthCritical); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "no passing mesh instance of web while the app is critical", func() bool { return len(passing()) == 0 })

	if err := c.Agent().ServiceDeregister(reg.ID); err != nil {
		t.Fatalf("deregister %s: %v", reg.ID, err)
	}
	if all, _, err := c.Health().Connect("web", "", false, nil); err != nil || len(all) != 0 {
		t.Errorf("web's mesh instances after deregistering the proxy: %d, error %v; want none", len(all), err)
	}
}
