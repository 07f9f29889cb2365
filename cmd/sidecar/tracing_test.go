package main

import (
	"bufio"
	"crypto/rand"
	"encoding/hex"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil/promlint"

	"github.com/sidecar-mesh/sidecar/internal/jaegertest"
)

func newTraceparent() (traceID, header string) {
	var b [24]byte
	_, _ = rand.Read(b[:])
	traceID, parent := hex.EncodeToString(b[:16]), hex.EncodeToString(b[16:])
	return traceID, "00-" + traceID + "-" + parent + "-01"
}

// app A -> sidecar A -> sidecar B -> app B, with B's first answer a 503:
// the trace in Jaeger has A's client span under the app's context, two
// attempt spans under it (the second naming its retry reason), and B's
// server span under each attempt, all one trace.
func TestTraceAcrossTwoSidecars(t *testing.T) {
	jaeger := jaegertest.Start(t)
	var calls atomic.Int64
	appB := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if calls.Add(1) == 1 {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		io.WriteString(w, "b")
	}))
	defer appB.Close()
	_, portB, _ := net.SplitHostPort(strings.TrimPrefix(appB.URL, "http://"))
	inB := freePort(t)
	tracingArgs := []string{"--tracing-endpoint", jaeger.OTLPGRPC, "--tracing-sampler", "parentbased_always_on"}
	runSidecar(t, "", append([]string{"--service", "b", "--app-port", portB, "--inbound-addr", inB}, tracingArgs...)...)
	a := runSidecar(t, "policies:\n  - {service: b, retry: {backoff: {base: 5ms, max: 5ms}}}\n",
		append([]string{"--service", "a", "--static", "b=" + inB}, tracingArgs...)...)

	traceID, traceparent := newTraceparent()
	req, _ := http.NewRequest("GET", "http://"+a.out+"/orders", nil)
	req.Host = "b"
	req.Header.Set("Traceparent", traceparent)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(body) != "b" {
		t.Fatalf("call through two sidecars: %d %q, want B's 200 after a retry", resp.StatusCode, body)
	}

	var spans []jaegertest.Span
	var services map[string]string
	for deadline := time.Now().Add(15 * time.Second); len(spans) < 5; {
		if time.Now().After(deadline) {
			t.Fatalf("trace %s in Jaeger has %d spans after 15s, want 5: %+v", traceID, len(spans), spans)
		}
		time.Sleep(100 * time.Millisecond) // polling Jaeger's query API
		spans, services, err = jaeger.Trace(traceID)
		if err != nil {
			t.Fatal(err)
		}
	}
	byName := map[string]jaegertest.Span{}
	var serverSpans []jaegertest.Span
	for _, s := range spans {
		if s.TraceID != traceID {
			t.Fatalf("span %s has trace ID %s, want %s", s.OperationName, s.TraceID, traceID)
		}
		if services[s.ProcessID] == "b" {
			serverSpans = append(serverSpans, s)
		} else {
			byName[s.OperationName] = s
		}
		t.Logf("span %-26s service %s parent %s tags retry.reason=%q status=%s", s.OperationName,
			services[s.ProcessID], s.Parent(), s.Tag("sidecar.retry.reason"), s.Tag("http.response.status_code"))
	}
	client, first, retry := byName["GET b"], byName["attempt 1"], byName["attempt 2 (retry: 503)"]
	switch {
	case client.SpanID == "" || first.SpanID == "" || retry.SpanID == "":
		t.Fatalf("sidecar A's spans %v, want GET b, attempt 1 and attempt 2 (retry: 503)", keys(byName))
	case client.Parent() != strings.Split(traceparent, "-")[2]:
		t.Fatalf("A's client span's parent is %s, want the app's span from its traceparent", client.Parent())
	case first.Parent() != client.SpanID || retry.Parent() != client.SpanID:
		t.Fatal("the attempt spans are not children of A's client span")
	case retry.Tag("sidecar.retry.reason") != "503" || first.Tag("http.response.status_code") != "503":
		t.Fatalf("attempt tags: first status %q, retry reason %q", first.Tag("http.response.status_code"), retry.Tag("sidecar.retry.reason"))
	case len(serverSpans) != 2:
		t.Fatalf("%d server spans from sidecar B, want one per attempt", len(serverSpans))
	}
	parents := map[string]bool{serverSpans[0].Parent(): true, serverSpans[1].Parent(): true}
	if !parents[first.SpanID] || !parents[retry.SpanID] {
		t.Fatalf("B's server spans hang under %v, want the two attempt spans %s and %s", parents, first.SpanID, retry.SpanID)
	}

	// The duration histogram carries the trace ID as an exemplar for
	// OpenMetrics scrapers, and the exposition passes Prometheus's linter.
	om := scrape(t, a.metrics, "application/openmetrics-text")
	if !strings.Contains(om, `trace_id="`+traceID+`"`) {
		t.Errorf("no exemplar with trace ID %s in the OpenMetrics exposition", traceID)
	}
	problems, err := promlint.New(strings.NewReader(scrape(t, a.metrics, "text/plain"))).Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("promlint: %s: %s", p.Metric, p.Text)
	}
}

