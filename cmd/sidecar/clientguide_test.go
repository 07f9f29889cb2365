package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/reflection"

	"github.com/sidecar-mesh/sidecar/internal/toolbin"
	"github.com/sidecar-mesh/sidecar/pkg/forward"
)

// clientGuide is the page whose examples TestClientGuide runs.
const clientGuide = "../../docs/clients.md"

// guideAnswer is the body the guide's upstream answers GET /users/1 with.
const guideAnswer = `{"id":1,"name":"Ada"}` + "\n"

// guideWant is what one example of the guide must do.
type guideWant struct {
	tools []string // what its command runs; node-clients: the npm packages
	http  int      // answers of GET /users/1 it prints
	grpc  int      // health checks it makes, each printed as grpcOut
	// grpcOut is how the client prints a SERVING health check.
	grpcOut string
	// fails: the command exits non-zero, printing the guide's output block.
	fails bool
	// pod: run it a second time with the proxy variables the guide tells
	// a pod to set (its clientguide-env block), as it must work there too.
	pod bool
}

// guideWants holds every example of the guide, and only those: an
// example the page gains needs its line here.
var guideWants = map[string]guideWant{
	"curl":              {tools: []string{"curl"}, http: 3, pod: true},
	"wget":              {tools: []string{"wget"}, http: 2, pod: true},
	"python-http":       {tools: []string{"python3"}, http: 3, pod: true},
	"go-http":           {tools: []string{"go"}, http: 2},
	"java":              {tools: []string{"java"}, http: 2},
	"node-undici":       {tools: []string{"node", "node-clients"}, http: 2},
	"node-http":         {tools: []string{"node"}, http: 2, pod: true},
	"grpc-no-authority": {tools: []string{"grpcurl"}, fails: true},
	"grpc-go":           {tools: []string{"go"}, grpc: 1, grpcOut: "SERVING\n"},
	"grpcurl":           {tools: []string{"grpcurl"}, grpc: 1, grpcOut: `"status": "SERVING"`},
	"grpc-js":           {tools: []string{"node", "node-clients"}, grpc: 1, grpcOut: "0801\n", pod: true},
	"grpc-js-proxy":     {tools: []string{"node", "node-clients"}, grpc: 1, grpcOut: "0801\n", pod: true},
	"grpc-python":       {tools: []string{"python3"}, grpc: 1, grpcOut: `b'\x08\x01'`, pod: true},
	"grpc-python-proxy": {tools: []string{"python3"}, grpc: 1, grpcOut: `b'\x08\x01'`, pod: true},
}

// Every example of docs/clients.md runs, as its reader would run it,
// against a real sidecar (`sidecar run`, in-process) whose service
// user-service is a real upstream serving HTTP/1.1 and gRPC: each prints
// the upstream's answers, and the upstream gets each call once, through
// the sidecar's chain. The page's 127.0.0.1:15001 is the test sidecar's
// outbound address (15001 is replaced by its port). An example runs with
// no proxy variable but those it sets; those marked pod run again with the
// variables the page tells a pod to set.
func TestClientGuide(t *testing.T) {
	text, err := os.ReadFile(clientGuide)
	if err != nil {
		t.Fatal(err)
	}
	g, err := parseGuide(string(text))
	if err != nil {
		t.Fatalf("%s: %v", clientGuide, err)
	}
	var names []string
	for _, ex := range g.examples {
		names = append(names, ex.name)
		if _, ok := guideWants[ex.name]; !ok {
			t.Errorf("%s:%d: example %q has no entry in guideWants", clientGuide, ex.line, ex.name)
		}
	}
	for name := range guideWants {
		if !slices.Contains(names, name) {
			t.Errorf("guideWants has %q, which %s lacks", name, clientGuide)
		}
	}
	if len(g.env) == 0 {
		t.Errorf("%s: no clientguide-env block with the variables for a pod", clientGuide)
	}
	up := startGuideUpstream(t)
	rs := runSidecar(t, "", "--static", "user-service="+up.addr)
	port, ok := strings.CutPrefix(rs.out, "127.0.0.1:")
	if !ok {
		t.Fatalf("the sidecar's outbound address %s is not on 127.0.0.1", rs.out)
	}
	port15001 := strings.NewReplacer("15001", port)
	for _, ex := range g.examples {
		want, ok := guideWants[ex.name]
		if !ok {
			continue
		}
		ex.command = port15001.Replace(ex.command)
		for name, body := range ex.files {
			ex.files[name] = port15001.Replace(body)
		}
		t.Run(ex.name, func(t *testing.T) { runGuideExample(t, up, ex, want, nil) })
		if want.pod {
			var pod []string
			for _, kv := range g.env {
				pod = append(pod, port15001.Replace(kv))
			}
			t.Run(ex.name+" in a pod", func(t *testing.T) { runGuideExample(t, up, ex, want, pod) })
		}
	}
	if n := up.direct.Load(); n != 0 {
		t.Errorf("the upstream got %d calls that did not come through the sidecar", n)
	}
}

