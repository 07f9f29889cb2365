package requestlog

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func failure(service string, i int) *Request {
	return &Request{Time: time.Now(), Service: service, Method: "GET", Path: "/" + strconv.Itoa(i), Status: 503,
		Attempts: []Attempt{{Endpoint: "10.0.0.1:80", Outcome: "503", BreakerState: "closed"}}, Stop: StopAttemptsUsedUp}
}

// Memory stays bounded however many failures come, from however many
// services: 200,000 failures (20 s of 10,000 a second) over 1,000
// services from 4 goroutines leave at most PerService per service and
// (MaxServices+1)×PerService in all, the newest of each service kept.
func TestRingBounded(t *testing.T) {
	r := New(Config{PerService: 16, MaxServices: 100})
	defer r.Close()
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	const total, services = 200_000, 1000
	r.Record(failure("svc-7", -1)) // svc-7 has a ring of its own
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			for i := g; i < total; i += 4 {
				r.Record(failure("svc-"+strconv.Itoa(i%services), i))
			}
		})
	}
	wg.Wait()
	runtime.GC()
	runtime.ReadMemStats(&after)
	if kept, capacity := r.Kept(), r.Capacity(); kept != capacity || capacity != 101*16 {
		t.Errorf("kept %d failed requests of %d recorded, capacity %d; want %d, all the rings full", kept, total, capacity, 101*16)
	}
	got := r.Failed("svc-7")
	if len(got) != 16 {
		t.Fatalf("svc-7 has %d kept, want 16", len(got))
	}
	for _, q := range got {
		if n, _ := strconv.Atoi(strings.TrimPrefix(q.Path, "/")); n < total-16*services {
			t.Errorf("svc-7 keeps request %d, older than its 16 newest", n)
		}
	}
	grown := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	t.Logf("%d failures over %d services: %d kept, heap grew %d KiB", total, services, r.Kept(), grown>>10)
	if grown > 4<<20 {
		t.Errorf("heap grew %d KiB for %d kept requests, want under 4 MiB", grown>>10, r.Kept())
	}
}

// A tap sees what matches its filter, at most TapRate a second, the rest
// counted as dropped; no more than MaxWatchers watch; a stopped tap's
// channel is closed and the recorder stops publishing.
func TestTap(t *testing.T) {
	r := New(Config{TapRate: 5, MaxWatchers: 2})
	defer r.Close()
	if r.Wants() {
		t.Fatal("Wants with nobody watching")
	}
	all, err := r.Tap(TapFilter{})
	if err != nil {
		t.Fatal(err)
	}
	fails, err := r.Tap(TapFilter{Service: "a", FailuresOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.Tap(TapFilter{}); err != ErrTooManyWatchers {
		t.Fatalf("a third tap: %v, want ErrTooManyWatchers", err)
	}
	if !r.Wants() {
		t.Fatal("not Wants with two taps")
	}
	ok := &Request{Service: "a", Status: 200}
	r.Record(ok)
	r.Record(failure("b", 1))
	r.Record(failure("a", 2))
	if got := len(all.Lines()); got != 3 {
		t.Errorf("the tap of everything has %d lines, want 3", got)
	}
	if got := len(fails.Lines()); got != 1 {
		t.Errorf("the tap of a's failures has %d lines, want 1", got)
	}
	for i := range 10 {
		r.Record(failure("b", i))
	}
	// Within one second at most 5 (unless the second turned meanwhile).
	if got, d := len(all.Lines()), all.Dropped(); got+int(d) != 13 || got > 10 {
		t.Errorf("the tap has %d lines and dropped %d, want 13 in all, at most 5 a second", got, d)
	}
	all.Stop()
	fails.Stop()
	if r.Wants() {
		t.Error("Wants after both taps stopped")
	}
	n := 0
	for range all.Lines() {
		n++
	}
	if _, open := <-fails.Lines(); open && n == 0 {
		t.Error("a stopped tap's channel stays open")
	}
}

// The access log writes one JSON line per request with the fields of the
// contract; failuresOnly leaves successes out.
func TestAccessLog(t *testing.T) {
	for _, failuresOnly := range []bool{false, true} {
		var buf syncBuffer
		r := New(Config{AccessLog: slog.New(slog.NewJSONHandler(&buf, nil)), FailuresOnly: failuresOnly})
		if r.Wants() == failuresOnly {
			t.Errorf("failuresOnly %v: Wants %v", failuresOnly, r.Wants())
		}
		r.Record(&Request{Service: "a", Method: "GET", Path: "/ok", Status: 200, TraceID: "4bf92f3577b34da6a3ce929d0e0e4736",
			Attempts: []Attempt{{Endpoint: "10.0.0.1:80", Outcome: "200"}}})
		r.Record(&Request{Service: "a", Method: "GET", Path: "/bad", Status: 502, Reason: "upstream_connect_failure",
			Attempts: []Attempt{{Endpoint: "10.0.0.1:80"}, {Endpoint: "10.0.0.2:80"}}})
		r.Close()
		lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
		want := 2
		if failuresOnly {
			want = 1
		}
		if len(lines) != want {
			t.Fatalf("failuresOnly %v: %d lines, want %d:\n%s", failuresOnly, len(lines), want, buf.String())
		}
		var last map[string]any
		if err := json.Unmarshal([]byte(lines[len(lines)-1]), &last); err != nil {
			t.Fatal(err)
		}
		for k, v := range map[string]any{"msg": "request", "service": "a", "method": "GET", "path": "/bad", "status": 502.0,
			"reason": "upstream_connect_failure", "attempts": 2.0, "upstream": "10.0.0.2:80"} {
			if last[k] != v {
				t.Errorf("failuresOnly %v: %s = %v, want %v in %s", failuresOnly, k, last[k], v, lines[len(lines)-1])
			}
		}
	}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// A request that finishes after Close (one the shutdown's timeout left
// behind) is taken without a panic and without a line; a tap asked for
// after CloseTaps is refused.
func TestAfterClose(t *testing.T) {
	var buf syncBuffer
	r := New(Config{AccessLog: slog.New(slog.NewJSONHandler(&buf, nil))})
	r.Record(failure("a", 1))
	r.Close()
	r.Record(failure("a", 2))
	r.Close()
	if n := strings.Count(buf.String(), `"msg":"request"`); n != 1 {
		t.Errorf("%d access log lines, want the one recorded before Close:\n%s", n, buf.String())
	}
	if _, err := r.Tap(TapFilter{}); err != ErrClosed {
		t.Errorf("Tap after Close: %v, want ErrClosed", err)
	}
	if got := len(r.Failed("a")); got != 2 {
		t.Errorf("%d failures kept, want both", got)
	}
}