func keys(m map[string]jaegertest.Span) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

func scrape(t *testing.T, addr, accept string) string {
	t.Helper()
	req, _ := http.NewRequest("GET", "http://"+addr+"/metrics", nil)
	req.Header.Set("Accept", accept)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// Jaeger stopped for 30 s under steady load: no request fails, the spans
// that could not be exported are counted as dropped, memory stays bounded,
// and spans flow again once Jaeger is back.
func TestJaegerOutageUnderLoad(t *testing.T) {
	jaeger := jaegertest.Start(t)
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") }))
	defer upstream.Close()
	a := runSidecar(t, "", "--static", "up="+strings.TrimPrefix(upstream.URL, "http://"),
		"--tracing-endpoint", jaeger.OTLPGRPC, "--tracing-sampler", "always_on")
	var sent, failed atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := &http.Client{Timeout: 5 * time.Second}
			tick := time.NewTicker(20 * time.Millisecond) // 2 x 50 requests/s
			defer tick.Stop()
			for {
				select {
				case <-stop:
					return
				case <-tick.C:
				}
				req, _ := http.NewRequest("GET", "http://"+a.out+"/", nil)
				req.Host = "up"
				sent.Add(1)
				resp, err := c.Do(req)
				if err != nil {
					failed.Add(1)
					continue
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 {
					failed.Add(1)
				}
			}
		}()
	}
	heap := func() uint64 {
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m.HeapInuse
	}
	time.Sleep(2 * time.Second)
	before := heap()
	jaeger.Stop()
	outage := 30 * time.Second
	if testing.Short() {
		outage = 3 * time.Second
	}
	time.Sleep(outage)
	during := heap()
	dropped := metricValue(t, a.metrics, "sidecar_tracing_dropped_spans_total")
	jaeger.Restart(t)
	time.Sleep(2 * time.Second)
	close(stop)
	wg.Wait()

	t.Logf("%d requests during a %v Jaeger outage and around it, %d failed; %0.f spans dropped; heap %d -> %d MiB",
		sent.Load(), outage, failed.Load(), dropped, before>>20, during>>20)
	if failed.Load() != 0 {
		t.Fatalf("%d of %d requests failed with Jaeger down, want 0", failed.Load(), sent.Load())
	}
	if dropped == 0 {
		t.Fatal("sidecar_tracing_dropped_spans_total is 0 after the outage, want the lost spans counted")
	}
	if during > before+64<<20 {
		t.Fatalf("heap grew from %d to %d MiB during the outage: spans are piling up", before>>20, during>>20)
	}
	// Spans of requests made once Jaeger is back reach it (the first few
	// may still meet a collector that is starting up and be dropped).
	for deadline := time.Now().Add(20 * time.Second); ; {
		traceID, traceparent := newTraceparent()
		req, _ := http.NewRequest("GET", "http://"+a.out+"/", nil)
		req.Host = "up"
		req.Header.Set("Traceparent", traceparent)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		time.Sleep(1500 * time.Millisecond) // one export interval and then some
		if spans, _, err := jaeger.Trace(traceID); err == nil && len(spans) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no span of a request made after Jaeger came back reached it within 20s")
		}
	}
}

