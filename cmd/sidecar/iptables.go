package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/sidecar-mesh/sidecar/pkg/iptables"
	"github.com/sidecar-mesh/sidecar/pkg/policy"
)

// maxOwnerID is the largest user or group id: ids are 32 bits and
// 4294967295 is (uid_t)-1, "no id". A larger number must not wrap around
// (4294967296 would become uid 0, exempting root from interception).
const maxOwnerID = 1<<32 - 2

// iptablesOptions are the inputs of `sidecar iptables`.
type iptablesOptions struct {
	proxyPort, inboundPort            int
	proxyUID                          int
	proxyGID                          string
	includeCIDRs, excludeCIDRs        string
	includePorts, excludePorts        string
	inboundPorts, excludeInboundPorts string
	ownPorts                          string
	ipv4                              bool
	ipv6                              string
	dryRun, cleanup                   bool
	stdout                            io.Writer
	runner                            iptables.Runner
	ipv6Available                     func() bool

	cfg iptables.Config // set by complete
}

func (o *iptablesOptions) complete() error {
	c := iptables.DefaultConfig()
	var err error
	port := func(name string, v int) (uint16, error) {
		if v < 1 || v > 65535 {
			return 0, fmt.Errorf("--%s: %d is not a port (allowed: 1 to 65535)", name, v)
		}
		return uint16(v), nil
	}
	if c.ProxyPort, err = port("proxy-port", o.proxyPort); err != nil {
		return err
	}
	if c.InboundPort, err = port("inbound-port", o.inboundPort); err != nil {
		return err
	}
	if o.proxyUID < 0 || o.proxyUID > maxOwnerID {
		return fmt.Errorf("--proxy-uid: %d is not a user id (allowed: 0 to %d)", o.proxyUID, maxOwnerID)
	}
	c.ProxyUID = uint32(o.proxyUID)
	if o.proxyGID != "" {
		g, err := strconv.ParseUint(o.proxyGID, 10, 64)
		if err != nil || g > maxOwnerID {
			return fmt.Errorf("--proxy-gid: %s is not a group id (allowed: 0 to %d)", policy.Quote(o.proxyGID), maxOwnerID)
		}
		gid := uint32(g)
		c.ProxyGID = &gid
	}
	if c.IncludeCIDRs, err = iptables.ParseCIDRs(o.includeCIDRs); err != nil {
		return fmt.Errorf("--include-cidrs: %w", err)
	}
	if c.ExcludeCIDRs, err = iptables.ParseCIDRs(o.excludeCIDRs); err != nil {
		return fmt.Errorf("--exclude-cidrs: %w", err)
	}
	for _, p := range []struct {
		flag, value string
		all         bool
		dst         *[]uint16
		allDst      *bool
	}{
		{"include-ports", o.includePorts, true, &c.IncludePorts, nil},
		{"exclude-ports", o.excludePorts, false, &c.ExcludePorts, nil},
		{"inbound-ports", o.inboundPorts, true, &c.InboundPorts, &c.InboundAll},
		{"exclude-inbound-ports", o.excludeInboundPorts, false, &c.ExcludeInboundPorts, nil},
		{"own-ports", o.ownPorts, false, &c.OwnPorts, nil},
	} {
		ports, all, err := iptables.ParsePorts(p.value, p.all)
		if err != nil {
			return fmt.Errorf("--%s: %w", p.flag, err)
		}
		*p.dst = ports
		if p.allDst != nil {
			*p.allDst = all
		}
	}
	if c.OwnPorts == nil {
		c.OwnPorts = []uint16{}
	}
	c.IPv4 = o.ipv4
	switch o.ipv6 {
	case "true":
		c.IPv6 = true
	case "false":
		c.IPv6 = false
	case "auto":
		c.IPv6 = o.ipv6Available()
	default:
		return fmt.Errorf("--ipv6: %s (allowed: auto, true, false)", policy.Quote(o.ipv6))
	}
	o.cfg = c
	return nil
}

func (o *iptablesOptions) validate() error {
	if o.cleanup {
		if !o.cfg.IPv4 && !o.cfg.IPv6 {
			return fmt.Errorf("no IP family selected: enable --ipv4 or --ipv6")
		}
		return nil
	}
	if err := o.cfg.Validate(); err != nil {
		return fmt.Errorf("invalid rules:\n%w", err)
	}
	return nil
}

func (o *iptablesOptions) run(ctx context.Context) error {
	fams := o.cfg.Families()
	if o.cleanup {
		if o.dryRun {
			fmt.Fprintln(o.stdout, "# each command runs only when what it removes is there")
			return printCommands(o.stdout, iptables.Cleanup(fams...))
		}
		if err := iptables.Remove(ctx, o.runner, fams...); err != nil {
			return err
		}
		fmt.Fprintf(o.stdout, "removed the sidecar's rules (%s)\n", familyNames(fams))
		return nil
	}
	cmds := o.cfg.Install()
	if o.dryRun {
		fmt.Fprintln(o.stdout, "# rules of an earlier run are removed first (sidecar iptables --cleanup)")
		return printCommands(o.stdout, cmds)
	}
	if err := iptables.Apply(ctx, o.runner, o.cfg); err != nil {
		return err
	}
	fmt.Fprintf(o.stdout, "installed %d rules (%s): outbound TCP to port %d, except uid %d", len(cmds), familyNames(fams),
		o.cfg.ProxyPort, o.cfg.ProxyUID)
	if o.cfg.Inbound() {
		fmt.Fprintf(o.stdout, "; inbound TCP to port %d", o.cfg.InboundPort)
	}
	fmt.Fprintln(o.stdout)
	return nil
}

