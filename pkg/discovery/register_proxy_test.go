package discovery_test

import (
	"context"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/sidecar-mesh/sidecar/internal/consultest"
	"github.com/sidecar-mesh/sidecar/pkg/discovery"
)

// The sidecar proxy's port and the app's are required.
func TestRegisterSidecarProxyValidates(t *testing.T) {
	c, err := discovery.NewClient(discovery.ClientConfig{})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []discovery.SidecarProxy{{AppPort: 8080}, {Port: 15008}} {
		cfg := discovery.RegistrationConfig{Client: c, Service: "web", Address: "10.0.0.7", Port: 15006, SidecarProxy: &p}
		if reg, err := discovery.Register(cfg); err == nil {
			_ = reg.Deregister(context.Background())
			t.Errorf("Register with SidecarProxy %+v: no error, want one naming the ports", p)
		}
	}
}

// The agent takes the sidecar proxy registered with the app, lists it as
// the app's mesh instance, its health follows the app's, and it is
// removed with the app.
func TestRegisterSidecarProxy(t *testing.T) {
	agent := consultest.Start(t)
	c := client(t, agent)
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

	var ready atomic.Bool
	ready.Store(true)
	reg, err := discovery.Register(discovery.RegistrationConfig{
		Client: c, Service: "web", ID: "web-1", Address: "127.0.0.1", Port: 15006,
		TTL: time.Second, Ready: ready.Load, SidecarProxy: &discovery.SidecarProxy{Port: port, AppPort: 8080},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Deregister(context.Background())

	passing := func() []*api.ServiceEntry {
		entries, _, err := c.Health().Connect("web", "", true, nil)
		if err != nil {
			t.Fatalf("GET /v1/health/connect/web?passing: %v", err)
		}
		return entries
	}
	eventually(t, "the proxy listed as web's passing mesh instance", func() string {
		if n := len(passing()); n != 1 {
			return itoa(n) + " passing mesh instances of web, want 1"
		}
		return ""
	})
	s := passing()[0].Service
	if s.Kind != api.ServiceKindConnectProxy || s.ID != "web-1-sidecar-proxy" || s.Port != port ||
		s.Proxy == nil || s.Proxy.DestinationServiceName != "web" || s.Proxy.DestinationServiceID != "web-1" || s.Proxy.LocalServicePort != 8080 {
		t.Errorf("web's mesh instance = %+v (proxy %+v), want kind connect-proxy, ID web-1-sidecar-proxy, port %d, destination web/web-1, local port 8080", s, s.Proxy, port)
	}

	ready.Store(false)
	reg.Refresh()
	eventually(t, "no passing mesh instance of web while the app is not ready", func() string {
		if n := len(passing()); n != 0 {
			return itoa(n) + " passing mesh instances of web, want 0"
		}
		return ""
	})

	if err := reg.Deregister(context.Background()); err != nil {
		t.Fatal(err)
	}
	if all, _, err := c.Health().Connect("web", "", false, nil); err != nil || len(all) != 0 {
		t.Errorf("web's mesh instances after Deregister: %d, error %v; want none", len(all), err)
	}
	if all, _, err := c.Health().Service("web", "", false, nil); err != nil || len(all) != 0 {
		t.Errorf("web's instances after Deregister: %d, error %v; want none", len(all), err)
	}
}
