package iptables_test

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"go.uber.org/goleak"

	"github.com/sidecar-mesh/sidecar/internal/netnstest"
	"github.com/sidecar-mesh/sidecar/pkg/iptables"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var update = flag.Bool("update", false, "rewrite the golden files")

func render(cmds []iptables.Command) string {
	var b strings.Builder
	for _, c := range cmds {
		b.WriteString(c.String())
		b.WriteByte('\n')
	}
	return b.String()
}

func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name+".golden")
	if *update {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if got != string(want) {
		t.Errorf("rules differ from %s (go test -update rewrites it)\n--- got\n%s--- want\n%s", path, got, want)
	}
}

func prefixes(t *testing.T, s string) []netip.Prefix {
	t.Helper()
	p, err := iptables.ParseCIDRs(s)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestInstallGolden(t *testing.T) {
	gid := uint32(1337)
	for _, tc := range []struct {
		name string
		cfg  func(c *iptables.Config)
	}{
		{"default", func(c *iptables.Config) {}},
		{"ipv4-only", func(c *iptables.Config) { c.IPv6 = false }},
		{"ipv6-only", func(c *iptables.Config) { c.IPv4 = false }},
		{"include-exclude", func(c *iptables.Config) {
			c.IncludeCIDRs = prefixes(t, "10.0.0.0/8,192.168.1.7,fd00::/8")
			c.ExcludeCIDRs = prefixes(t, "10.96.0.1/32,169.254.169.254,fd00::53")
			c.IncludePorts = []uint16{80, 8080, 9000}
			c.ExcludePorts = []uint16{22, 3306, 5432}
			c.ProxyGID = &gid
		}},
		{"inbound-all", func(c *iptables.Config) {
			c.InboundAll = true
			c.ExcludeInboundPorts = []uint16{22}
		}},
		{"inbound-ports", func(c *iptables.Config) {
			c.InboundPorts = []uint16{8080, 9090}
			c.IPv6 = false
		}},
		{"many-ports", func(c *iptables.Config) {
			for p := uint16(1); p <= 20; p++ {
				c.ExcludePorts = append(c.ExcludePorts, 1000+p, 1000+p) // duplicates dropped
			}
			c.IPv6 = false
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := iptables.DefaultConfig()
			tc.cfg(&c)
			if err := c.Validate(); err != nil {
				t.Fatal(err)
			}
			golden(t, "install-"+tc.name, render(c.Install()))
		})
	}
	golden(t, "cleanup", render(iptables.Cleanup(iptables.IPv4, iptables.IPv6)))
}

func TestValidate(t *testing.T) {
	for _, tc := range []struct {
		cfg  func(c *iptables.Config)
		want string
	}{
		{func(c *iptables.Config) { c.IPv4, c.IPv6 = false, false }, "no IP family"},
		{func(c *iptables.Config) { c.ProxyPort = 0 }, "proxy port"},
		{func(c *iptables.Config) { c.InboundPorts = []uint16{15020} }, "15020 is one of the sidecar's own ports"},
		{func(c *iptables.Config) { c.InboundPorts, c.InboundAll = []uint16{80}, true }, `"*" and a list`},
		{func(c *iptables.Config) { c.IncludePorts = []uint16{15001} }, "proxy port itself"},
	} {
		c := iptables.DefaultConfig()
		tc.cfg(&c)
		err := c.Validate()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Validate() = %v, want an error containing %q", err, tc.want)
		}
	}
}

func TestParse(t *testing.T) {
	if p, all, err := iptables.ParsePorts("*", true); err != nil || !all || p != nil {
		t.Errorf(`ParsePorts("*", true) = %v, %v, %v; want nil, true, nil`, p, all, err)
	}
	if _, _, err := iptables.ParsePorts("*", false); err == nil {
		t.Error(`ParsePorts("*", false): want an error`)
	}
	if p, _, err := iptables.ParsePorts(" 80, 443 ,", false); err != nil || !slices.Equal(p, []uint16{80, 443}) {
		t.Errorf("ParsePorts = %v, %v; want [80 443]", p, err)
	}
	for _, bad := range []string{"0", "65536", "http", "-1"} {
		if _, _, err := iptables.ParsePorts(bad, true); err == nil {
			t.Errorf("ParsePorts(%q): want an error", bad)
		}
	}
	if p, err := iptables.ParseCIDRs("10.0.0.0/8, ::1"); err != nil || len(p) != 2 || p[1].String() != "::1/128" {
		t.Errorf("ParseCIDRs = %v, %v", p, err)
	}
	if _, err := iptables.ParseCIDRs("10.0.0.0/33"); err == nil {
		t.Error("ParseCIDRs(10.0.0.0/33): want an error")
	}
}

