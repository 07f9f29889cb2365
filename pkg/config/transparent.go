package config

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/policy"
)

// Transparent configures transparent interception: the app's outbound TCP
// redirected to the outbound listener by the rules of `sidecar iptables`
// (in Kubernetes, an init container). Zero values mean the defaults named.
type Transparent struct {
	// Enabled serves redirected connections on the outbound listener:
	// their original destination is read (SO_ORIGINAL_DST), HTTP is routed
	// by Host and then by that destination, other TCP is passed through to
	// it. Off: every connection is taken as one the app made to the
	// listener itself.
	Enabled bool `yaml:"enabled,omitempty" json:"enabled,omitempty"`
	// IPv6, when not false, also listens on [::1] at the outbound port when
	// the outbound listener is an IPv4 address: ip6tables redirects there.
	// A host without IPv6 only logs it. Default true.
	IPv6 *bool `yaml:"ipv6,omitempty" json:"ipv6,omitempty"`
	// SniffTimeout bounds the wait for a redirected connection's first
	// bytes before it is taken for a server-speaks-first protocol and
	// passed through. Default 200ms.
	SniffTimeout policy.Duration `yaml:"sniffTimeout,omitempty" json:"sniffTimeout,omitempty"`
	// ConnectTimeout bounds the connect of a passthrough to the original
	// destination. Default 5s.
	ConnectTimeout policy.Duration `yaml:"connectTimeout,omitempty" json:"connectTimeout,omitempty"`
	// OpaquePorts are destination ports passed through without sniffing
	// (server-speaks-first protocols: no wait). Nil: DefaultOpaquePorts;
	// an empty list: none.
	OpaquePorts []int `yaml:"opaquePorts,omitempty" json:"opaquePorts,omitempty"`
	// TCPPassthrough says where non-HTTP TCP may go: "any" (default) passes
	// it to whatever destination the app dialed; "known" only to endpoints
	// of services known to discovery and to allowHosts entries; "none"
	// refuses it (the connection is reset).
	TCPPassthrough string `yaml:"tcpPassthrough,omitempty" json:"tcpPassthrough,omitempty"`
}

// DefaultOpaquePorts are server-speaks-first ports passed through without
// waiting to sniff (Linkerd's list): SMTP, MySQL, Galera, PostgreSQL,
// Redis, Elasticsearch and memcached.
var DefaultOpaquePorts = []int{25, 587, 3306, 4444, 5432, 6379, 9300, 11211}

// TCP passthrough modes.
const (
	PassthroughAny   = "any"
	PassthroughKnown = "known"
	PassthroughNone  = "none"
)

// IPv6Listener reports whether the [::1] listener is wanted.
func (t Transparent) IPv6Listener() bool { return t.IPv6 == nil || *t.IPv6 }

// Opaque returns the opaque ports in force.
func (t Transparent) Opaque() []uint16 {
	ports := t.OpaquePorts
	if ports == nil {
		ports = DefaultOpaquePorts
	}
	out := make([]uint16, 0, len(ports))
	for _, p := range ports {
		out = append(out, uint16(p))
	}
	return out
}

// Passthrough returns the TCP passthrough mode in force.
func (t Transparent) Passthrough() string {
	if t.TCPPassthrough == "" {
		return PassthroughAny
	}
	return t.TCPPassthrough
}

// ParsePorts reads a comma-separated port list; "none" is the empty list.
func ParsePorts(s string) ([]int, error) {
	s = strings.TrimSpace(s)
	out := []int{}
	if s == "none" || s == "" {
		return out, nil
	}
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		p, err := strconv.Atoi(f)
		if err != nil || p < 1 || p > 65535 {
			return nil, fmt.Errorf("%s is not a port (allowed: 1 to 65535)", policy.Quote(f))
		}
		out = append(out, p)
	}
	return out, nil
}

func (t Transparent) validate(add func(string, ...any)) {
	if d := t.SniffTimeout; d < 0 || d.D() > 10*time.Second {
		add("transparent.sniffTimeout: %s is not allowed (allowed: 0 for the default, up to 10s)", d)
	}
	if d := t.ConnectTimeout; d < 0 || d.D() > 5*time.Minute {
		add("transparent.connectTimeout: %s is not allowed (allowed: 0 for the default, up to 5m)", d)
	}
	for i, p := range t.OpaquePorts {
		if p < 1 || p > 65535 {
			add("transparent.opaquePorts[%d]: %d out of range 1-65535", i, p)
		}
	}
	switch t.TCPPassthrough {
	case "", PassthroughAny, PassthroughKnown, PassthroughNone:
	default:
		add("transparent.tcpPassthrough: %s (allowed: any, known, none)", policy.Quote(t.TCPPassthrough))
	}
}