// runGuideExample runs ex with the proxy variables extra, and checks what
// it printed and the calls the upstream got.
func runGuideExample(t *testing.T, up *guideUpstream, ex *guideExample, want guideWant, extra []string) {
	env := append(guideEnv(t, want.tools), extra...)
	dir := t.TempDir()
	for name, body := range ex.files {
		putFile(t, filepath.Join(dir, name), body)
		if strings.HasSuffix(name, ".go") {
			guideGoModule(t, dir)
		}
	}
	http0, grpc0 := up.http.Load(), up.grpc.Load()
	start := time.Now()
	out, err := runGuideCommand(dir, env, ex.command)
	t.Logf("%s took %v", ex.name, time.Since(start).Round(time.Millisecond))
	where := fmt.Sprintf("%s:%d (%s)", clientGuide, ex.line, ex.name)
	if want.fails {
		if err == nil {
			t.Fatalf("%s: the command succeeded; want it to fail\n%s", where, out)
		}
	} else if err != nil {
		t.Fatalf("%s: %v\n%s", where, err, out)
	}
	for line := range strings.Lines(ex.output) {
		if line = strings.TrimSpace(line); line != "" && !strings.Contains(out, line) {
			t.Errorf("%s: the output lacks %q, which the guide shows:\n%s", where, line, out)
		}
	}
	if got := strings.Count(out, guideAnswer); got != want.http {
		t.Errorf("%s: printed the upstream's answer %d times, want %d:\n%s", where, got, want.http, out)
	}
	if want.grpc > 0 {
		if got := strings.Count(out, want.grpcOut); got != want.grpc {
			t.Errorf("%s: printed %q %d times, want %d:\n%s", where, want.grpcOut, got, want.grpc, out)
		}
	}
	if h, g := up.http.Load()-http0, up.grpc.Load()-grpc0; h != int64(want.http) || g != int64(want.grpc) {
		t.Errorf("%s: the upstream got %d HTTP and %d gRPC calls through the sidecar, want %d and %d",
			where, h, g, want.http, want.grpc)
	}
}

// guide is what the page holds for the test: its examples, in the page's
// order, and the proxy variables it tells a pod to set.
type guide struct {
	examples []*guideExample
	env      []string // NAME=VALUE
}

// guideExample is one example of the guide: the files it writes and the
// shell command that runs it.
type guideExample struct {
	name    string
	line    int               // where its command starts on the page
	files   map[string]string // name -> text
	command string
	output  string // lines its output must hold, when the page shows them
}

// guideFence matches a fenced block's opening line that the test reads:
// "```LANG clientguide:NAME" (an example's command),
// "```LANG clientguide:NAME/FILE" (a file it writes),
// "```LANG clientguide-output:NAME" (what it prints) or
// "```sh clientguide-env" (export lines of the variables for a pod).
var guideFence = regexp.MustCompile("^```[a-z]* +clientguide(?:(-env)|(-output)?:([a-z0-9-]+)(?:/([A-Za-z0-9_.-]+))?) *$")