// fakeTables models the nat table of both families closely enough for Apply
// and Remove: chains with rule lists, -N -X -F -A -D -C -S, and the errors
// iptables gives.
type fakeTables struct {
	chains map[iptables.Family]map[string][]string
	order  map[iptables.Family][]string
	ran    []string
	failOn string // a command line that fails
}

func newFakeTables() *fakeTables {
	f := &fakeTables{chains: map[iptables.Family]map[string][]string{}, order: map[iptables.Family][]string{}}
	for _, fam := range []iptables.Family{iptables.IPv4, iptables.IPv6} {
		f.chains[fam] = map[string][]string{}
		for _, ch := range []string{"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"} {
			f.chains[fam][ch] = nil
			f.order[fam] = append(f.order[fam], ch)
		}
	}
	return f
}

func (f *fakeTables) dump() string {
	var b strings.Builder
	for _, fam := range []iptables.Family{iptables.IPv4, iptables.IPv6} {
		for _, ch := range f.order[fam] {
			if rules, ok := f.chains[fam][ch]; ok {
				fmt.Fprintf(&b, "%s :%s\n", fam, ch)
				for _, r := range rules {
					fmt.Fprintf(&b, "%s -A %s %s\n", fam, ch, r)
				}
			}
		}
	}
	return b.String()
}

func (f *fakeTables) Run(_ context.Context, cmd iptables.Command) (string, error) {
	f.ran = append(f.ran, cmd.String())
	if cmd.String() == f.failOn {
		return "iptables: injected failure.", errors.New("exit status 4")
	}
	a := cmd.Args
	if len(a) < 4 || a[0] != "-t" || a[1] != "nat" {
		return "", fmt.Errorf("fake: unexpected %v", a)
	}
	tbl := f.chains[cmd.Family]
	op, ch, rule := a[2], a[3], strings.Join(a[4:], " ")
	rules, exists := tbl[ch]
	noChain := errors.New("exit status 1")
	switch op {
	case "-N":
		if exists {
			return "iptables: Chain already exists.", noChain
		}
		tbl[ch] = nil
		f.order[cmd.Family] = append(f.order[cmd.Family], ch)
	case "-X":
		if !exists || len(rules) > 0 {
			return "iptables: No chain/target/match by that name.", noChain
		}
		for _, other := range tbl {
			for _, r := range other {
				if strings.HasSuffix(r, "-j "+ch) {
					return "iptables: Too many links.", noChain
				}
			}
		}
		delete(tbl, ch)
		f.order[cmd.Family] = slices.DeleteFunc(f.order[cmd.Family], func(s string) bool { return s == ch })
	case "-F":
		if !exists {
			return "iptables: No chain/target/match by that name.", noChain
		}
		tbl[ch] = nil
	case "-S":
		if !exists {
			return "iptables: No chain/target/match by that name.", noChain
		}
	case "-A", "-C", "-D":
		if !exists {
			return "iptables: No chain/target/match by that name.", noChain
		}
		if i := strings.LastIndex(rule, "-j "); i >= 0 {
			target := rule[i+3:]
			if strings.HasPrefix(target, "SIDECAR_") {
				if _, ok := tbl[target]; !ok {
					return "iptables: Couldn't load target.", errors.New("exit status 2")
				}
			}
		}
		i := slices.Index(rules, rule)
		switch op {
		case "-A":
			tbl[ch] = append(rules, rule)
		case "-C", "-D":
			if i < 0 {
				return "iptables: Bad rule (does a matching rule exist in that chain?).", noChain
			}
			if op == "-D" {
				tbl[ch] = slices.Delete(rules, i, i+1)
			}
		}
	default:
		return "", fmt.Errorf("fake: unexpected op %s", op)
	}
	return "", nil
}

func TestApplyRemoveExact(t *testing.T) {
	ctx := context.Background()
	f := newFakeTables()
	// Someone else's rules, before and after ours, must survive.
	for _, cmd := range []iptables.Command{
		{Family: iptables.IPv4, Args: []string{"-t", "nat", "-N", "OTHER"}},
		{Family: iptables.IPv4, Args: []string{"-t", "nat", "-A", "OTHER", "-p", "udp", "-j", "RETURN"}},
		{Family: iptables.IPv4, Args: []string{"-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", "OTHER"}},
		{Family: iptables.IPv6, Args: []string{"-t", "nat", "-A", "PREROUTING", "-p", "tcp", "--dport", "22", "-j", "RETURN"}},
	} {
		if _, err := f.Run(ctx, cmd); err != nil {
			t.Fatal(err)
		}
	}
	before := f.dump()
	c := iptables.DefaultConfig()
	c.InboundAll = true
	for i := 0; i < 2; i++ { // twice: the second replaces the first
		if err := iptables.Apply(ctx, f, c); err != nil {
			t.Fatalf("Apply #%d: %v", i+1, err)
		}
	}
	got := f.dump()
	for _, want := range []string{
		"iptables -A OUTPUT -p tcp -j SIDECAR_OUTPUT",
		"ip6tables -A PREROUTING -p tcp -j SIDECAR_INBOUND",
		"iptables -A SIDECAR_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
	} {
		if n := strings.Count(got, want+"\n"); n != 1 {
			t.Errorf("after Apply twice, %q appears %d times, want once:\n%s", want, n, got)
		}
	}
	if err := iptables.Remove(ctx, f, iptables.IPv4, iptables.IPv6); err != nil {
		t.Fatal(err)
	}
	if after := f.dump(); after != before {
		t.Errorf("Remove left the tables different\n--- after\n%s--- before\n%s", after, before)
	}
	// Removing again is a no-op.
	if err := iptables.Remove(ctx, f, iptables.IPv4, iptables.IPv6); err != nil {
		t.Fatalf("second Remove: %v", err)
	}
}

