package main

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/requestlog"
)

// `sidecar why` and `sidecar tap` against a real sidecar whose upstreams
// fail: nothing listens at either endpoint of "gone", and "busy" answers
// 503. why tells each failed request's attempts and why they stopped, in
// words and as JSON; tap streams the requests as they finish.
func TestWhyAndTap(t *testing.T) {
	busy := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusServiceUnavailable)
	}))
	defer busy.Close()
	gone := []string{freePort(t), freePort(t)}
	rs := runSidecar(t, `discovery:
  static:
    gone: [`+strings.Join(gone, ", ")+`]
    busy: [`+strings.TrimPrefix(busy.URL, "http://")+`]
policies:
  - {service: "*", retry: {attempts: 3, backoff: {base: 1ms, max: 2ms}, on: [connect-failure, 503]}}
`)
	env := map[string]string{"SIDECAR_ADMIN_ADDR": rs.admin}
	c := &http.Client{Timeout: 10 * time.Second}
	send := func(method, service, path string) {
		t.Helper()
		req, _ := http.NewRequest(method, "http://"+rs.out+path, nil)
		req.Host = service
		resp, err := c.Do(req)
		if err != nil {
			t.Fatalf("%s %s%s: %v", method, service, path, err)
		}
		resp.Body.Close()
	}

	// The tap sees requests while it watches: requests go until it has
	// printed two.
	type result struct {
		out string
		err error
	}
	tapped := make(chan result, 1)
	go func() {
		out, _, err := cliIn(t, env, "", "tap", "--service", "gone", "--max", "2", "-o", "json")
		tapped <- result{out, err}
	}()
	var tap result
	for sent := 0; ; sent++ {
		select {
		case tap = <-tapped:
		case <-time.After(20 * time.Millisecond): // the pace of the requests, not a wait for an outcome
			if sent > 500 {
				t.Fatal("sidecar tap printed no two requests of 500 sent")
			}
			send(http.MethodGet, "gone", "/users/1")
			continue
		}
		break
	}
	if tap.err != nil {
		t.Fatalf("sidecar tap: %v", tap.err)
	}
	lines := strings.Split(strings.TrimSpace(tap.out), "\n")
	if len(lines) != 2 {
		t.Fatalf("sidecar tap --max 2 printed %d lines, want 2:\n%s", len(lines), tap.out)
	}
	for _, l := range lines {
		var r requestlog.Request
		if err := json.Unmarshal([]byte(l), &r); err != nil || r.Service != "gone" || r.Status != 502 || len(r.Attempts) != 3 {
			t.Errorf("sidecar tap printed %s (%v), want gone's 502 after 3 attempts", l, err)
		}
	}
	send(http.MethodPost, "busy", "/orders")

	out, _, err := cliIn(t, env, "", "why")
	if err != nil {
		t.Fatalf("sidecar why: %v", err)
	}
	blocks := strings.Split(strings.TrimSpace(out), "\n\n")
	if len(blocks) < 2 {
		t.Fatalf("sidecar why printed %d blocks, want one per failed request:\n%s", len(blocks), out)
	}
	for i, want := range []*regexp.Regexp{
		regexp.MustCompile(`^\d\d:\d\d:\d\d\.\d{3} POST busy/orders -> 503 after 1 attempt in [\d.]+ ms\n` +
			`  1\) 127\.0\.0\.1:\d+ 503 \([\d.]+ ms\)\n` +
			`  stopped: POST is not retried \(retry\.methods; an Idempotency-Key header allows it\)$`),
		regexp.MustCompile(`^\d\d:\d\d:\d\d\.\d{3} GET gone/users/1 -> 502 upstream_connect_failure after 3 attempts in [\d.]+ ms\n` +
			`  1\) 127\.0\.0\.1:\d+ connection refused \([\d.]+ ms\)\n` +
			`  2\) retry on connect-failure after [\d.]+ ms backoff, 127\.0\.0\.1:\d+ connection refused \([\d.]+ ms\)\n` +
			`  3\) retry on connect-failure after [\d.]+ ms backoff, 127\.0\.0\.1:\d+ connection refused \([\d.]+ ms\)\n` +
			`  stopped: attempts used up \(retry\.attempts: 3\)\n` +
			`  detail: .*connection refused$`),
	} {
		if !want.MatchString(blocks[i]) {
			t.Errorf("sidecar why, block %d:\n%s\nwant match: %s", i+1, blocks[i], want)
		}
	}

	out, _, err = cliIn(t, env, "", "why", "gone", "--max", "1", "-o", "json")
	if err != nil {
		t.Fatalf("sidecar why gone -o json: %v", err)
	}
	var got []requestlog.Request
	if err := json.Unmarshal([]byte(out), &got); err != nil || len(got) != 1 {
		t.Fatalf("sidecar why gone --max 1 -o json: %d requests (%v), want 1:\n%s", len(got), err, out)
	}
	r := got[0]
	if r.Service != "gone" || r.Status != 502 || r.Reason != "upstream_connect_failure" || r.Stop != requestlog.StopAttemptsUsedUp || len(r.Attempts) != 3 {
		t.Errorf("sidecar why gone -o json: %+v, want gone's 502 upstream_connect_failure, 3 attempts, attempts used up", r)
	}
	for i, a := range r.Attempts {
		if a.Outcome != "connection refused" || (i > 0) != (a.RetryReason == "connect-failure") || a.BreakerState != "closed" ||
			(a.Endpoint != gone[0] && a.Endpoint != gone[1]) {
			t.Errorf("attempt %d: %+v", i+1, a)
		}
	}
}
