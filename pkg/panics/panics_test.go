package panics

import (
	"bytes"
	"log/slog"
	"strings"
	"sync"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestRecoverCountsAndLogsWithStack(t *testing.T) {
	var buf bytes.Buffer
	SetLogger(slog.New(slog.NewJSONHandler(&buf, nil)))
	defer SetLogger(nil)
	before := count("test.loop")
	var wg sync.WaitGroup
	for range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer Recover("test.loop")
			var m map[string]int
			m["boom"]++ // a nil map write: a real runtime panic
		}()
	}
	wg.Wait()
	if got := count("test.loop") - before; got != 3 {
		t.Fatalf("Counts()[test.loop] grew by %d after 3 panics, want 3", got)
	}
	if !strings.Contains(buf.String(), "assignment to entry in nil map") || !strings.Contains(buf.String(), "panics_test.go") {
		t.Fatalf("log lacks the panic value or its stack:\n%s", buf.String())
	}
}

func TestRecoverWithoutPanicReportsNothing(t *testing.T) {
	before := count("test.quiet")
	func() { defer Recover("test.quiet") }()
	if count("test.quiet") != before {
		t.Fatal("Recover counted a panic that did not happen")
	}
}

func count(where string) uint64 {
	for _, c := range Counts() {
		if c.Where == where {
			return c.N
		}
	}
	return 0
}
