package panics

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"testing/synctest"

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

func TestRunRestartsAfterAPanic(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		SetLogger(slog.New(slog.DiscardHandler))
		defer SetLogger(nil)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		calls := 0
		before := count("test.run")
		Run(ctx, "test.run", func(context.Context) {
			calls++
			if calls < 4 {
				panic("bad answer")
			}
		})
		if calls != 4 || count("test.run")-before != 3 {
			t.Fatalf("fn called %d times with %d panics reported, want 4 calls and 3 panics", calls, count("test.run")-before)
		}
	})
}

func TestHandlerAbortsTheRequestAndCounts(t *testing.T) {
	SetLogger(slog.New(slog.DiscardHandler))
	defer SetLogger(nil)
	before := count("test.handler")
	srv := httptest.NewServer(Handler("test.handler", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/abort" {
			panic(http.ErrAbortHandler)
		}
		if r.URL.Path == "/boom" {
			var p *struct{ x int }
			_ = p.x // nil dereference
		}
		io.WriteString(w, "ok")
	})))
	defer srv.Close()
	for _, path := range []string{"/boom", "/abort"} {
		if _, err := http.Get(srv.URL + path); err == nil {
			t.Errorf("GET %s: got an answer, want the request aborted", path)
		}
	}
	resp, err := http.Get(srv.URL + "/")
	if err != nil {
		t.Fatalf("after two aborted requests: %v", err)
	}
	resp.Body.Close()
	if got := count("test.handler") - before; got != 1 {
		t.Fatalf("%d panics counted, want 1 (ErrAbortHandler is no bug)", got)
	}
}
