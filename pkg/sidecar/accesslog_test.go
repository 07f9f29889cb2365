package sidecar_test

import (
	"bufio"
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/sidecar-mesh/sidecar/internal/logtest"
	"github.com/sidecar-mesh/sidecar/pkg/sidecar"
)

// With accessLog on, every outbound request is one line of the sidecar's
// log with the contract's fields, and every line is written by the time
// Run returns; with failuresOnly, successes are left out. A tap watching
// when the sidecar shuts down is ended, so the shutdown does not wait for
// it.
func TestAccessLogAndTapShutdown(t *testing.T) {
	for _, failuresOnly := range []bool{false, true} {
		upstream := serve(t, "users")
		cfg := testConfig(t, serve(t, "app").URL, strings.TrimPrefix(upstream.URL, "http://"))
		cfg.Discovery.Static["gone"] = []string{"127.0.0.1:1"}
		cfg.AccessLog.Enabled, cfg.AccessLog.FailuresOnly = true, failuresOnly
		log, logs := logtest.New()
		sc, err := sidecar.New(cfg, sidecar.WithLogger(log))
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		ctx, cancel := context.WithCancel(context.Background())
		go func() { done <- sc.Run(ctx) }()
		l := cfg.Listeners
		waitFor(t, "http://"+l.Admin+"/version", 200)

		tap, err := http.Get("http://" + l.Admin + "/tap")
		if err != nil || tap.StatusCode != 200 {
			t.Fatalf("GET /tap: %v %v", tap, err)
		}
		for range 3 {
			get(t, http.MethodGet, "http://"+l.Outbound+"/users/1", "users")
		}
		if code, _ := get(t, http.MethodGet, "http://"+l.Outbound+"/x", "gone"); code != 502 {
			t.Fatalf("GET gone: %d, want 502", code)
		}
		lines := bufio.NewScanner(tap.Body)
		for i := range 4 {
			if !lines.Scan() {
				t.Fatalf("the tap ended after %d lines, want 4", i)
			}
		}
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("Run: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("Run did not return within 10s: a tap held the admin server's shutdown")
		}
		if lines.Scan() {
			t.Errorf("the tap went on after the shutdown: %s", lines.Bytes())
		}
		tap.Body.Close()

		var access []string
		for _, l := range strings.Split(logs.String(), "\n") {
			if strings.Contains(l, "msg=request component=access ") {
				access = append(access, l)
			}
		}
		want := 4
		if failuresOnly {
			want = 1
		}
		if len(access) != want {
			t.Fatalf("failuresOnly %v: %d access log lines, want %d:\n%s", failuresOnly, len(access), want, logs.String())
		}
		for _, field := range []string{"service=gone", "method=GET", "path=/x", "status=502", "reason=upstream_connect_failure",
			"attempts=3", "upstream=127.0.0.1:1", "stop=attempts-used-up", "durationMs="} {
			if !strings.Contains(access[len(access)-1]+" ", " "+field) {
				t.Errorf("failuresOnly %v: the failure's line lacks %s: %s", failuresOnly, field, access[len(access)-1])
			}
		}
	}
}
