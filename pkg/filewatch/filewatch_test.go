package filewatch_test

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/sidecar-mesh/sidecar/internal/logtest"
	"github.com/sidecar-mesh/sidecar/pkg/filewatch"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// follower runs a watcher and records what it reports: its changes, and
// its transitions, which it logs (logged holds a value once a line was
// logged since the last receive).
type follower struct {
	changes chan string
	logs    *logtest.Buffer
	logged  chan struct{}
}

func follow(t *testing.T, path, initial string, interval time.Duration) *follower {
	t.Helper()
	f := &follower{changes: make(chan string, 100), logs: new(logtest.Buffer), logged: make(chan struct{}, 1)}
	log := slog.New(slog.NewTextHandler(io.MultiWriter(f.logs, signal(f.logged)), &slog.HandlerOptions{Level: slog.LevelDebug}))
	w, err := filewatch.Start(filewatch.Config{
		Path: path, Initial: []byte(initial), Interval: interval, Debounce: 20 * time.Millisecond, Logger: log,
	}, func(data []byte) { f.changes <- string(data) })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(w.Close)
	return f
}

// next waits for the next report and checks it is want.
func (f *follower) next(t *testing.T, what, want string) {
	t.Helper()
	select {
	case got := <-f.changes:
		if got != want {
			t.Fatalf("%s: reported %q, want %q", what, got, want)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: nothing reported within 10s, want %q", what, want)
	}
}

// waitLog waits until msg has been logged n times, looking again after
// each line logged.
func (f *follower) waitLog(t *testing.T, msg string, n int) {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for f.logs.Count(msg) < n {
		select {
		case <-f.logged:
		case <-timeout:
			t.Fatalf("%q logged %d times within 10s, want %d", msg, f.logs.Count(msg), n)
		}
	}
}

// signal is a writer that discards what it is given and then puts a value
// in its channel, unless one is there already.
type signal chan struct{}

func (s signal) Write(p []byte) (int, error) {
	select {
	case s <- struct{}{}:
	default:
	}
	return len(p), nil
}

func write(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// An edit in place and a rename over the file (write a temporary file,
// then rename it) are both reported; rewriting the same content is not.
func TestEditAndAtomicRename(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "policies.yaml")
	write(t, path, "v1")
	f := follow(t, path, "v1", time.Hour)

	write(t, path, "v2")
	f.next(t, "edit in place", "v2")

	tmp := filepath.Join(dir, ".policies.yaml.tmp")
	write(t, tmp, "v3")
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
	f.next(t, "rename over the file", "v3")

	write(t, path, "v3") // same content: not reported
	write(t, path, "v4")
	f.next(t, "edit after rewriting the same content", "v4")
}

// A Kubernetes ConfigMap update: the file links to ..data/FILE, and ..data
// is re-pointed to a new directory by renaming a new symlink over it.
func TestConfigMapSymlinkSwap(t *testing.T) {
	dir := t.TempDir()
	version := func(n int, content string) string {
		d := fmt.Sprintf("..2025_01_01_00_00_0%d.1", n)
		if err := os.Mkdir(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
		write(t, filepath.Join(dir, d, "policies.yaml"), content)
		return d
	}
	v1 := version(1, "v1")
	if err := os.Symlink(v1, filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "policies.yaml")
	if err := os.Symlink(filepath.Join("..data", "policies.yaml"), path); err != nil {
		t.Fatal(err)
	}
	f := follow(t, path, "v1", time.Hour)

	v2 := version(2, "v2")
	if err := os.Symlink(v2, filepath.Join(dir, "..data_tmp")); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(dir, "..data_tmp"), filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(filepath.Join(dir, v1)); err != nil {
		t.Fatal(err)
	}
	f.next(t, "ConfigMap symlink swap", "v2")
}

// A removed file is logged once and not reported (its user keeps the last
// content); when it comes back with new content, that is reported.
func TestRemovedAndBack(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "policies.yaml")
	write(t, path, "v1")
	f := follow(t, path, "v1", 20*time.Millisecond)

	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	f.waitLog(t, "file unreadable; keeping its last content", 1)
	write(t, path, "v1") // back as it was: nothing to report
	f.waitLog(t, "file readable again", 1)
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	f.waitLog(t, "file unreadable; keeping its last content", 2)
	write(t, path, "v2")
	f.next(t, "file back with new content", "v2")
	if n := len(f.changes); n != 0 {
		t.Fatalf("%d more reports, want none (removals are not reported)", n)
	}
	if n := f.logs.Count("file unreadable"); n != 2 {
		t.Fatalf("logged 'file unreadable' %d times for 2 removals, want 2 (transitions only)", n)
	}
}

// A burst of writes is read at its end, not once per write.
func TestBurstDebounced(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "policies.yaml")
	write(t, path, "v0")
	f := follow(t, path, "v0", time.Hour)
	for i := 1; i <= 50; i++ {
		write(t, path, fmt.Sprintf("v%d", i))
	}
	reports := 0
	for {
		select {
		case got := <-f.changes:
			reports++
			if got != "v50" {
				continue
			}
			if reports > 10 {
				t.Fatalf("50 writes in a burst were reported %d times, want a few", reports)
			}
			t.Logf("50 writes in a burst: %d reports", reports)
			return
		case <-time.After(10 * time.Second):
			t.Fatalf("the last write of a burst was not reported (%d reports)", reports)
		}
	}
}

// A file behind a symlink to another directory changes without an event
// in the watched directory: the periodic check finds it.
func TestPeriodicCheck(t *testing.T) {
	target := filepath.Join(t.TempDir(), "target.yaml")
	write(t, target, "v1")
	path := filepath.Join(t.TempDir(), "policies.yaml")
	if err := os.Symlink(target, path); err != nil {
		t.Fatal(err)
	}
	f := follow(t, path, "v1", 20*time.Millisecond)
	write(t, target, "v2 is longer")
	f.next(t, "edit behind a symlink", "v2 is longer")
}

// A file that grows past the input cap (here a symlink swapped to
// /dev/zero, which never ends) is read no further than the cap and not
// reported: the last content stays, and the log names the cap.
func TestFileLargerThanTheCap(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "policies.yaml")
	write(t, path, "v1")
	f := follow(t, path, "v1", time.Hour)

	link := filepath.Join(dir, "zero")
	if err := os.Symlink("/dev/zero", link); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(link, path); err != nil {
		t.Fatal(err)
	}
	f.waitLog(t, "file unreadable; keeping its last content", 1)
	if n := f.logs.Count("is larger than 64 MiB"); n != 1 {
		t.Fatalf("the log names the cap %d times, want 1:\n%s", n, f.logs.String())
	}
	write(t, path+".tmp", "v2")
	if err := os.Rename(path+".tmp", path); err != nil {
		t.Fatal(err)
	}
	f.next(t, "a small file again", "v2")
}
