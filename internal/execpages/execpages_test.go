package execpages

import (
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// rssFile is the process's resident file-backed memory (kB).
func rssFile(t *testing.T) int {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "RssFile:"); ok {
			n, err := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatal("no RssFile in /proc/self/status")
	return 0
}

// Released pages leave the resident set, and the process runs on: the
// code it runs next is mapped again as it is touched.
func TestRelease(t *testing.T) {
	if runtime.GOOS != "linux" {
		n, err := Release()
		if n != 0 || err != nil {
			t.Fatalf("Release() = %d, %v outside Linux, want 0, nil", n, err)
		}
		return
	}
	before := rssFile(t)
	n, err := Release()
	if err != nil {
		t.Fatal(err)
	}
	after := rssFile(t)
	if n < 1<<20 {
		t.Errorf("Release() released %d bytes, want the executable's read-only segments (MBs)", n)
	}
	if after >= before {
		t.Errorf("RssFile %d kB before, %d kB after: nothing left the resident set", before, after)
	}
	// Everything still runs: the runtime, the test framework, a goroutine.
	done := make(chan string)
	go func() { done <- strings.Repeat("x", 3) + strconv.Itoa(len(os.Args)) }()
	if got := <-done; !strings.HasPrefix(got, "xxx") {
		t.Fatalf("after Release: %q", got)
	}
	t.Logf("released %d kB of mappings: RssFile %d -> %d kB", n>>10, before, after)
}
