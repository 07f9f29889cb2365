// Package jaegertest runs a real Jaeger v2 (built by scripts/tools.sh test)
// for tests: OTLP receivers and the query API on free loopback ports,
// in-memory storage. Without the binary a test is skipped, or fails when
// $CI is set.
package jaegertest

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sidecar-mesh/sidecar/internal/freeport"
	"github.com/sidecar-mesh/sidecar/internal/toolbin"
)

// Jaeger is a running Jaeger. Safe for concurrent use.
type Jaeger struct {
	bin, config string
	// OTLPGRPC and OTLPHTTP are the receivers' host:port; Query is the
	// query API's.
	OTLPGRPC, OTLPHTTP, Query string
	log                       *os.File

	mu  sync.Mutex // guards cmd
	cmd *exec.Cmd
}

// Start runs Jaeger until the test ends.
func Start(t testing.TB) *Jaeger {
	t.Helper()
	j := &Jaeger{bin: toolbin.Path(t, "jaeger")}
	ports := freePorts(t, 6)
	j.OTLPGRPC, j.OTLPHTTP, j.Query = ports[0], ports[1], ports[2]
	dir := t.TempDir()
	j.config = filepath.Join(dir, "jaeger.yaml")
	if err := os.WriteFile(j.config, []byte(config(j.OTLPGRPC, j.OTLPHTTP, j.Query, ports[3], ports[4], ports[5])), 0o600); err != nil {
		t.Fatal(err)
	}
	var err error
	if j.log, err = os.Create(filepath.Join(dir, "jaeger.log")); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		j.Stop()
		if t.Failed() {
			log, _ := os.ReadFile(j.log.Name())
			t.Logf("jaegertest: Jaeger's log:\n%s", log)
		}
		j.log.Close()
	})
	j.Restart(t)
	return j
}

// config is a Jaeger v2 configuration: OTLP in, memory storage, the query
// API, everything on loopback, no self-tracing (which makes SIGTERM slow)
// and no metrics port of its own.
func config(grpcAddr, httpAddr, query, queryGRPC, health, metrics string) string {
	return `service:
  extensions: [jaeger_storage, jaeger_query, healthcheckv2]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    logs:
      level: warn
    metrics:
      level: none
extensions:
  healthcheckv2:
    use_v2: true
    http:
      endpoint: ` + health + `
  jaeger_query:
    storage:
      traces: memstore
    enable_tracing: false
    http:
      endpoint: ` + query + `
    grpc:
      endpoint: ` + queryGRPC + `
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 100000
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: ` + grpcAddr + `
      http:
        endpoint: ` + httpAddr + `
processors:
  batch:
    timeout: 100ms
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
# ` + metrics + ` is kept free for the collector's own telemetry, which is off.
`
}

// Restart starts Jaeger again (on the same ports) after Stop, and waits
// until its query API answers.
func (j *Jaeger) Restart(t testing.TB) {
	t.Helper()
	j.mu.Lock()
	defer j.mu.Unlock()
	cmd := exec.Command(j.bin, "--config", j.config)
	cmd.Stdout, cmd.Stderr = j.log, j.log
	if err := cmd.Start(); err != nil {
		t.Fatalf("jaegertest: %v", err)
	}
	j.cmd = cmd
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := http.Get("http://" + j.Query + "/api/services")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return
			}
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(j.log.Name())
			t.Fatalf("jaegertest: query API not answering after 20s: %v\n%s", err, log)
		}
		time.Sleep(50 * time.Millisecond) // waiting for a process to start
	}
}

// Stop stops Jaeger (SIGTERM, then SIGKILL after 10 s).
func (j *Jaeger) Stop() {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.cmd == nil {
		return
	}
	_ = j.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { _ = j.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		_ = j.cmd.Process.Kill()
		<-done
	}
	j.cmd = nil
}

// Span is a span as the query API shows it.
type Span struct {
	TraceID       string `json:"traceID"`
	SpanID        string `json:"spanID"`
	OperationName string `json:"operationName"`
	References    []struct {
		RefType string `json:"refType"`
		SpanID  string `json:"spanID"`
	} `json:"references"`
	Tags []struct {
		Key   string `json:"key"`
		Value any    `json:"value"`
	} `json:"tags"`
	ProcessID string `json:"processID"`
}

// Parent is the span's parent span ID, "" for a root.
func (s Span) Parent() string {
	for _, r := range s.References {
		if r.RefType == "CHILD_OF" {
			return r.SpanID
		}
	}
	return ""
}

// Tag is the value of the span's tag key, as a string.
func (s Span) Tag(key string) string {
	for _, t := range s.Tags {
		if t.Key == key {
			return fmt.Sprint(t.Value)
		}
	}
	return ""
}

// Trace fetches trace id; it returns nil while Jaeger does not have it.
func (j *Jaeger) Trace(id string) ([]Span, map[string]string, error) {
	resp, err := http.Get("http://" + j.Query + "/api/traces/" + strings.ToLower(id))
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusNotFound {
		return nil, nil, nil
	}
	var body struct {
		Data []struct {
			Spans     []Span `json:"spans"`
			Processes map[string]struct {
				ServiceName string `json:"serviceName"`
			} `json:"processes"`
		} `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
		return nil, nil, err
	}
	if len(body.Data) == 0 {
		return nil, nil, nil
	}
	services := map[string]string{}
	for id, p := range body.Data[0].Processes {
		services[id] = p.ServiceName
	}
	return body.Data[0].Spans, services, nil
}

func freePorts(t testing.TB, n int) []string {
	t.Helper()
	ports, err := freeport.Stable(n, false)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, p := range ports {
		out = append(out, net.JoinHostPort("127.0.0.1", strconv.Itoa(p)))
	}
	return out
}