func TestApplyRollsBack(t *testing.T) {
	ctx := context.Background()
	f := newFakeTables()
	before := f.dump()
	c := iptables.DefaultConfig()
	c.InboundPorts = []uint16{8080}
	f.failOn = "ip6tables -t nat -A PREROUTING -p tcp -j SIDECAR_INBOUND"
	err := iptables.Apply(ctx, f, c)
	if err == nil || !strings.Contains(err.Error(), f.failOn) || !strings.Contains(err.Error(), "injected failure") {
		t.Fatalf("Apply = %v, want the failing command and its output", err)
	}
	if after := f.dump(); after != before {
		t.Errorf("a failed Apply left rules behind\n--- after\n%s--- before\n%s", after, before)
	}
}

func TestRemoveFailsWhenTablesCannotBeRead(t *testing.T) {
	f := newFakeTables()
	f.failOn = "iptables -t nat -S OUTPUT"
	if err := iptables.Remove(context.Background(), f, iptables.IPv4); err == nil {
		t.Fatal("Remove succeeded although the nat table could not be listed")
	}
}

// TestRealTablesInNetns applies and removes the rules with the real
// iptables and ip6tables, inside a network namespace made for the test,
// and compares iptables-save before and after.
func TestRealTablesInNetns(t *testing.T) {
	netnstest.Require(t, "iptables", "ip6tables", "iptables-save", "ip6tables-save")
	ns := netnstest.New(t, "ipt")
	ctx := context.Background()
	r := iptables.Exec{Prefix: ns.Exec()}
	// A rule of someone else's, which must survive.
	ns.Run("iptables", "-t", "nat", "-A", "OUTPUT", "-p", "udp", "--dport", "53", "-j", "RETURN")
	before := ns.Save()

	c := iptables.DefaultConfig()
	c.InboundPorts = []uint16{8080}
	c.ExcludeCIDRs = prefixes(t, "169.254.169.254,fd00::1")
	c.ExcludePorts = []uint16{22}
	if err := iptables.Apply(ctx, r, c); err != nil {
		t.Fatal(err)
	}
	if err := iptables.Apply(ctx, r, c); err != nil { // idempotent
		t.Fatalf("second Apply: %v", err)
	}
	during := ns.Save()
	// Each rule once per family (the second Apply replaced the first).
	for _, want := range []struct {
		rule string
		n    int
	}{
		{"-A OUTPUT -p tcp -j SIDECAR_OUTPUT", 2},
		{"-A PREROUTING -p tcp -j SIDECAR_INBOUND", 2},
		{"-A SIDECAR_OUTPUT -m owner --uid-owner 1337 -j RETURN", 2},
		{"-A SIDECAR_OUTPUT -o lo -j RETURN", 2},
		{"-A SIDECAR_OUTPUT -p tcp -j REDIRECT --to-ports 15001", 2},
		{"-A SIDECAR_INBOUND -p tcp -m multiport --dports 8080 -j REDIRECT --to-ports 15006", 2},
		{"-A SIDECAR_OUTPUT -d 169.254.169.254/32 -j RETURN", 1},
		{"-A SIDECAR_OUTPUT -d fd00::1/128 -j RETURN", 1},
		{"-A OUTPUT -p udp -m udp --dport 53 -j RETURN", 1},
	} {
		if n := strings.Count(during, want.rule+"\n"); n != want.n {
			t.Errorf("iptables-save has %q %d times, want %d:\n%s", want.rule, n, want.n, during)
		}
	}
	if err := iptables.Remove(ctx, r, iptables.IPv4, iptables.IPv6); err != nil {
		t.Fatal(err)
	}
	if after := ns.Save(); after != before {
		t.Errorf("cleanup left the tables different\n--- after\n%s--- before\n%s", after, before)
	}
}
