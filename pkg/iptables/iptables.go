// Package iptables builds and applies the netfilter rules of transparent
// interception: the pod's outbound TCP is redirected to the sidecar's
// outbound port (15001) and, optionally, its inbound TCP to the inbound port
// (15006), as Istio's and Linkerd's init containers do.
//
// Every rule lives in two chains of the nat table that belong to the sidecar,
// SIDECAR_OUTPUT and SIDECAR_INBOUND, reached by one jump rule each from
// OUTPUT and PREROUTING. Cleanup removes those two jumps and those two chains
// and nothing else, so that whatever else a pod or node has in its tables is
// left as it was.
//
// The rules are plain data (Install and Cleanup return the commands) and
// are run with the iptables and ip6tables binaries (os/exec, no cgo), so that
// a dry run prints exactly what would be run.
package iptables

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// The sidecar's own chains in the nat table.
const (
	OutputChain  = "SIDECAR_OUTPUT"
	InboundChain = "SIDECAR_INBOUND"
)

// Defaults of Config, as Istio lays them out.
const (
	DefaultProxyPort   = 15001
	DefaultInboundPort = 15006
	DefaultProxyUID    = 1337
)

// DefaultOwnPorts are the sidecar's listener ports (DESIGN.md, "Ports"):
// traffic to them is never redirected inbound, so the kubelet's probes, the
// Prometheus scrape and peers' sidecars reach the sidecar itself.
var DefaultOwnPorts = []uint16{15000, 15001, 15006, 15020, 15090}

// Family is an IP family, named by the binary that manages its tables.
type Family string

const (
	IPv4 Family = "iptables"
	IPv6 Family = "ip6tables"
)

// Config says what to capture. The zero value is not valid; start from
// DefaultConfig. Config is plain data, safe to copy.
type Config struct {
	// ProxyPort is the outbound listener outbound TCP is redirected to.
	ProxyPort uint16
	// InboundPort is the inbound listener inbound TCP is redirected to.
	InboundPort uint16
	// ProxyUID is the user the sidecar runs as: its own connections are
	// never redirected (no capture loop).
	ProxyUID uint32
	// ProxyGID, when set, exempts the sidecar's group too. Nil: none.
	ProxyGID *uint32

	// IncludeCIDRs lists the outbound destinations redirected; empty means
	// every destination. Each address goes to the rules of its family.
	IncludeCIDRs []netip.Prefix
	// ExcludeCIDRs lists destinations never redirected (they win over
	// IncludeCIDRs), e.g. a cloud metadata address.
	ExcludeCIDRs []netip.Prefix
	// IncludePorts lists the outbound destination ports redirected; empty
	// means every port.
	IncludePorts []uint16
	// ExcludePorts lists outbound destination ports never redirected (they
	// win over IncludePorts), e.g. the ports of server-first protocols the
	// sidecar should not wait on.
	ExcludePorts []uint16

	// InboundPorts lists the pod's ports whose inbound TCP is redirected to
	// InboundPort. Empty and InboundAll false: no inbound redirect.
	InboundPorts []uint16
	// InboundAll redirects inbound TCP to every port but the excluded ones.
	InboundAll bool
	// ExcludeInboundPorts are never redirected inbound.
	ExcludeInboundPorts []uint16
	// OwnPorts are the sidecar's own listener ports, never redirected
	// inbound. Nil: DefaultOwnPorts.
	OwnPorts []uint16

	// IPv4 and IPv6 select the families rules are installed for.
	IPv4, IPv6 bool
}

// DefaultConfig captures all outbound TCP of both families, no inbound.
func DefaultConfig() Config {
	return Config{
		ProxyPort:   DefaultProxyPort,
		InboundPort: DefaultInboundPort,
		ProxyUID:    DefaultProxyUID,
		IPv4:        true,
		IPv6:        true,
	}
}

// Inbound reports whether inbound traffic is redirected.
func (c Config) Inbound() bool { return c.InboundAll || len(c.InboundPorts) > 0 }

// Families lists the families c installs rules for, IPv4 first.
func (c Config) Families() []Family {
	var out []Family
	if c.IPv4 {
		out = append(out, IPv4)
	}
	if c.IPv6 {
		out = append(out, IPv6)
	}
	return out
}

