package main

import (
	"bytes"
	"context"
	"debug/buildinfo"
	"debug/elf"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spf13/pflag"
	"go.uber.org/goleak"

	"github.com/sidecar-mesh/sidecar/internal/freeport"
	"github.com/sidecar-mesh/sidecar/internal/logtest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// cli runs the sidecar command in-process with env as its environment.
func cli(t *testing.T, ctx context.Context, env map[string]string, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	var out, errb bytes.Buffer
	cmd := newRootCommand(strings.NewReader(""), &out, &errb, func(k string) string { return env[k] })
	cmd.SetArgs(args)
	err = cmd.ExecuteContext(ctx)
	return out.String(), errb.String(), err
}

// freePort is a free loopback address for a listener the test starts
// later, from below the ephemeral range: a port that listening on port 0
// gives can be taken as the source port of any outgoing connection (of
// this test or of another package's, run at the same time) before the
// listener binds it.
func freePort(t testing.TB) string {
	t.Helper()
	ports, err := freeport.Stable(1, false)
	if err != nil {
		t.Fatal(err)
	}
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[0]))
}

func TestVersion(t *testing.T) {
	out, _, err := cli(t, context.Background(), nil, "version", "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	var b buildInfo
	if err := json.Unmarshal([]byte(out), &b); err != nil || b.Version == "" || b.Commit == "" || !strings.HasPrefix(b.Go, "go1.") {
		t.Fatalf("version -o json = %q (%v)", out, err)
	}
	out, _, _ = cli(t, context.Background(), nil, "version")
	if !strings.Contains(out, "sidecar ") || !strings.Contains(out, "commit: ") || !strings.Contains(out, "go: go1.") {
		t.Fatalf("version = %q", out)
	}
}

// Every setting is documented in --help with its flag, its key and its
// environment variable.
func TestRunHelpNamesEverySetting(t *testing.T) {
	out, _, err := cli(t, context.Background(), nil, "run", "--help")
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range settings {
		want := []string{"--" + s.flag, s.envName()}
		if s.key != "" {
			want = append(want, "key "+s.key)
		}
		for _, want := range want {
			if !strings.Contains(out, want) {
				t.Errorf("run --help lacks %q for setting %s", want, s.flag)
			}
		}
	}
	if !strings.Contains(out, "--config") {
		t.Error("run --help lacks --config")
	}
}

// Flags beat the environment, which beats the config file.
func TestPrecedence(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "sidecar.yaml")
	os.WriteFile(file, []byte("service: from-file\nappPort: 1111\nlisteners: {admin: 127.0.0.1:1}\nallowHosts: [file.example]\n"), 0o600)
	o := newRunOptions(io.Discard, io.Discard, func(k string) string {
		return map[string]string{
			"SIDECAR_CONFIG":     file,
			"SIDECAR_SERVICE":    "from-env",
			"SIDECAR_APP_PORT":   "2222",
			"SIDECAR_STATIC":     "a=127.0.0.1:1,127.0.0.1:2;b=127.0.0.1:3",
			"SIDECAR_ALLOW_HOST": "x.example,y.example",
			"CONSUL_HTTP_ADDR":   "127.0.0.1:8500",
		}[k]
	})
	fs := pflag.NewFlagSet("run", pflag.ContinueOnError)
	o.addFlags(fs)
	if err := fs.Parse([]string{"--app-port", "3333", "--static", "b=127.0.0.1:4"}); err != nil {
		t.Fatal(err)
	}
	if err := o.complete(); err != nil {
		t.Fatal(err)
	}
	c := o.cfg
	if c.Service != "from-env" || c.AppPort != 3333 || c.Listeners.Admin != "127.0.0.1:1" || c.Listeners.Outbound != "127.0.0.1:15001" {
		t.Fatalf("service %q appPort %d admin %q outbound %q; want from-env, 3333 (flag), 127.0.0.1:1 (file), the default",
			c.Service, c.AppPort, c.Listeners.Admin, c.Listeners.Outbound)
	}
	// The flag's entries replace the environment's.
	if got := c.Discovery.Static; len(got) != 1 || len(got["b"]) != 1 || got["b"][0] != "127.0.0.1:4" {
		t.Fatalf("static = %v; want only b=127.0.0.1:4 from the flag", got)
	}
	if strings.Join(c.AllowHosts, ",") != "x.example,y.example" {
		t.Fatalf("allowHosts = %v; want the environment's list replacing the file's", c.AllowHosts)
	}
	if c.Discovery.Consul == nil || c.Discovery.Consul.Address != "127.0.0.1:8500" {
		t.Fatalf("consul = %+v; want CONSUL_HTTP_ADDR", c.Discovery.Consul)
	}
}

