package consultest

import (
	"bytes"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// Freeze stops the agent with SIGSTOP, as a frozen or swapped-out agent is:
// the kernel still accepts connections for it, and nothing answers them. It
// returns once every thread of the agent has stopped (the stop takes effect
// as each thread next enters the kernel, so a thread busy on another CPU
// could still answer a moment after kill returned), and continues the agent
// when t ends, so that it is stopped as usual.
func (a *Agent) Freeze(t testing.TB) {
	t.Helper()
	a.mu.Lock()
	p := a.proc
	a.mu.Unlock()
	if p == nil {
		t.Fatal("consultest: Freeze of a stopped agent")
	}
	pid := p.cmd.Process.Pid
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatalf("consultest: SIGSTOP the agent (pid %d): %v", pid, err)
	}
	t.Cleanup(func() { _ = syscall.Kill(pid, syscall.SIGCONT) })
	waitStopped(t, pid)
	c := &http.Client{Timeout: 200 * time.Millisecond, Transport: &http.Transport{DisableKeepAlives: true}}
	if resp, err := c.Get("http://" + a.Addr() + "/v1/status/leader"); err == nil {
		resp.Body.Close()
		t.Fatalf("consultest: the agent answered %s after SIGSTOP", resp.Status)
	}
}

// waitStopped waits until every thread of process pid is stopped (state T
// in /proc/pid/task/*/stat), for at most 5 seconds.
func waitStopped(t testing.TB, pid int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		stats, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/stat", pid))
		running := len(stats) == 0
		for _, path := range stats {
			b, err := os.ReadFile(path)
			if err != nil {
				continue // a thread that ended
			}
			// The state follows the command's closing parenthesis.
			if i := bytes.LastIndexByte(b, ')'); i < 0 || i+2 >= len(b) || (b[i+2] != 'T' && b[i+2] != 't') {
				running = true
			}
		}
		if !running {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("consultest: a thread of the agent (pid %d) still runs 5s after SIGSTOP", pid)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
