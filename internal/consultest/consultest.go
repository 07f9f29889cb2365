// Package consultest runs a real Consul agent (`consul agent -dev`) for tests.
//
// The agent listens on free loopback ports, is ready (has a leader) when Start
// returns, and is stopped, with every goroutine it needed, when the test ends.
// The binary comes from $SIDECAR_CONSUL_BIN, else `consul` on PATH, else the
// cache of scripts/tools.sh; `scripts/tools.sh test` builds it. Without one,
// Start skips the test, or fails it when $CI is set.
package consultest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sidecar-mesh/sidecar/internal/freeport"
	"github.com/sidecar-mesh/sidecar/internal/toolbin"
)

const (
	// readyTimeout bounds the wait for the agent to elect itself leader.
	readyTimeout = 20 * time.Second
	// stopTimeout is how long Stop waits after SIGTERM before SIGKILL.
	stopTimeout = 5 * time.Second
	// startAttempts is how often Start tries fresh ports when the agent
	// exits during startup (another process took a port in between).
	startAttempts = 3
	// tailBytes is how much of the agent's output failure messages quote.
	tailBytes = 4 << 10
	// installHint says how to get a binary.
	installHint = "run scripts/tools.sh test (builds Consul v1.16.1 into ${XDG_CACHE_HOME:-$HOME/.cache}/sidecar-tools) or set SIDECAR_CONSUL_BIN"
)

// Agent is a running (or stopped) `consul agent -dev`.
type Agent struct {
	bin   string
	dir   string
	ports ports
	out   *syncBuffer

	mu   sync.Mutex
	proc *process // nil when stopped
}

// process is one run of the agent binary.
type process struct {
	cmd  *exec.Cmd
	done chan struct{} // closed once cmd.Wait has returned
	err  error         // cmd.Wait's result, set before done is closed
}

// ports are the agent's listeners, all on 127.0.0.1.
type ports struct {
	HTTP, DNS, SerfLAN, SerfWAN, Server, GRPC, GRPCTLS int
}

// Start runs a Consul dev agent on free loopback ports and waits until it has
// a leader. The agent is stopped, and its directory removed, when t ends.
func Start(t testing.TB) *Agent {
	t.Helper()
	bin, err := toolbin.Find("consul")
	if err != nil {
		missingBinary(t, err)
		return nil
	}
	a := &Agent{bin: bin, dir: t.TempDir(), out: &syncBuffer{}}
	// Registered after t.TempDir, so it runs before the directory is removed.
	t.Cleanup(a.Stop)
	for attempt := 1; ; attempt++ {
		a.ports, err = pickPorts()
		if err != nil {
			t.Fatalf("consultest: picking free ports: %v", err)
		}
		err = a.run()
		if err == nil {
			return a
		}
		if !errors.Is(err, errExited) || attempt == startAttempts {
			t.Fatalf("consultest: starting %s (attempt %d of %d): %v\n%s", a.command(), attempt, startAttempts, err, a.tail())
		}
		t.Logf("consultest: agent exited during startup (attempt %d), retrying on new ports: %v", attempt, err)
	}
}

// Addr is the host:port of the agent's HTTP API.
func (a *Agent) Addr() string {
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(a.ports.HTTP))
}

// Stop stops the agent now: SIGTERM, then SIGKILL after 5 s. It returns once
// the process and its waiter goroutine are gone. Stopping a stopped agent
// does nothing.
func (a *Agent) Stop() {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.proc == nil {
		return
	}
	a.proc.stop()
	a.proc = nil
}

// Restart stops the agent if it runs, then starts it again on the same ports
// and waits for a leader. A dev agent keeps its state in memory only, so the
// restarted agent starts empty.
func (a *Agent) Restart(t testing.TB) {
	t.Helper()
	a.Stop()
	if err := a.run(); err != nil {
		t.Fatalf("consultest: restarting %s on the same ports: %v\n%s", a.command(), err, a.tail())
	}
}

// run starts the process and waits until it is ready; on failure it leaves
// the agent stopped.
func (a *Agent) run() error {
	p, err := a.launch()
	if err != nil {
		return err
	}
	a.mu.Lock()
	a.proc = p
	a.mu.Unlock()
	if err := waitReady(a.Addr(), p.done, readyTimeout); err != nil {
		if p.exited() {
			err = fmt.Errorf("%w: %v (wait: %v)", errExited, err, p.err)
		}
		a.Stop()
		return err
	}
	return nil
}