// The switches of sidecar run take no value when written alone, as the
// docs write them and as sidecar inject's do: --access-log then the next
// flag is access log on and that flag, not a value swallowed.
func TestSwitchesStandAlone(t *testing.T) {
	o := newRunOptions(io.Discard, io.Discard, func(string) string { return "" })
	fs := pflag.NewFlagSet("run", pflag.ContinueOnError)
	o.addFlags(fs)
	if err := fs.Parse([]string{"--access-log", "--outbound-addr", "127.0.0.1:17001", "--request-metrics=false", "--transparent"}); err != nil {
		t.Fatal(err)
	}
	if err := o.complete(); err != nil {
		t.Fatal(err)
	}
	c := o.cfg
	if !c.AccessLog.Enabled || c.Listeners.Outbound != "127.0.0.1:17001" || *c.RequestMetrics || !c.Transparent.Enabled {
		t.Fatalf("access log %v, outbound %q, request metrics %v, transparent %v; want true, 127.0.0.1:17001, false, true",
			c.AccessLog.Enabled, c.Listeners.Outbound, *c.RequestMetrics, c.Transparent.Enabled)
	}
	// The value after a space is an argument, and run says how to write it.
	cmd := newRootCommand(strings.NewReader(""), io.Discard, io.Discard, func(string) string { return "" })
	cmd.SetArgs([]string{"run", "--request-metrics", "false"})
	if err := cmd.Execute(); err == nil || !strings.Contains(err.Error(), "--request-metrics=false") {
		t.Fatalf("run --request-metrics false: %v, want an error saying --request-metrics=false", err)
	}
}

// A drain window of 0s is none, as written (a Job's sidecar that should
// exit at once), in the file and as a flag; unset, it is 5s.
func TestDrainWindowZeroIsNone(t *testing.T) {
	file := filepath.Join(t.TempDir(), "sidecar.yaml")
	os.WriteFile(file, []byte("lifecycle: {drainWindow: 0s}\n"), 0o600)
	for _, tc := range []struct {
		name string
		args []string
		want time.Duration
	}{
		{"unset", nil, 5 * time.Second},
		{"flag", []string{"--drain-window", "0s"}, 0},
		{"file", []string{"--config", file}, 0},
		{"flag over file", []string{"--config", file, "--drain-window", "2s"}, 2 * time.Second},
	} {
		o := newRunOptions(io.Discard, io.Discard, func(string) string { return "" })
		fs := pflag.NewFlagSet("run", pflag.ContinueOnError)
		o.addFlags(fs)
		if err := fs.Parse(tc.args); err != nil {
			t.Fatal(err)
		}
		if err := o.complete(); err != nil {
			t.Fatal(err)
		}
		if got := o.cfg.Lifecycle.Drain(); got != tc.want {
			t.Errorf("%s: drain window %v, want %v", tc.name, got, tc.want)
		}
	}
}

func TestStartupErrors(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(bad, []byte("service: a\nlisteners:\n  outbund: 127.0.0.1:1\n"), 0o600)
	badPolicy := filepath.Join(dir, "policies.yaml")
	os.WriteFile(badPolicy, []byte("service: users\nretry: {attempts: 0}\n"), 0o600)
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	cases := []struct {
		name string
		args []string
		want string
	}{
		{"unknown key", []string{"run", "--config", bad}, bad + `:3: unknown key "listeners.outbund"`},
		{"missing file", []string{"run", "--config", filepath.Join(dir, "nope.yaml")}, "no such file"},
		{"bad flag value", []string{"run", "--app-port", "http"}, `--app-port: want a port number, got "http"`},
		{"invalid value", []string{"run", "--outbound-addr", "nowhere"}, `listeners.outbound: "nowhere": want host:port`},
		{"port in use", []string{"run", "--outbound-addr", taken.Addr().String(), "--admin-addr", freePort(t)}, taken.Addr().String() + " is already in use"},
		{"unknown flag", []string{"run", "--outbound", "x"}, "unknown flag: --outbound"},
		{"invalid policy file", []string{"run", "--policy-file", badPolicy}, badPolicy + ":1: document 1: retry.attempts: 0 is not allowed (allowed: 1 to 10)"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_, _, err := cli(t, ctx, nil, tc.args...)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("sidecar %v: error %v; want it to contain %q", tc.args, err, tc.want)
			}
		})
	}
}

