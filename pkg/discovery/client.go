package discovery

import (
	"github.com/hashicorp/consul/api"
)

// ClientConfig says which Consul agent a client talks to. Everything it
// leaves empty comes from the standard CONSUL_* environment variables
// (token, TLS), as the Consul CLI takes it.
type ClientConfig struct {
	// Address is the agent's HTTP API, host:port or URL. Empty:
	// CONSUL_HTTP_ADDR, else 127.0.0.1:8500.
	Address string
	// Datacenter is the one queries go to. Empty: the agent's own.
	Datacenter string
	// Token is the ACL token. Empty: CONSUL_HTTP_TOKEN.
	Token string
	// NonPooled leaves no idle connection behind once a call returns, for
	// a process that makes a few calls and exits (the CLI). The default
	// pools connections, for the watches that run for the process's life.
	NonPooled bool
}

// NewClient is a client of a Consul agent, for ConsulConfig,
// PolicyWatchConfig and RegistrationConfig. It does not contact the
// agent. Errors are the Consul client's own (a malformed address, TLS
// files that do not load).
func NewClient(cfg ClientConfig) (*api.Client, error) {
	cc := api.DefaultConfig()
	if cfg.NonPooled {
		cc = api.DefaultNonPooledConfig()
	}
	if cfg.Address != "" {
		cc.Address = cfg.Address
	}
	if cfg.Datacenter != "" {
		cc.Datacenter = cfg.Datacenter
	}
	if cfg.Token != "" {
		cc.Token = cfg.Token
	}
	return api.NewClient(cc)
}