func printCommands(w io.Writer, cmds []iptables.Command) error {
	for _, c := range cmds {
		if _, err := fmt.Fprintln(w, c.String()); err != nil {
			return err
		}
	}
	return nil
}

func familyNames(fams []iptables.Family) string {
	s := make([]string, len(fams))
	for i, f := range fams {
		s[i] = string(f)
	}
	return strings.Join(s, ", ")
}

// hostHasIPv6 reports whether the kernel has IPv6 (any address at all)
// and ip6tables is installed: --ipv6=auto.
func hostHasIPv6() bool {
	b, err := os.ReadFile("/proc/net/if_inet6")
	if err != nil || len(strings.TrimSpace(string(b))) == 0 {
		return false
	}
	_, err = exec.LookPath("ip6tables")
	return err == nil
}

func newIptablesCommand(stdout io.Writer) *cobra.Command {
	o := &iptablesOptions{stdout: stdout, runner: iptables.Exec{}, ipv6Available: hostHasIPv6}
	cmd := &cobra.Command{
		Use:   "iptables",
		Short: "Redirect the pod's TCP to the sidecar (transparent interception; run by an init container with NET_ADMIN)",
		Long: `Install the nat rules that redirect the pod's outbound TCP to the sidecar's
outbound port (15001) and, with --inbound-ports, its inbound TCP to the inbound
port (15006), for apps that can't be pointed at 127.0.0.1:15001. Run the
sidecar with --transparent to serve the redirected connections.

Never redirected: the sidecar's own connections (--proxy-uid, the user the
sidecar runs as), loopback (the app's calls to 127.0.0.1:15001, to itself and
to the pod's other containers), --exclude-cidrs and --exclude-ports; inbound,
the sidecar's own ports. Every rule is in the chains SIDECAR_OUTPUT and
SIDECAR_INBOUND of the nat table, reached from OUTPUT and PREROUTING; running
again replaces them, and --cleanup removes exactly those chains and jumps.
IPv4 with iptables, IPv6 with ip6tables (run as binaries).`,
		Example: `  sidecar iptables --dry-run
  sidecar iptables --exclude-cidrs 169.254.169.254/32 --exclude-ports 22
  sidecar iptables --inbound-ports '*' --exclude-inbound-ports 22
  sidecar iptables --cleanup`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := o.complete(); err != nil {
				return err
			}
			if err := o.validate(); err != nil {
				return err
			}
			return o.run(cmd.Context())
		},
	}
	f := cmd.Flags()
	f.IntVar(&o.proxyPort, "proxy-port", iptables.DefaultProxyPort, "outbound port outbound TCP is redirected to")
	f.IntVar(&o.inboundPort, "inbound-port", iptables.DefaultInboundPort, "inbound port inbound TCP is redirected to")
	f.IntVar(&o.proxyUID, "proxy-uid", iptables.DefaultProxyUID, "user the sidecar runs as: its connections are never redirected")
	f.StringVar(&o.proxyGID, "proxy-gid", "", "group whose connections are never redirected either; empty: none")
	f.StringVar(&o.includeCIDRs, "include-cidrs", "*", "outbound destinations redirected, comma-separated CIDRs or addresses of either family; * for all")
	f.StringVar(&o.excludeCIDRs, "exclude-cidrs", "", "outbound destinations never redirected (they win over --include-cidrs)")
	f.StringVar(&o.includePorts, "include-ports", "*", "outbound destination ports redirected, comma-separated; * for all")
	f.StringVar(&o.excludePorts, "exclude-ports", "", "outbound destination ports never redirected, e.g. 22")
	f.StringVar(&o.inboundPorts, "inbound-ports", "", "the pod's ports whose inbound TCP is redirected to --inbound-port, comma-separated; * for all; empty: no inbound redirect")
	f.StringVar(&o.excludeInboundPorts, "exclude-inbound-ports", "", "ports never redirected inbound")
	f.StringVar(&o.ownPorts, "own-ports", "15000,15001,15006,15020,15090", "the sidecar's own ports, never redirected inbound")
	f.BoolVar(&o.ipv4, "ipv4", true, "install IPv4 rules (iptables)")
	f.StringVar(&o.ipv6, "ipv6", "auto", "install IPv6 rules (ip6tables): true, false, or auto (when the host has IPv6 and ip6tables)")
	f.BoolVar(&o.dryRun, "dry-run", false, "print the commands instead of running them")
	f.BoolVar(&o.cleanup, "cleanup", false, "remove the rules instead of installing them")
	return cmd
}