// `sidecar run` without a config file knows no services (the demo's
// user-service is `sidecar demo`'s only), serves on its default listeners
// (here moved by flags), and says once why it knows none; services given by
// flags or the environment are served, and the line says where they come
// from.
func TestRunWithoutConfig(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "up") }))
	defer up.Close()
	for _, tc := range []struct {
		name    string
		args    []string
		status  int    // of a call to user-service
		logLine string // in the one line about the missing file
	}{
		{"nothing", nil, http.StatusServiceUnavailable, `"level":"WARN","msg":"no config file (--config, SIDECAR_CONFIG): no services are known until one is given, or --static, or a Consul address (--consul-addr, CONSUL_HTTP_ADDR)"`},
		{"static from a flag", []string{"--static", "user-service=" + up.Listener.Addr().String()}, http.StatusOK, `"level":"INFO","msg":"no config file (--config, SIDECAR_CONFIG): services from flags and the environment only","static":1`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, adm := freePort(t), freePort(t)
			var stderr logtest.Buffer
			runInProcess(t, io.Discard, &stderr, append([]string{"run", "--outbound-addr", out, "--admin-addr", adm,
				"--metrics-addr", freePort(t), "--health-addr", freePort(t), "--drain-window", "1ms"}, tc.args...)...)
			client := &http.Client{Timeout: 5 * time.Second}
			var resp *http.Response
			for deadline := time.Now().Add(10 * time.Second); ; {
				req, _ := http.NewRequest("GET", "http://"+out+"/users/1", nil)
				req.Host = "user-service"
				var err error
				if resp, err = client.Do(req); err == nil {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("run: not serving after 10s: %v", err)
				}
				time.Sleep(20 * time.Millisecond) // polling for startup, not on a request path
			}
			resp.Body.Close()
			if resp.StatusCode != tc.status {
				t.Errorf("GET user-service: %s (%s), want %d", resp.Status, resp.Header.Get("X-Sidecar-Error"), tc.status)
			}
			eps := fetch(t, "http://"+adm+"/endpoints")
			if known := strings.Contains(eps, `"user-service"`); known != (tc.status == http.StatusOK) {
				t.Errorf("admin /endpoints = %s: user-service known %v, want %v", eps, known, !known)
			}
			if n := strings.Count(stderr.String(), "no config file"); n != 1 || !strings.Contains(stderr.String(), tc.logLine) {
				t.Errorf("run's log says %d times that there is no config file, want once, as %s:\n%s", n, tc.logLine, stderr.String())
			}
		})
	}
}

// A probe with its own port runs without --app-port: what `sidecar inject`
// makes of a container that declares no port (Kubernetes' http-liveness
// example) is a sidecar that starts and probes that port.
func TestProbeOwnPortWithoutAppPort(t *testing.T) {
	var probes atomic.Int32
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/healthz" {
			probes.Add(1)
		}
	}))
	defer app.Close()
	_, port, _ := net.SplitHostPort(app.Listener.Addr().String())
	health := freePort(t)
	runInProcess(t, io.Discard, io.Discard, "run", "--liveness-probe=http:/healthz,port="+port+",interval=1s,timeout=1s,failureThreshold=1,successThreshold=1",
		"--outbound-addr", freePort(t), "--admin-addr", freePort(t), "--metrics-addr", freePort(t), "--health-addr", health, "--drain-window", "1ms")
	var status int
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) { // polling for startup
		if resp, err := http.Get("http://" + health + "/app-health/livez"); err == nil {
			resp.Body.Close()
			if status = resp.StatusCode; status == http.StatusOK {
				break
			}
		}
	}
	if status != http.StatusOK || probes.Load() == 0 {
		t.Fatalf("/app-health/livez: %d after %d probes of the app's /healthz; want 200 after at least one", status, probes.Load())
	}
}

// runInProcess runs the sidecar command with args in-process, writing to
// stdout and stderr, until the test ends.
func runInProcess(t *testing.T, stdout, stderr io.Writer, args ...string) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		cmd := newRootCommand(strings.NewReader(""), stdout, stderr, func(string) string { return "" })
		cmd.SetArgs(args)
		done <- cmd.ExecuteContext(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("sidecar %s exited with %v", args[0], err)
		}
	})
}

