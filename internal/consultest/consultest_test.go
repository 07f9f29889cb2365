package consultest

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// client does not keep connections, so no transport goroutine outlives a
// request (goleak) and a stopped agent is seen at once.
var client = &http.Client{
	Timeout:   5 * time.Second,
	Transport: &http.Transport{DisableKeepAlives: true},
}

func TestAgentKVHealthStopRestart(t *testing.T) {
	a := Start(t)
	base := "http://" + a.Addr()

	// KV: put, then read back.
	call(t, http.MethodPut, base+"/v1/kv/consultest/greeting", "hello", http.StatusOK, "true")
	call(t, http.MethodGet, base+"/v1/kv/consultest/greeting?raw", "", http.StatusOK, "hello")

	// A service with a TTL check is critical until the check passes.
	register := `{"ID": "web-1", "Name": "web", "Address": "127.0.0.1", "Port": 8080, "Check": {"TTL": "30s"}}`
	call(t, http.MethodPut, base+"/v1/agent/service/register", register, http.StatusOK, "")
	if got := passingIDs(t, base, "web"); len(got) != 0 {
		t.Fatalf("GET /v1/health/service/web?passing before the TTL check passed: got service IDs %q, want none", got)
	}
	call(t, http.MethodPut, base+"/v1/agent/check/pass/service:web-1", "", http.StatusOK, "")
	waitFor(t, 10*time.Second, "web-1 passing in /v1/health/service/web?passing", func() (bool, string) {
		got := passingIDs(t, base, "web")
		return len(got) == 1 && got[0] == "web-1", "service IDs " + strings.Join(got, ",")
	})

	// Stopped: the API is gone. A second Stop does nothing.
	a.Stop()
	a.Stop()
	if l, err := leader(context.Background(), client, a.Addr()); err == nil {
		t.Fatalf("GET /v1/status/leader after Stop: got leader %q, want a connection error", l)
	}

	// Restarted on the same address: a leader again, and empty (dev mode).
	addr := a.Addr()
	a.Restart(t)
	if a.Addr() != addr {
		t.Fatalf("Addr after Restart: got %s, want %s (the same ports)", a.Addr(), addr)
	}
	l, err := leader(context.Background(), client, a.Addr())
	if err != nil || l == "" {
		t.Fatalf("GET /v1/status/leader after Restart: got leader %q, error %v; want a leader", l, err)
	}
	call(t, http.MethodGet, base+"/v1/kv/consultest/greeting?raw", "", http.StatusNotFound, "")
}

// call sends body (none when empty) and checks the status and, when
// wantBody is not empty, the trimmed response body.
func call(t *testing.T, method, url, body string, wantStatus int, wantBody string) {
	t.Helper()
	status, got := send(t, method, url, body)
	if status != wantStatus || (wantBody != "" && strings.TrimSpace(got) != wantBody) {
		t.Fatalf("%s %s: got %d %q, want %d %q", method, url, status, got, wantStatus, wantBody)
	}
}

func send(t *testing.T, method, url, body string) (int, string) {
	t.Helper()
	var r io.Reader
	if body != "" {
		r = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, url, r)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: reading body: %v", method, url, err)
	}
	return resp.StatusCode, string(b)
}

// passingIDs lists the IDs of the passing instances of service name.
func passingIDs(t *testing.T, base, name string) []string {
	t.Helper()
	url := base + "/v1/health/service/" + name + "?passing"
	status, body := send(t, http.MethodGet, url, "")
	if status != http.StatusOK {
		t.Fatalf("GET %s: got %d %q, want 200", url, status, body)
	}
	var entries []struct {
		Service struct{ ID string }
	}
	if err := json.Unmarshal([]byte(body), &entries); err != nil {
		t.Fatalf("GET %s: got body %q, want a JSON list of health entries: %v", url, body, err)
	}
	ids := []string{}
	for _, e := range entries {
		ids = append(ids, e.Service.ID)
	}
	return ids
}

// waitFor polls cond every 50 ms until it holds or timeout passes; cond's
// string says what it saw last. The agent is a real process, on real time.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	poll := time.NewTicker(50 * time.Millisecond)
	defer poll.Stop()
	for {
		ok, saw := cond()
		if ok {
			return
		}
		select {
		case <-deadline.C:
			t.Fatalf("waiting %s for %s: last saw %s", timeout, what, saw)
		case <-poll.C:
		}
	}
}
