package attacktest

import (
	"fmt"
	"os"
	"runtime"
	"runtime/debug"
	"strings"
	"testing"
)

// PeakRSSGrowth runs fn and returns how far the process's peak resident
// memory rose during it above the resident memory before it, in bytes. The
// heap is collected and given back to the system first, so memory read and
// freed during fn counts as well as memory kept. It skips t where Linux's
// /proc does not tell (or the peak cannot be reset).
func PeakRSSGrowth(t testing.TB, fn func()) int64 {
	t.Helper()
	runtime.GC()
	debug.FreeOSMemory()
	before := procStatus(t, "VmRSS")
	if err := os.WriteFile("/proc/self/clear_refs", []byte("5"), 0); err != nil { // VmHWM starts again from VmRSS
		t.Skipf("cannot reset the peak resident memory: %v", err)
	}
	fn()
	return procStatus(t, "VmHWM") - before
}

// procStatus is field (VmRSS, VmHWM) of /proc/self/status, in bytes.
func procStatus(t testing.TB, field string) int64 {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Skip("no /proc/self/status on this system")
	}
	for _, line := range strings.Split(string(b), "\n") {
		if kb, ok := strings.CutPrefix(line, field+":"); ok {
			var n int64
			if _, err := fmt.Sscan(strings.TrimSuffix(strings.TrimSpace(kb), " kB"), &n); err != nil {
				t.Fatalf("%s in /proc/self/status: %q: %v", field, kb, err)
			}
			return n << 10
		}
	}
	t.Fatalf("no %s in /proc/self/status", field)
	return 0
}