// `sidecar demo` serves the quick start end to end: example upstreams, the
// outbound proxy on its flags' addresses, and the admin API.
func TestDemo(t *testing.T) {
	out, adm, metrics := freePort(t), freePort(t), freePort(t)
	var stdout, stderr logtest.Buffer
	runInProcess(t, &stdout, &stderr, "demo", "--outbound-addr", out, "--admin-addr", adm, "--metrics-addr", metrics,
		"--health-addr", freePort(t), "--drain-window", "1ms")
	client := &http.Client{Timeout: 5 * time.Second}
	var seen = map[string]bool{}
	deadline := time.Now().Add(10 * time.Second)
	for len(seen) < 2 && time.Now().Before(deadline) {
		req, _ := http.NewRequest("GET", "http://"+out+"/users/1", nil)
		req.Host = "user-service"
		resp, err := client.Do(req)
		if err != nil {
			time.Sleep(50 * time.Millisecond) // not listening yet
			continue
		}
		var body struct{ Instance string }
		json.NewDecoder(resp.Body).Decode(&body)
		resp.Body.Close()
		seen[body.Instance] = true
	}
	if !seen["user-service-1"] || !seen["user-service-2"] {
		t.Fatalf("demo: instances seen %v, want both example upstreams", seen)
	}
	resp, err := client.Get("http://" + adm + "/endpoints")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if !strings.Contains(string(b), `"user-service"`) || !strings.Contains(string(b), "127.0.0.1:9002") {
		t.Fatalf("admin /endpoints = %s", b)
	}
	mresp, err := client.Get("http://" + metrics + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer mresp.Body.Close()
	mb, _ := io.ReadAll(mresp.Body)
	for _, want := range []string{`sidecar_discovery_endpoints{service="user-service",source="static"} 3`, "process_resident_memory_bytes", "go_goroutines"} {
		if !strings.Contains(string(mb), want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	if !strings.Contains(stdout.String(), "user-service has three instances, on 127.0.0.1:9001, 127.0.0.1:9002, 127.0.0.1:9003;") ||
		!strings.Contains(stdout.String(), "curl -x http://"+out) {
		t.Fatalf("demo did not print its instances and the curl commands:\n%s", stdout.String())
	}
	if strings.Contains(stderr.String(), "no config file") {
		t.Errorf("demo logged that it has no config file; it has the demo's:\n%s", stderr.String())
	}
}

// The binaries built the Dockerfile's way are static, and the per-pod one
// (/out/sidecar) links none of Kubernetes' API packages, which only the
// injector's commands need.
func TestDockerfileBuildIsStatic(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	df, err := os.ReadFile("../../Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	builds := regexp.MustCompile(`(?m)^RUN (CGO_ENABLED=0 go build .*) -o /out/(sidecar|sidecar-injector) (\./cmd/sidecar)$`).FindAllSubmatch(df, -1)
	if len(builds) != 2 {
		t.Fatalf("Dockerfile has %d `RUN CGO_ENABLED=0 go build ... -o /out/NAME ./cmd/sidecar` lines, want 2 (sidecar, sidecar-injector)", len(builds))
	}
	for _, m := range builds {
		name := string(m[2])
		bin := filepath.Join(t.TempDir(), name)
		line := strings.NewReplacer("${VERSION}", "test", "${COMMIT}", "test").Replace(string(m[1]))
		cmd := exec.Command("sh", "-c", line+" -o "+bin+" "+string(m[3]))
		cmd.Dir = "../.."
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%s: %v\n%s", line, err, out)
		}
		f, err := elf.Open(bin)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range f.Progs {
			if p.Type == elf.PT_INTERP || p.Type == elf.PT_DYNAMIC {
				t.Fatalf("%s built as the Dockerfile does has program header %v: not static", name, p.Type)
			}
		}
		if libs, _ := f.ImportedLibraries(); len(libs) > 0 {
			t.Fatalf("%s needs shared libraries %v", name, libs)
		}
		f.Close()
		info, err := buildinfo.ReadFile(bin)
		if err != nil {
			t.Fatal(err)
		}
		kube := 0
		for _, d := range info.Deps {
			if strings.HasPrefix(d.Path, "k8s.io/") {
				kube++
			}
		}
		if name == "sidecar" && kube > 0 {
			t.Errorf("the per-pod sidecar links %d Kubernetes modules; built with -tags noinjector it should link none", kube)
		}
		if name == "sidecar-injector" && kube == 0 {
			t.Errorf("sidecar-injector links no Kubernetes module: inject and webhook are missing")
		}
	}
}
