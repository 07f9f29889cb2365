// Package netnstest makes network namespaces, veth pairs and processes in
// them for tests of transparent interception. Everything a test makes is
// removed when it ends; nothing touches the host's own namespace beyond
// creating and deleting the namespaces (and the veth pairs, which live in
// them).
//
// Tests that use it need root (CAP_NET_ADMIN, CAP_SYS_ADMIN), the ip command
// (iproute2) and, for rules, iptables and ip6tables. Require skips the test
// with a clear message when they are missing, or fails it when $CI is set,
// since CI runs as root with the tools installed (scripts/tools.sh test).
package netnstest

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// Require checks that the test can make namespaces and run cmds in them.
func Require(t testing.TB, cmds ...string) {
	t.Helper()
	var missing []string
	if os.Geteuid() != 0 {
		missing = append(missing, "root (network namespaces and iptables need CAP_NET_ADMIN; run the tests as root, as CI does)")
	}
	for _, c := range append([]string{"ip"}, cmds...) {
		if _, err := lookPath(c); err != nil {
			missing = append(missing, c+" (apt-get install iproute2 iptables; scripts/tools.sh test installs them)")
		}
	}
	if len(missing) == 0 {
		return
	}
	msg := "netnstest: this test needs " + strings.Join(missing, ", ")
	if os.Getenv("CI") != "" {
		t.Fatal(msg + " — CI is set, so this fails instead of skipping")
	}
	t.Skip(msg)
}

// lookPath finds cmd on PATH or in the sbin directories, which are not on
// every user's PATH.
func lookPath(cmd string) (string, error) {
	if p, err := exec.LookPath(cmd); err == nil {
		return p, nil
	}
	for _, dir := range []string{"/usr/sbin", "/sbin", "/usr/local/sbin"} {
		p := dir + "/" + cmd
		if st, err := os.Stat(p); err == nil && !st.IsDir() && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s not found", cmd)
}

// Cmd returns the path of cmd (see Require).
func Cmd(t testing.TB, cmd string) string {
	t.Helper()
	p, err := lookPath(cmd)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

var seq atomic.Int64

// NS is one network namespace made by New.
type NS struct {
	Name string
	t    testing.TB
}

// New makes a namespace with its loopback up; it is deleted (with the
// processes Start ran in it) when the test ends.
func New(t testing.TB, label string) *NS {
	t.Helper()
	name := fmt.Sprintf("sc%s%d-%d", label, os.Getpid()%100000, seq.Add(1))
	if len(name) > 15 {
		name = name[:15]
	}
	run(t, Cmd(t, "ip"), "netns", "add", name)
	ns := &NS{Name: name, t: t}
	t.Cleanup(func() {
		out, err := exec.Command(Cmd(t, "ip"), "netns", "del", name).CombinedOutput()
		if err != nil {
			t.Errorf("ip netns del %s: %v: %s", name, err, out)
		}
	})
	ns.Run("ip", "link", "set", "lo", "up")
	return ns
}

// Exec returns argv run inside the namespace ("ip netns exec NAME argv...").
func (ns *NS) Exec(argv ...string) []string {
	return append([]string{Cmd(ns.t, "ip"), "netns", "exec", ns.Name}, argv...)
}

// Run runs argv in the namespace and returns its output; a failure fails
// the test.
func (ns *NS) Run(argv ...string) string {
	ns.t.Helper()
	full := ns.Exec(argv...)
	return run(ns.t, full[0], full[1:]...)
}

// Try runs argv in the namespace and returns its output and error.
func (ns *NS) Try(argv ...string) (string, error) {
	full := ns.Exec(argv...)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, full[0], full[1:]...).CombinedOutput()
	return string(out), err
}

// Veth links a and b with a veth pair and gives each end its addresses
// (CIDR form, IPv4 or IPv6), brought up. IPv6 duplicate address detection
// is turned off so addresses are usable at once.
func Veth(t testing.TB, a *NS, aAddrs []string, b *NS, bAddrs []string) {
	t.Helper()
	ip := Cmd(t, "ip")
	n := seq.Add(1)
	// Unique across the test processes running at once (15 characters at most).
	va, vb := fmt.Sprintf("sva%dx%d", os.Getpid()%100000, n%100), fmt.Sprintf("svb%dx%d", os.Getpid()%100000, n%100)
	run(t, ip, "link", "add", va, "netns", a.Name, "type", "veth", "peer", "name", vb, "netns", b.Name)
	for _, side := range []struct {
		ns    *NS
		dev   string
		addrs []string
	}{{a, va, aAddrs}, {b, vb, bAddrs}} {
		side.ns.Run("sysctl", "-q", "-w", "net.ipv6.conf.all.accept_dad=0")
		side.ns.Run("sysctl", "-q", "-w", "net.ipv6.conf."+side.dev+".accept_dad=0")
		for _, addr := range side.addrs {
			args := []string{"ip", "addr", "add", addr, "dev", side.dev}
			if strings.Contains(addr, ":") {
				args = append(args, "nodad")
			}
			side.ns.Run(args...)
		}
		side.ns.Run("ip", "link", "set", side.dev, "up")
	}
}

// Proc is a process started in a namespace.
type Proc struct {
	Cmd    *exec.Cmd
	out    *syncBuffer
	exited chan struct{}
}

// Output is what the process printed so far (stdout and stderr).
func (p *Proc) Output() string { return p.out.String() }

// Exited is closed when the process has ended.
func (p *Proc) Exited() <-chan struct{} { return p.exited }

// Start runs argv in the namespace in the background, with env added to the
// test's environment and, when cred is not nil, as that user. It is killed
// (SIGTERM, then SIGKILL after 5 s) when the test ends.
func (ns *NS) Start(env []string, cred *syscall.Credential, argv ...string) *Proc {
	ns.t.Helper()
	full := ns.Exec(argv...)
	if cred != nil {
		// ip netns exec needs root; drop to the user inside the
		// namespace with setpriv.
		full = ns.Exec(append([]string{Cmd(ns.t, "setpriv"),
			"--reuid", strconv.Itoa(int(cred.Uid)), "--regid", strconv.Itoa(int(cred.Gid)), "--clear-groups", "--"}, argv...)...)
	}
	cmd := exec.Command(full[0], full[1:]...)
	cmd.Env = append(os.Environ(), env...)
	out := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		ns.t.Fatalf("start %v: %v", argv, err)
	}
	p := &Proc{Cmd: cmd, out: out, exited: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		close(p.exited)
	}()
	ns.t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.exited:
		case <-time.After(5 * time.Second):
			_ = cmd.Process.Kill()
			<-p.exited
		}
	})
	return p
}

