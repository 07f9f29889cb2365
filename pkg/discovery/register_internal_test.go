package discovery

import (
	"reflect"
	"testing"

	"github.com/hashicorp/consul/api"
)

func TestProxyRegistrationFields(t *testing.T) {
	got := proxyRegistration(withDefaults(RegistrationConfig{
		Service: "web", Address: "10.0.0.7", Port: 15006, SidecarProxy: &SidecarProxy{Port: 15008, AppPort: 8080},
	}))
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
		t.Errorf("proxyRegistration = %+v\nwant %+v", got, want)
	}

	v6 := proxyRegistration(withDefaults(RegistrationConfig{Service: "web", ID: "w", Address: "fd00::7", Port: 15006,
		SidecarProxy: &SidecarProxy{Port: 15008, AppPort: 8080}}))
	if v6.Checks[0].TCP != "[fd00::7]:15008" {
		t.Errorf("proxyRegistration on an IPv6 address: TCP check %q, want [fd00::7]:15008", v6.Checks[0].TCP)
	}
}