// parseGuide reads the page text.
func parseGuide(text string) (*guide, error) {
	g := &guide{}
	byName := map[string]*guideExample{}
	sc := bufio.NewScanner(strings.NewReader(text))
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if !strings.HasPrefix(line, "```") || line == "```" {
			continue
		}
		m := guideFence.FindStringSubmatch(line)
		if m == nil && strings.Contains(line, "clientguide") {
			return nil, fmt.Errorf("line %d: %q: want ```LANG clientguide:NAME[/FILE], clientguide-output:NAME or clientguide-env", n, line)
		}
		start := n
		var body strings.Builder
		closed := false
		for n++; sc.Scan(); n++ {
			if sc.Text() == "```" {
				closed = true
				break
			}
			body.WriteString(sc.Text() + "\n")
		}
		if !closed {
			return nil, fmt.Errorf("line %d: the block never ends", start)
		}
		if m == nil {
			continue
		}
		if m[1] != "" {
			for l := range strings.Lines(body.String()) {
				vars, ok := strings.CutPrefix(strings.TrimSpace(l), "export ")
				if !ok {
					return nil, fmt.Errorf("line %d: %q in the clientguide-env block: want export NAME=VALUE...", start, l)
				}
				g.env = append(g.env, strings.Fields(vars)...)
			}
			continue
		}
		ex := byName[m[3]]
		if ex == nil {
			ex = &guideExample{name: m[3], files: map[string]string{}}
			byName[ex.name] = ex
			g.examples = append(g.examples, ex)
		}
		switch {
		case m[2] != "":
			ex.output = body.String()
		case m[4] != "":
			if _, dup := ex.files[m[4]]; dup {
				return nil, fmt.Errorf("line %d: a second %s for example %s", start, m[4], ex.name)
			}
			ex.files[m[4]] = body.String()
		default:
			if ex.command != "" {
				return nil, fmt.Errorf("line %d: a second command for example %s", start, ex.name)
			}
			ex.command, ex.line = body.String(), start
		}
	}
	for _, ex := range g.examples {
		if ex.command == "" {
			return nil, fmt.Errorf("example %s has files or output but no command block", ex.name)
		}
	}
	return g, sc.Err()
}

// guideEnv is the environment an example runs in: this process's, without
// proxy variables, with the tools found by toolbin first on PATH and the
// Node.js and Go settings they need.
func guideEnv(t *testing.T, tools []string) []string {
	t.Helper()
	bin := t.TempDir()
	var env []string
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		switch strings.ToLower(name) {
		case "http_proxy", "https_proxy", "all_proxy", "no_proxy", "grpc_proxy", "no_grpc_proxy", "path", "node_path":
		default:
			env = append(env, kv)
		}
	}
	for _, tool := range tools {
		var path string
		switch tool {
		case "python3":
			path = guidePython(t)
		case "node-clients":
			env = append(env, "NODE_PATH="+filepath.Join(toolbin.Dir(t, tool), "node_modules"))
			continue
		case "go":
			path = toolbin.Path(t, tool)
			// The example's module is a copy of this one's requirements,
			// all in the module cache.
			env = append(env, "GOWORK=off", "GOPROXY=off", "GOFLAGS=-mod=readonly", "GOTOOLCHAIN=local")
		default:
			path = toolbin.Path(t, tool)
		}
		if err := os.Symlink(path, filepath.Join(bin, tool)); err != nil {
			t.Fatal(err)
		}
	}
	return append(env, "PATH="+bin+string(os.PathListSeparator)+os.Getenv("PATH"))
}

// guidePython returns a python3 that imports requests and grpc: the one on
// PATH, else Debian's, for which scripts/tools.sh installs python3-requests
// and python3-grpcio.
func guidePython(t *testing.T) string {
	t.Helper()
	var err error
	for _, py := range []string{toolbin.Path(t, "python3"), "/usr/bin/python3"} {
		if err = pythonClients(py); err == nil {
			return py
		}
	}
	toolbin.Missing(t, "python3 with requests and grpcio", err, "run scripts/tools.sh test (Debian python3-requests and python3-grpcio)")
	return ""
}