// What a peer or an upstream writes cannot cost the pod its traces: a
// path with a byte that is not UTF-8, a path of 60 KB, an upstream's reason
// phrase and grpc-status in Latin-1 and an error naming a 60 KB header line
// all reach Jaeger as spans of their own (escaped, cut to 256 bytes), and
// the requests sent beside them keep theirs: OTLP refuses a whole batch for
// one invalid string, and a collector one larger than its message limit.
func TestHostileBytesDoNotCostSpans(t *testing.T) {
	jaeger := jaegertest.Start(t)
	evil := rawUpstream(t, func(path string) string {
		switch path {
		case "/latin1":
			return "HTTP/1.1 503 Serv\xffce Unavailable\r\nGrpc-Status: 0\xff\r\nContent-Length: 0\r\n\r\n"
		default: // a header line of 60 KB with no colon
			return "HTTP/1.1 200 OK\r\n" + strings.Repeat("<", 60000) + "\r\nContent-Length: 0\r\n\r\n"
		}
	})
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "app") }))
	defer app.Close()
	_, appPort, _ := net.SplitHostPort(strings.TrimPrefix(app.URL, "http://"))
	in := freePort(t)
	s := runSidecar(t, "policies:\n  - {service: evil, retry: {attempts: 2, backoff: {base: 1ms, max: 1ms}}}\n",
		"--service", "me", "--app-port", appPort, "--inbound-addr", in, "--static", "evil="+evil,
		"--tracing-endpoint", jaeger.OTLPGRPC, "--tracing-sampler", "parentbased_always_on")

	send := func(addr, host, path string) string {
		traceID, traceparent := newTraceparent()
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		io.WriteString(conn, "GET "+path+" HTTP/1.1\r\nHost: "+host+"\r\nTraceparent: "+traceparent+"\r\nConnection: close\r\n\r\n")
		io.ReadAll(conn)
		return traceID
	}
	long := "/" + strings.Repeat("p", 60000)
	traces := map[string]string{
		"inbound /%ff":   send(in, "me", "/%ff"),
		"inbound 60 KB":  send(in, "me", long),
		"upstream latin": send(s.out, "evil", "/latin1"),
		"upstream line":  send(s.out, "evil", "/line"),
		"plain":          send(in, "me", "/plain"),
	}
	for what, traceID := range traces {
		var spans []jaegertest.Span
		for deadline := time.Now().Add(15 * time.Second); len(spans) == 0; {
			if time.Now().After(deadline) {
				t.Fatalf("%s: no span of trace %s in Jaeger after 15s (dropped: %s)", what, traceID, metricLine(scrape(t, s.metrics, "text/plain"), "sidecar_tracing_dropped_spans_total"))
			}
			time.Sleep(100 * time.Millisecond) // polling Jaeger's query API
			var err error
			if spans, _, err = jaeger.Trace(traceID); err != nil {
				t.Fatal(err)
			}
		}
		for _, sp := range spans {
			if p := sp.Tag("url.path"); len(p) > 256 {
				t.Errorf("%s: span %s has a url.path of %d bytes, want at most 256", what, sp.OperationName, len(p))
			}
		}
	}
	if m := metricLine(scrape(t, s.metrics, "text/plain"), "sidecar_tracing_dropped_spans_total"); !strings.HasSuffix(m, " 0") {
		t.Errorf("%s, want none dropped", m)
	}
}

// rawUpstream serves each connection's first request with the raw answer
// answer gives for its path, then closes it.
func rawUpstream(t *testing.T, answer func(path string) string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				req, err := http.ReadRequest(bufio.NewReader(c))
				if err != nil {
					return
				}
				io.WriteString(c, answer(req.URL.Path))
			}()
		}
	}()
	return ln.Addr().String()
}

// metricLine is the first line of an exposition that starts with name.
func metricLine(exposition, name string) string {
	for _, l := range strings.Split(exposition, "\n") {
		if strings.HasPrefix(l, name) {
			return l
		}
	}
	return name + " (absent)"
}