// Save returns the nat table of both families as iptables-save prints them,
// without comments and counters, for before/after comparisons.
func (ns *NS) Save() string {
	ns.t.Helper()
	var b strings.Builder
	for _, cmd := range []string{"iptables-save", "ip6tables-save"} {
		for _, line := range strings.Split(ns.Run(cmd, "-t", "nat"), "\n") {
			if strings.HasPrefix(line, "#") {
				continue
			}
			if strings.HasPrefix(line, ":") {
				// ":CHAIN POLICY [packets:bytes]": drop the counters.
				if i := strings.LastIndexByte(line, '['); i > 0 {
					line = strings.TrimSpace(line[:i])
				}
			}
			b.WriteString(line)
			b.WriteByte('\n')
		}
	}
	return b.String()
}

func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

type syncBuffer struct {
	mu  sync.Mutex // guards buf
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// Environment of a test process re-run inside a namespace by RunTest.
const (
	envChild = "SIDECAR_NETNS_CHILD"   // the namespace's name
	envHost  = "SIDECAR_NETNS_HOST_NS" // the parent's network namespace, "net:[inode]"
)

// RunTest runs the test named test (a top-level test of the current test
// binary) again, inside ns, as root, and fails t with its output when it
// fails. The test tells the two runs apart with InNamespace.
func (ns *NS) RunTest(t testing.TB, test string, env ...string) {
	t.Helper()
	host, err := os.Readlink("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	full := ns.Exec(os.Args[0], "-test.run=^"+test+"$", "-test.count=1", "-test.v")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, full[0], full[1:]...)
	cmd.Env = append(append(os.Environ(), envChild+"="+ns.Name, envHost+"="+host), env...)
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "--- PASS: "+test) {
		t.Fatalf("%s inside namespace %s: %v\n%s", test, ns.Name, err, out)
	}
	t.Logf("%s inside namespace %s:\n%s", test, ns.Name, out)
}

// InNamespace reports whether this process is the run of a test that
// RunTest started inside a namespace. It fails the test if the process
// claims to be one but is still in the parent's network namespace, so that
// such a run never touches the host's tables.
func InNamespace(t testing.TB) bool {
	t.Helper()
	if os.Getenv(envChild) == "" {
		return false
	}
	cur, err := os.Readlink("/proc/self/ns/net")
	if err != nil || cur == os.Getenv(envHost) {
		t.Fatalf("netnstest: %s is set but this process is in the parent's network namespace (%s, %v): refusing to go on",
			envChild, cur, err)
	}
	return true
}