// pythonChecked holds what pythonClients found, by interpreter.
var pythonChecked sync.Map

// pythonClients tells whether python py imports requests and grpc, asking
// it once.
func pythonClients(py string) error {
	type result struct{ err error }
	if r, ok := pythonChecked.Load(py); ok {
		return r.(result).err
	}
	var r result
	if out, err := exec.Command(py, "-c", "import grpc, requests").CombinedOutput(); err != nil {
		r.err = fmt.Errorf("%s: %v: %s", py, err, bytes.TrimSpace(out))
	}
	pythonChecked.Store(py, r)
	return r.err
}

// guideGoModule makes dir a module with this module's requirements, so
// that a Go example builds from the module cache alone.
func guideGoModule(t *testing.T, dir string) {
	t.Helper()
	mod, err := os.ReadFile("../../go.mod")
	if err != nil {
		t.Fatal(err)
	}
	sum, err := os.ReadFile("../../go.sum")
	if err != nil {
		t.Fatal(err)
	}
	first, rest, _ := strings.Cut(string(mod), "\n")
	if !strings.HasPrefix(first, "module ") {
		t.Fatalf("go.mod starts with %q, want its module line", first)
	}
	putFile(t, filepath.Join(dir, "go.mod"), "module example\n"+rest)
	putFile(t, filepath.Join(dir, "go.sum"), string(sum))
}

// runGuideCommand runs an example's command with bash in dir and returns
// what it printed, stdout and stderr together.
func runGuideCommand(dir string, env []string, command string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", "-e", "-u", "-o", "pipefail", "-c", command)
	cmd.Dir, cmd.Env = dir, env
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		err = errors.Join(err, ctx.Err())
	}
	return string(out), err
}

// putFile writes text to path.
func putFile(t *testing.T, path, text string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
}

// guideUpstream is user-service: HTTP/1.1 and h2c on one port, GET
// /users/1 and gRPC's health and reflection services. It counts the calls
// that came through the sidecar (they carry its hop marker) and those
// that did not.
type guideUpstream struct {
	addr               string
	http, grpc, direct atomic.Int64
}

func startGuideUpstream(t *testing.T) *guideUpstream {
	t.Helper()
	up := &guideUpstream{}
	gs := grpc.NewServer()
	healthpb.RegisterHealthServer(gs, &guideHealth{HealthServer: health.NewServer(), up: up})
	reflection.Register(gs)
	mux := http.NewServeMux()
	mux.HandleFunc("GET /users/1", func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get(forward.HopHeader) == "" {
			up.direct.Add(1)
		} else {
			up.http.Add(1)
		}
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, guideAnswer)
	})
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.ProtoMajor == 2 && strings.HasPrefix(r.Header.Get("Content-Type"), "application/grpc") {
				gs.ServeHTTP(w, r)
				return
			}
			mux.ServeHTTP(w, r)
		}),
		Protocols:         new(http.Protocols),
		ReadHeaderTimeout: 10 * time.Second,
	}
	srv.Protocols.SetHTTP1(true)
	srv.Protocols.SetUnencryptedHTTP2(true)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	up.addr = ln.Addr().String()
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Serve(ln)
	}()
	t.Cleanup(func() {
		srv.Close()
		gs.Stop()
		<-done
	})
	return up
}

// guideHealth counts the health checks of the guide's upstream.
type guideHealth struct {
	healthpb.HealthServer
	up *guideUpstream
}

func (h *guideHealth) Check(ctx context.Context, in *healthpb.HealthCheckRequest) (*healthpb.HealthCheckResponse, error) {
	if md, _ := metadata.FromIncomingContext(ctx); len(md.Get(forward.HopHeader)) > 0 {
		h.up.grpc.Add(1)
	} else {
		h.up.direct.Add(1)
	}
	return h.HealthServer.Check(ctx, in)
}