// Validate reports every problem of c.
func (c Config) Validate() error {
	var errs []error
	if c.ProxyPort == 0 {
		errs = append(errs, errors.New("proxy port: 0 is not a port"))
	}
	if c.Inbound() && c.InboundPort == 0 {
		errs = append(errs, errors.New("inbound port: 0 is not a port"))
	}
	if !c.IPv4 && !c.IPv6 {
		errs = append(errs, errors.New("no IP family selected: enable IPv4, IPv6 or both"))
	}
	if c.InboundAll && len(c.InboundPorts) > 0 {
		errs = append(errs, errors.New("inbound ports: \"*\" and a list of ports at once"))
	}
	for _, p := range c.InboundPorts {
		if p == c.InboundPort || slices.Contains(c.ownPorts(), p) {
			errs = append(errs, fmt.Errorf("inbound ports: %d is one of the sidecar's own ports", p))
		}
	}
	if slices.Contains(c.IncludePorts, c.ProxyPort) {
		errs = append(errs, fmt.Errorf("include ports: %d is the proxy port itself", c.ProxyPort))
	}
	return errors.Join(errs...)
}

func (c Config) ownPorts() []uint16 {
	if c.OwnPorts == nil {
		return DefaultOwnPorts
	}
	return c.OwnPorts
}

// Command is one run of iptables or ip6tables.
type Command struct {
	Family Family
	Args   []string
}

// String is the command as a shell line.
func (c Command) String() string { return string(c.Family) + " " + strings.Join(c.Args, " ") }

func nat(f Family, args ...string) Command {
	return Command{Family: f, Args: append([]string{"-t", "nat"}, args...)}
}

// Install returns the commands that add the rules of c, family by family:
// the sidecar's chains, their rules, then the jumps into them (last, so
// that no packet sees a half-built chain). It expects the chains not to
// exist; Apply removes earlier ones first.
func (c Config) Install() []Command {
	var out []Command
	for _, f := range c.Families() {
		out = append(out, c.install(f)...)
	}
	return out
}

func (c Config) install(f Family) []Command {
	proxy := strconv.Itoa(int(c.ProxyPort))
	out := []Command{nat(f, "-N", OutputChain)}
	add := func(args ...string) { out = append(out, nat(f, append([]string{"-A", OutputChain}, args...)...)) }

	// The sidecar's own connections, to upstreams and to the app, go out
	// as they are: this is what keeps it from capturing itself.
	add("-m", "owner", "--uid-owner", strconv.FormatUint(uint64(c.ProxyUID), 10), "-j", "RETURN")
	if c.ProxyGID != nil {
		add("-m", "owner", "--gid-owner", strconv.FormatUint(uint64(*c.ProxyGID), 10), "-j", "RETURN")
	}
	// Loopback never leaves the pod: the app's explicit calls to
	// 127.0.0.1:15001, to the sidecar's other ports, to itself and to the
	// pod's other containers.
	add("-o", "lo", "-j", "RETURN")
	for _, ports := range multiports(c.ExcludePorts) {
		add("-p", "tcp", "-m", "multiport", "--dports", ports, "-j", "RETURN")
	}
	for _, p := range c.ExcludeCIDRs {
		if familyOf(p) == f {
			add("-d", p.Masked().String(), "-j", "RETURN")
		}
	}
	redirect := []string{"-j", "REDIRECT", "--to-ports", proxy}
	var dsts []string
	if len(c.IncludeCIDRs) == 0 {
		dsts = []string{""}
	}
	for _, p := range c.IncludeCIDRs {
		if familyOf(p) == f {
			dsts = append(dsts, p.Masked().String())
		}
	}
	ports := multiports(c.IncludePorts)
	if len(ports) == 0 {
		ports = []string{""}
	}
	for _, d := range dsts {
		for _, p := range ports {
			args := []string{"-p", "tcp"}
			if d != "" {
				args = append(args, "-d", d)
			}
			if p != "" {
				args = append(args, "-m", "multiport", "--dports", p)
			}
			add(append(args, redirect...)...)
		}
	}

	if c.Inbound() {
		out = append(out, nat(f, "-N", InboundChain))
		in := func(args ...string) { out = append(out, nat(f, append([]string{"-A", InboundChain}, args...)...)) }
		own := append(slices.Clone(c.ownPorts()), c.InboundPort, c.ProxyPort)
		for _, ports := range multiports(own) {
			in("-p", "tcp", "-m", "multiport", "--dports", ports, "-j", "RETURN")
		}
		for _, ports := range multiports(c.ExcludeInboundPorts) {
			in("-p", "tcp", "-m", "multiport", "--dports", ports, "-j", "RETURN")
		}
		to := []string{"-j", "REDIRECT", "--to-ports", strconv.Itoa(int(c.InboundPort))}
		if c.InboundAll {
			in(append([]string{"-p", "tcp"}, to...)...)
		}
		for _, ports := range multiports(c.InboundPorts) {
			in(append([]string{"-p", "tcp", "-m", "multiport", "--dports", ports}, to...)...)
		}
		out = append(out, nat(f, "-A", "PREROUTING", "-p", "tcp", "-j", InboundChain))
	}
	out = append(out, nat(f, "-A", "OUTPUT", "-p", "tcp", "-j", OutputChain))
	return out
}

