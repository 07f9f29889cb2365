package admin

import (
	"bufio"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/requestlog"
)

// GET /requests/failed lists the failed requests kept, of one service
// with ?service=; GET /tap streams requests as JSON lines, a few watchers
// at most, and ends when the recorder ends its taps.
func TestRequestsAndTap(t *testing.T) {
	rec := requestlog.New(requestlog.Config{MaxWatchers: 1})
	defer rec.Close()
	static, _ := discovery.NewStatic(nil)
	srv := httptest.NewServer(Handler(Sources{Config: func() any { return nil }, Resolver: discovery.Chain{static}, Requests: rec}))
	defer srv.Close()
	tr := &http.Transport{}
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr}
	rec.Record(&requestlog.Request{Service: "a", Method: "GET", Path: "/1", Status: 503, Stop: requestlog.StopAttemptsUsedUp,
		Attempts: []requestlog.Attempt{{Endpoint: "10.0.0.1:80", Outcome: "503", BreakerState: "closed"}}})
	rec.Record(&requestlog.Request{Service: "b", Method: "GET", Path: "/2", Status: 502, Reason: "upstream_connect_failure"})
	rec.Record(&requestlog.Request{Service: "b", Method: "GET", Path: "/3", Status: 200})

	for query, want := range map[string]int{"": 2, "?service=a": 1, "?service=c": 0} {
		resp, err := c.Get(srv.URL + "/requests/failed" + query)
		if err != nil {
			t.Fatal(err)
		}
		var got []requestlog.Request
		err = json.NewDecoder(resp.Body).Decode(&got)
		resp.Body.Close()
		if err != nil || len(got) != want {
			t.Errorf("GET /requests/failed%s: %d requests (%v), want %d", query, len(got), err, want)
		}
	}
	if code := status(t, c, srv.URL+"/requests/failed?service=a/b"); code != http.StatusBadRequest {
		t.Errorf("GET /requests/failed?service=a/b: %d, want 400", code)
	}

	resp, err := c.Get(srv.URL + "/tap?service=b&failures=true")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); resp.StatusCode != 200 || ct != "application/x-ndjson" {
		t.Fatalf("GET /tap: %d %s", resp.StatusCode, ct)
	}
	if code := status(t, c, srv.URL+"/tap"); code != http.StatusTooManyRequests {
		t.Errorf("a second tap: %d, want 429", code)
	}
	rec.Record(&requestlog.Request{Service: "b", Method: "GET", Path: "/ok", Status: 200})
	rec.Record(&requestlog.Request{Service: "a", Method: "GET", Path: "/other", Status: 503})
	rec.Record(&requestlog.Request{Service: "b", Method: "GET", Path: "/bad", Status: 503})
	sc := bufio.NewScanner(resp.Body)
	if !sc.Scan() {
		t.Fatalf("GET /tap: no line: %v", sc.Err())
	}
	var line requestlog.Request
	if err := json.Unmarshal(sc.Bytes(), &line); err != nil || line.Path != "/bad" {
		t.Errorf("GET /tap's line %s (%v), want b's failure /bad", sc.Bytes(), err)
	}
	rec.CloseTaps()
	if sc.Scan() {
		t.Errorf("GET /tap went on after the taps were closed: %s", sc.Bytes())
	}
}

// status is the status GET url answers with.
func status(t *testing.T, c *http.Client, url string) int {
	t.Helper()
	resp, err := c.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// A tap that missed requests (over its rate) says so in its stream, as a
// line of its own before the next request it shows.
func TestTapSaysWhatItMissed(t *testing.T) {
	rec := requestlog.New(requestlog.Config{TapRate: 2})
	defer rec.Close()
	static, _ := discovery.NewStatic(nil)
	srv := httptest.NewServer(Handler(Sources{Config: func() any { return nil }, Resolver: discovery.Chain{static}, Requests: rec}))
	defer srv.Close()
	tr := &http.Transport{}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr}).Get(srv.URL + "/tap")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	for i := range 10 { // two a second get through; the rest are missed
		rec.Record(&requestlog.Request{Service: "a", Method: "GET", Path: "/" + strconv.Itoa(i), Status: 200, Time: time.Now()})
	}
	time.Sleep(1100 * time.Millisecond) // the next second
	rec.Record(&requestlog.Request{Service: "a", Method: "GET", Path: "/after", Status: 200, Time: time.Now()})
	sc := bufio.NewScanner(resp.Body)
	var lines []string
	for len(lines) < 6 && sc.Scan() {
		lines = append(lines, sc.Text())
		if strings.Contains(sc.Text(), `"/after"`) {
			break
		}
	}
	rec.CloseTaps()
	// The count goes out with the next line the tap writes, whichever
	// that is: before /after in any case. The stream may read it while
	// the requests are still being missed, and say it in two parts.
	var requests, dropped int
	for _, l := range lines[:max(len(lines)-1, 0)] {
		var gap struct{ Dropped *int }
		if json.Unmarshal([]byte(l), &gap) == nil && gap.Dropped != nil {
			dropped += *gap.Dropped
		} else {
			requests++
		}
	}
	if requests != 2 || dropped != 8 || len(lines) == 0 || !strings.Contains(lines[len(lines)-1], `"/after"`) {
		t.Fatalf("tap stream %q, want two requests and 8 dropped, then /after", lines)
	}
}