// launch starts the agent binary and the goroutine that waits for it.
func (a *Agent) launch() (*process, error) {
	fmt.Fprintf(a.out, "--- consultest: %s\n", a.command())
	cmd := exec.Command(a.bin, a.args()...)
	cmd.Dir = a.dir
	cmd.Stdout = a.out
	cmd.Stderr = a.out
	// Bound the output copying after exit, so Wait (and its goroutine) ends
	// even if something kept the pipes open.
	cmd.WaitDelay = time.Second
	setProcAttr(cmd)
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("exec %s: %w", a.bin, err)
	}
	p := &process{cmd: cmd, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// args is the agent's command line (without the binary).
func (a *Agent) args() []string {
	p := a.ports
	hcl := fmt.Sprintf("ports { http = %d dns = %d serf_lan = %d serf_wan = %d server = %d grpc = %d grpc_tls = %d }",
		p.HTTP, p.DNS, p.SerfLAN, p.SerfWAN, p.Server, p.GRPC, p.GRPCTLS)
	return []string{
		"agent", "-dev",
		"-client", "127.0.0.1", "-bind", "127.0.0.1",
		"-log-level", "warn",
		"-hcl", hcl,
		"-hcl", "disable_update_check = true",
	}
}

// command is the agent's command line for messages, quoted for a shell.
func (a *Agent) command() string {
	words := append([]string{a.bin}, a.args()...)
	for i, w := range words {
		if strings.ContainsAny(w, " '\"{}") {
			words[i] = "'" + strings.ReplaceAll(w, "'", `'\''`) + "'"
		}
	}
	return strings.Join(words, " ")
}

// tail is the end of the agent's output, for failure messages.
func (a *Agent) tail() string {
	return "consul output (tail):\n" + a.out.tail(tailBytes)
}

// stop sends SIGTERM, waits up to stopTimeout, then kills, and waits until
// the waiter goroutine has ended.
func (p *process) stop() {
	if p.exited() {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	timer := time.NewTimer(stopTimeout)
	defer timer.Stop()
	select {
	case <-p.done:
	case <-timer.C:
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// errExited marks a start that failed because the agent process exited.
var errExited = errors.New("consul agent exited")

// waitReady polls GET /v1/status/leader until it names a leader, the process
// exits (done closes) or timeout passes.
func waitReady(addr string, done <-chan struct{}, timeout time.Duration) error {
	client := &http.Client{
		Timeout:   time.Second,
		Transport: &http.Transport{DisableKeepAlives: true},
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	var last error
	for {
		l, err := leader(ctx, client, addr)
		if err == nil && l != "" {
			return nil
		}
		last = err
		if err == nil {
			last = errors.New("no leader yet (empty leader)")
		}
		select {
		case <-done:
			return fmt.Errorf("process exited before it had a leader; last check: %v", last)
		case <-ctx.Done():
			return fmt.Errorf("no leader within %s; last check: %v", timeout, last)
		case <-tick.C:
		}
	}
}

// leader asks the agent at addr (host:port) for the raft leader: GET
// /v1/status/leader. An empty result means there is none (yet).
func leader(ctx context.Context, client *http.Client, addr string) (string, error) {
	url := "http://" + addr + "/v1/status/leader"
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", err
	}
	resp, err := client.Do(req)
	if err != nil {
		return "", err // a *url.Error: names the method and URL
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err != nil {
		return "", fmt.Errorf("GET %s: reading body: %w", url, err)
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("GET %s: got %s %q, want 200 OK", url, resp.Status, body)
	}
	var l string
	if err := json.Unmarshal(body, &l); err != nil {
		return "", fmt.Errorf("GET %s: got body %q, want a JSON string: %v", url, body, err)
	}
	return l, nil
}

// missingBinary fails the test when $CI is set, and skips it otherwise.
func missingBinary(t testing.TB, err error) {
	t.Helper()
	if os.Getenv("CI") != "" {
		t.Fatalf("consultest: no consul binary (CI is set, so this fails instead of skipping): %v; %s", err, installHint)
	}
	t.Skipf("consultest: no consul binary: %v; %s", err, installHint)
}

// pickPorts finds seven ports free on 127.0.0.1 for both TCP and UDP (DNS
// and serf use both). They are released before the agent binds them.
func pickPorts() (ports, error) {
	free, err := freeport.Stable(7, true) // stable across Restart
	if err != nil {
		return ports{}, err
	}
	return ports{
		HTTP: free[0], DNS: free[1], SerfLAN: free[2], SerfWAN: free[3],
		Server: free[4], GRPC: free[5], GRPCTLS: free[6],
	}, nil
}

// syncBuffer collects the agent's stdout and stderr across restarts.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// tail returns at most the last n bytes, starting at a line when it can.
func (b *syncBuffer) tail(n int) string {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := b.buf.Bytes()
	if len(out) <= n {
		return string(out)
	}
	out = out[len(out)-n:]
	if i := bytes.IndexByte(out, '\n'); i >= 0 {
		out = out[i+1:]
	}
	return "...\n" + string(out)
}