// Jumps are the rules Install adds to the built-in chains, per family:
// what Cleanup deletes there (every copy of them).
func jumps(f Family) []Command {
	return []Command{
		nat(f, "-D", "OUTPUT", "-p", "tcp", "-j", OutputChain),
		nat(f, "-D", "PREROUTING", "-p", "tcp", "-j", InboundChain),
	}
}

// Cleanup returns the commands that remove what Install adds for the
// families given: every copy of the two jump rules, then the sidecar's two
// chains (flushed, then deleted). Apply and Remove run each only when what
// it removes is there; nothing else in the tables is touched.
func Cleanup(families ...Family) []Command {
	var out []Command
	for _, f := range families {
		out = append(out, jumps(f)...)
		for _, ch := range []string{OutputChain, InboundChain} {
			out = append(out, nat(f, "-F", ch), nat(f, "-X", ch))
		}
	}
	return out
}

func familyOf(p netip.Prefix) Family {
	if p.Addr().Unmap().Is4() {
		return IPv4
	}
	return IPv6
}

// multiports groups ports (sorted, without duplicates) into the lists of at
// most 15 that one multiport match takes.
func multiports(ports []uint16) []string {
	ps := slices.Clone(ports)
	slices.Sort(ps)
	ps = slices.Compact(ps)
	var out []string
	for len(ps) > 0 {
		n := min(len(ps), 15)
		s := make([]string, n)
		for i, p := range ps[:n] {
			s[i] = strconv.Itoa(int(p))
		}
		out = append(out, strings.Join(s, ","))
		ps = ps[n:]
	}
	return out
}

// ParsePorts reads a comma-separated list of ports. "*" returns all=true
// (only when allowAll); "" returns none.
func ParsePorts(s string, allowAll bool) (ports []uint16, all bool, err error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return nil, false, nil
	}
	if s == "*" {
		if !allowAll {
			return nil, false, errors.New(`"*" is not allowed here`)
		}
		return nil, true, nil
	}
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		n, err := strconv.Atoi(f)
		if err != nil || n < 1 || n > 65535 {
			return nil, false, fmt.Errorf("%q is not a port (allowed: 1 to 65535)", f)
		}
		ports = append(ports, uint16(n))
	}
	return ports, false, nil
}

// ParseCIDRs reads a comma-separated list of CIDRs or addresses (an address
// is its own /32 or /128). "*" or "" returns nil: every destination.
func ParseCIDRs(s string) ([]netip.Prefix, error) {
	s = strings.TrimSpace(s)
	if s == "" || s == "*" {
		return nil, nil
	}
	var out []netip.Prefix
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		if p, err := netip.ParsePrefix(f); err == nil {
			out = append(out, p)
			continue
		}
		a, err := netip.ParseAddr(f)
		if err != nil {
			return nil, fmt.Errorf("%q is not a CIDR or an IP address", f)
		}
		out = append(out, netip.PrefixFrom(a, a.BitLen()))
	}
	return out, nil
}
