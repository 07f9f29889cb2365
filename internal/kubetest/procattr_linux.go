package kubetest

import (
	"os/exec"
	"syscall"
)

// setProcAttr makes the kernel kill the process when the test binary dies
// without running its cleanups (a -timeout panic, a SIGKILL). The signal is
// tied to the OS thread that started it; the Go runtime ends a thread
// only when a goroutine locked to it exits, and the caller never locks one.
func setProcAttr(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
