package mesh

import (
	"errors"
	"net"
	"strconv"
	"time"

	"github.com/hashicorp/consul/api"
)

// sidecarSuffix ends the name and ID of a sidecar proxy service, as
// Consul's own sidecar_service registrations name them.
const sidecarSuffix = "-sidecar-proxy"

// ProxyConfig describes this sidecar as Consul's mesh sees it: the
// connect-proxy in front of the app, which Consul's catalog
// (/v1/health/connect/<service>) and Consul's own proxies find when they
// call the app over mTLS. Zero fields take the defaults named.
type ProxyConfig struct {
	// Service is the app's service name. Required.
	Service string
	// ServiceID is the app's instance ID, as registered (discovery's
	// Registration.ID). Required.
	ServiceID string
	// Address and Port are where peers reach the inbound TLS listener
	// (mesh.inboundTLS): the pod IP and its port. Required.
	Address string
	Port    int
	// AppPort is the app's port on loopback, where inbound calls go.
	// Required.
	AppPort int
	// DeregisterCriticalAfter lets Consul drop a proxy whose sidecar
	// vanished without deregistering. Default 1m, as for the app.
	DeregisterCriticalAfter time.Duration
}

// ProxyRegistration is the registration of the app's sidecar proxy:
// `<ServiceID>-sidecar-proxy`, named `<Service>-sidecar-proxy`, of Kind
// connect-proxy, on Address:Port, with destination the app's service and
// instance and local service 127.0.0.1:AppPort. Its checks are those Consul
// gives a sidecar_service by default: a TCP check of Address:Port every
// 10s (the agent connects and closes, without a TLS handshake) and an
// alias of the app's own checks, so that the proxy is healthy when the app
// is. The TCP check starts passing (Consul would hold it critical for up
// to 10s, until its first run): register once the listener accepts. The
// registration is to be removed with the app's.
func ProxyRegistration(cfg ProxyConfig) (*api.AgentServiceRegistration, error) {
	if cfg.Service == "" || cfg.ServiceID == "" || cfg.Address == "" || cfg.Port <= 0 || cfg.AppPort <= 0 {
		return nil, errors.New("mesh proxy registration: service, service ID, address, port and app port are required")
	}
	if cfg.DeregisterCriticalAfter <= 0 {
		cfg.DeregisterCriticalAfter = time.Minute
	}
	id := cfg.ServiceID + sidecarSuffix
	return &api.AgentServiceRegistration{
		Kind:    api.ServiceKindConnectProxy,
		ID:      id,
		Name:    cfg.Service + sidecarSuffix,
		Address: cfg.Address,
		Port:    cfg.Port,
		Proxy: &api.AgentServiceConnectProxyConfig{
			DestinationServiceName: cfg.Service,
			DestinationServiceID:   cfg.ServiceID,
			LocalServiceAddress:    "127.0.0.1",
			LocalServicePort:       cfg.AppPort,
		},
		Checks: api.AgentServiceChecks{
			{
				CheckID:                        "service:" + id + ":1",
				Name:                           "Connect Sidecar Listening",
				TCP:                            net.JoinHostPort(cfg.Address, strconv.Itoa(cfg.Port)),
				Interval:                       "10s",
				Status:                         api.HealthPassing,
				DeregisterCriticalServiceAfter: cfg.DeregisterCriticalAfter.String(),
			},
			{
				CheckID:      "service:" + id + ":2",
				Name:         "Connect Sidecar Aliasing " + cfg.ServiceID,
				AliasService: cfg.ServiceID,
			},
		},
	}, nil
}
