//go:build !noinjector

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/spf13/pflag"
	corev1 "k8s.io/api/core/v1"
	k8syaml "k8s.io/apimachinery/pkg/util/yaml"
	sigsyaml "sigs.k8s.io/yaml"

	"github.com/sidecar-mesh/sidecar/internal/kubetest"
	"github.com/sidecar-mesh/sidecar/pkg/inject"
	"github.com/sidecar-mesh/sidecar/pkg/readlimit"
)

var updateK8s = flag.Bool("update-k8s", false, "rewrite the generated files in k8s/ (demo/app.yaml, grafana-dashboard.yaml)")

// injectCLI runs the sidecar command in-process with stdin.
func injectCLI(t *testing.T, stdin string, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	var out, errb bytes.Buffer
	cmd := newRootCommand(strings.NewReader(stdin), &out, &errb, func(string) string { return "" })
	cmd.SetArgs(args)
	err = cmd.ExecuteContext(context.Background())
	return out.String(), errb.String(), err
}

const cliPod = `apiVersion: v1
kind: Pod
metadata:
  name: web
  labels: {app: web}
spec:
  containers:
  - name: web
    image: example.com/web:1
    ports: [{containerPort: 8080}]
    readinessProbe:
      httpGet: {path: /ready, port: 8080}
    livenessProbe:
      exec: {command: [/bin/true]}
`

func TestInjectCommand(t *testing.T) {
	// From standard input, with flags: the flags reach the container.
	out, errOut, err := injectCLI(t, cliPod, "inject", "-f", "-", "--image=reg.example.com/sidecar:9", "--sidecar-log-level=debug",
		"--drain-window=12s", "--consul-addr=$(HOST_IP):8500", "--http-proxy", "--no-proxy-extra=10.96.0.0/12,.corp.example", "--sidecar-env=OTEL_SERVICE_NAME=web",
		"--cpu-limit=1", "--memory-limit=none", "--image-pull-policy=Always")
	if err != nil {
		t.Fatalf("inject -f -: %v (stderr %q)", err, errOut)
	}
	for _, want := range []string{
		"  initContainers:\n  - name: sidecar\n    image: reg.example.com/sidecar:9\n",
		"    - --app-port=8080\n    - --service=web\n    - --consul-addr=$(HOST_IP):8500\n    - --readiness-probe=http:/ready,interval=10s,timeout=1s,failureThreshold=3,successThreshold=1\n    - --drain-window=12s\n    - --log-level=debug\n",
		"      httpGet: {path: /app-health/readyz, port: 15020}\n",
		"    - name: OTEL_SERVICE_NAME\n      value: web\n",
		"      limits:\n        cpu: \"1\"\n",
		"    - name: GOMAXPROCS\n      valueFrom:\n        resourceFieldRef:\n          resource: limits.cpu\n          divisor: \"1\"\n",
		"    imagePullPolicy: Always\n",
		"    - name: HTTP_PROXY\n      value: http://127.0.0.1:15001\n",
		"    - name: no_proxy\n      value: localhost,127.0.0.1,::1,$(SIDECAR_POD_IPS),.svc,.svc.cluster.local,10.96.0.0/12,.corp.example\n",
		"  terminationGracePeriodSeconds: 42\n",
		`sidecar.mesh/status: '{"version":"` + version + `","mode":"native","hash":"`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("inject output lacks\n%s\ngot:\n%s", want, out)
		}
	}
	if strings.Contains(out, "GOMEMLIMIT") {
		t.Errorf("--memory-limit=none: got GOMEMLIMIT in the output, want none (no limit to follow)")
	}
	// The exec probe stays with the kubelet, and stderr says so once.
	if n := strings.Count(errOut, "warning: "); n != 1 || !strings.Contains(errOut, `<stdin>: document 1 (line 1, Pod web): warning: container "web": liveness probe left to the kubelet: exec probes run in the app's container`) {
		t.Errorf("stderr: got %q, want one warning about the exec liveness probe", errOut)
	}

	// Injecting the output again gives the same bytes; -v says why.
	again, errAgain, err := injectCLI(t, out, "inject", "-f", "-", "-v")
	if err != nil || again != out {
		t.Fatalf("inject of injected output: err %v, changed: %v\n%s", err, again != out, again)
	}
	if !strings.Contains(errAgain, "not injected: already injected") {
		t.Errorf("inject -v of injected output: stderr %q, want it to say already injected", errAgain)
	}

	// --classic: a regular container, first.
	out, _, err = injectCLI(t, cliPod, "inject", "-f", "-", "--classic")
	if err != nil || !strings.Contains(out, "  containers:\n  - name: sidecar\n") || strings.Contains(out, "initContainers") ||
		!strings.Contains(out, "kubectl.kubernetes.io/default-container: web") {
		t.Errorf("inject --classic: err %v, want the sidecar first in containers and web the default container:\n%s", err, out)
	}

	// Several files, in order, separated once.
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a.yaml"), filepath.Join(dir, "b.yaml")
	if err := os.WriteFile(a, []byte("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(b, []byte("---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: b}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	out, _, err = injectCLI(t, "", "inject", "-f", a, "-f", b)
	if want := "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: b}\n"; err != nil || out != want {
		t.Errorf("inject -f a -f b: got %q (%v), want %q", out, err, want)
	}
}

// TestInjectCommandInputs: manifests are read as kubectl apply reads them:
// -f or positional arguments, several of them, in order; a directory's
// .json, .yaml and .yml files in name order (not its subdirectories nor
// other files); - for standard input, once.
func TestInjectCommandInputs(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		t.Helper()
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	cm := func(name string) string { return "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: " + name + "}\n" }
	one := write("one.yaml", cm("one"))
	manifests := filepath.Join(dir, "manifests")
	write("manifests/b.yaml", cm("b"))
	write("manifests/a.yml", "---\n"+cm("a"))
	write("manifests/c.json", `{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}`+"\n")
	write("manifests/notes.txt", "not a manifest\n")
	write("manifests/README.md", "# not a manifest\n")
	write("manifests/sub/d.yaml", cm("d"))
	write("manifests/pod.yaml", cliPod)
	empty := filepath.Join(dir, "empty")
	write("empty/notes.txt", "nothing here\n")

	// names lists the metadata names in the output, in order, read as
	// kubectl apply -f - reads a stream.
	names := func(out string) []string {
		dec := k8syaml.NewYAMLOrJSONDecoder(strings.NewReader(out), 4096)
		var got []string
		for {
			var m struct{ Metadata struct{ Name string } }
			err := dec.Decode(&m)
			if err == io.EOF {
				return got
			}
			if err != nil {
				t.Fatalf("output is not a stream kubectl reads: %v\n%s", err, out)
			}
			got = append(got, m.Metadata.Name)
		}
	}
	for _, tc := range []struct {
		name  string
		stdin string
		args  []string
		want  []string
	}{
		{"positional file", "", []string{"inject", one}, []string{"one"}},
		{"directory", "", []string{"inject", "-f", manifests}, []string{"a", "b", "c", "web"}},
		{"directory with a slash, positional", "", []string{"inject", manifests + "/"}, []string{"a", "b", "c", "web"}},
		{"several, -f first, then arguments", cm("in"), []string{"inject", manifests, "-", "-f", one}, []string{"one", "a", "b", "c", "web", "in"}},
		{"positional stdin", cm("in"), []string{"inject", "-"}, []string{"in"}},
		{"JSON first", "", []string{"inject", filepath.Join(manifests, "c.json"), one}, []string{"c", "one"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, errOut, err := injectCLI(t, tc.stdin, tc.args...)
			if err != nil {
				t.Fatalf("sidecar %s: %v (stderr %q)", strings.Join(tc.args, " "), err, errOut)
			}
			if got := names(out); !slices.Equal(got, tc.want) {
				t.Errorf("sidecar %s: objects %q, want %q:\n%s", strings.Join(tc.args, " "), got, tc.want, out)
			}
			if web := strings.Count(out, "- name: sidecar\n"); slices.Contains(tc.want, "web") != (web == 1) {
				t.Errorf("sidecar %s: %d sidecars injected, want 1 in pod web", strings.Join(tc.args, " "), web)
			}
		})
	}
	// A directory's file is named in what is said about it.
	_, errOut, err := injectCLI(t, "", "inject", manifests)
	if want := filepath.Join(manifests, "pod.yaml") + ": document 1 (line 1, Pod web): warning: "; err != nil || !strings.Contains(errOut, want) {
		t.Errorf("inject DIR: %v, stderr %q; want the warning to name %q", err, errOut, want)
	}

	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"stdin twice", []string{"inject", "-", "-f", "-"}, "standard input can be read once"},
		{"no manifests in the directory", []string{"inject", "-f", empty}, empty + ": no .json, .yaml or .yml files in the directory"},
		{"a missing file among others", []string{"inject", one, filepath.Join(dir, "nope.yaml")}, "no such file or directory"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, _, err := injectCLI(t, "", tc.args...)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("sidecar %s: got error %v, want one containing %q", strings.Join(tc.args, " "), err, tc.want)
			}
			if out != "" {
				t.Errorf("sidecar %s: wrote %q despite the error, want nothing", strings.Join(tc.args, " "), out)
			}
		})
	}
}

// TestInjectCommandTotalCap: each input is read up to readlimit.Max, and
// all of them together too; an input past what is left is refused before
// it is read, and nothing is written.
func TestInjectCommandTotalCap(t *testing.T) {
	dir := t.TempDir()
	// Sparse files: their size counts, their bytes are never read.
	big := func(name string, size int64) string {
		p := filepath.Join(dir, name)
		f, err := os.Create(p)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if err := f.Truncate(size); err != nil {
			t.Fatal(err)
		}
		return p
	}
	half := big("half.yaml", readlimit.Max/2+1)
	other := big("other.yaml", readlimit.Max/2+1)
	out, _, err := injectCLI(t, "", "inject", half, other)
	if want := other + ": with the inputs before it, more than 64 MiB"; err == nil || !strings.Contains(err.Error(), want) || out != "" {
		t.Fatalf("inject of two files of 32 MiB + 1 byte: got %v, stdout %d bytes; want an error containing %q and nothing written", err, len(out), want)
	}
	tooBig := big("big.yaml", readlimit.Max+1)
	if _, _, err := injectCLI(t, "", "inject", tooBig); !readlimit.IsTooLarge(err) {
		t.Fatalf("inject of a file of 64 MiB + 1 byte: got %v, want readlimit's error", err)
	}

	// Standard input counts against what is left, read no further than
	// that (here with a small cap).
	small := filepath.Join(dir, "small.yaml")
	if err := os.WriteFile(small, []byte("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: s}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	stdin := &countingReader{r: strings.NewReader(strings.Repeat("# padding\n", 1000))}
	o := &injectOptions{files: []string{small, "-"}, stdin: stdin, stdout: io.Discard, stderr: io.Discard, maxTotal: 200}
	o.flags.addFlags(pflag.NewFlagSet("inject", pflag.ContinueOnError)) // the defaults
	if err := o.complete(nil); err != nil {
		t.Fatal(err)
	}
	err = o.run()
	if want := "<stdin>: with the inputs before it, more than 200 bytes"; err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("inject of a small file and a long stdin, total cap 200: got %v, want %q", err, want)
	}
	if n := stdin.n; n > 200 {
		t.Errorf("read %d bytes of standard input, want at most what was left of the 200", n)
	}
}

type countingReader struct {
	r io.Reader
	n int
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += n
	return n, err
}

func TestInjectCommandErrors(t *testing.T) {
	bad := strings.Replace(cliPod, "metadata:\n  name: web\n", "metadata:\n  name: web\n  annotations: {sidecar.mesh/drain-window: soon}\n", 1)
	for _, tc := range []struct {
		name  string
		stdin string
		args  []string
		want  string
	}{
		{"no input", "", []string{"inject"}, "no manifests: name files or directories, with -f or as arguments, or - for standard input"},
		{"stdin twice", "", []string{"inject", "-f", "-", "-f", "-"}, "standard input can be read once"},
		{"missing file", "", []string{"inject", "-f", "/nonexistent/x.yaml"}, "no such file or directory"},
		{"bad quantity", cliPod, []string{"inject", "-f", "-", "--cpu-request=lots"}, `--cpu-request: "lots" is not a positive quantity`},
		{"bad env", cliPod, []string{"inject", "-f", "-", "--sidecar-env=NOVALUE"}, `--sidecar-env: "NOVALUE": want NAME=VALUE`},
		{"bad no-proxy entry", cliPod, []string{"inject", "-f", "-", "--http-proxy", "--no-proxy-extra=*"}, `no-proxy extra: "*" would send nothing through the sidecar`},
		{"bad pull policy", cliPod, []string{"inject", "-f", "-", "--image-pull-policy=Sometimes"}, `image pull policy: "Sometimes"`},
		{"bad annotation", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: ok}\n---\n" + bad, []string{"inject", "-f", "-"},
			`<stdin>: document 2 (line 5, Pod web): metadata.annotations[sidecar.mesh/drain-window]: invalid duration "soon"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, _, err := injectCLI(t, tc.stdin, tc.args...)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("sidecar %s: got error %v, want one containing %q", strings.Join(tc.args, " "), err, tc.want)
			}
			if out != "" {
				t.Errorf("sidecar %s: wrote %q to stdout despite the error, want nothing", strings.Join(tc.args, " "), out)
			}
		})
	}
}

// TestInjectCommandMesh: a pod with the mesh annotation gets a sidecar in
// the mesh that `sidecar run` accepts, with the mesh's port declared and
// the probes still on the health port; injecting twice is injecting once;
// without a Consul address to pass, the pod is refused with the
// annotations named.
func TestInjectCommandMesh(t *testing.T) {
	pod := strings.Replace(cliPod, "metadata:\n  name: web\n",
		"metadata:\n  name: web\n  annotations: {sidecar.mesh/mesh: consul-connect, sidecar.mesh/mesh-plaintext-inbound: allow}\n", 1)
	out, errOut, err := injectCLI(t, pod, "inject", "-f", "-", "--consul-addr=$(HOST_IP):8500")
	if err != nil {
		t.Fatalf("inject -f - --consul-addr=$(HOST_IP):8500: %v (stderr %q)", err, errOut)
	}
	for _, want := range []string{
		"    - --consul-addr=$(HOST_IP):8500\n    - --mesh=consul-connect\n    - --mesh-plaintext-inbound=allow\n",
		"    - name: sidecar-mtls\n      containerPort: 15008\n      protocol: TCP\n",
		"      httpGet: {path: /app-health/readyz, port: 15020}\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("inject output lacks\n%s\ngot:\n%s", want, out)
		}
	}
	objs, err := kubetest.Objects([]byte(out))
	if err != nil {
		t.Fatal(err)
	}
	args := sidecarArgs(t, objs[0])
	if len(args) != 1 {
		t.Fatalf("found %d sidecars in the output, want 1", len(args))
	}
	var flags []string
	for _, a := range args[0][1:] {
		flags = append(flags, kubeletExpand.Replace(a))
	}
	o := newRunOptions(io.Discard, io.Discard, func(string) string { return "" })
	fs := pflag.NewFlagSet("run", pflag.ContinueOnError)
	o.addFlags(fs)
	if err := fs.Parse(flags); err != nil {
		t.Fatalf("sidecar run %q: %v", flags, err)
	}
	if err := o.complete(); err != nil {
		t.Fatalf("sidecar run %q: %v", flags, err)
	}
	if err := o.validate(); err != nil || !o.cfg.Mesh.On() || o.cfg.Mesh.DenyPlaintext() || o.cfg.Mesh.InboundTLSAddr() != "0.0.0.0:15008" {
		t.Errorf("sidecar run %q: %v, mesh %+v; want it valid, in the mesh, plaintext allowed, mutual TLS on 0.0.0.0:15008", flags, err, o.cfg.Mesh)
	}

	again, _, err := injectCLI(t, out, "inject", "-f", "-", "--consul-addr=$(HOST_IP):8500")
	if err != nil || again != out {
		t.Errorf("inject of injected output: err %v, changed: %v\n%s", err, again != out, again)
	}

	out, _, err = injectCLI(t, pod, "inject", "-f", "-")
	for _, want := range []string{
		"<stdin>: document 1 (line 1, Pod web): metadata.annotations[sidecar.mesh/mesh]: consul-connect needs the Consul agent's address",
		"set sidecar.mesh/consul-addr", "--consul-addr",
	} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("inject of a mesh pod with no Consul address: got %v, want an error containing %q", err, want)
		}
	}
	if out != "" {
		t.Errorf("inject of a mesh pod with no Consul address: wrote %q, want nothing", out)
	}
}

// demoInjectArgs is how k8s/demo/app.yaml is made from its source.
var demoInjectArgs = []string{"inject", "-f", "../../k8s/demo/source/app.yaml", "--image=sidecar:dev",
	"--sidecar-env=OTEL_EXPORTER_OTLP_ENDPOINT=http://jaeger.sidecar-demo.svc:4317"}

const demoHeader = `# GENERATED by: sidecar inject -f k8s/demo/source/app.yaml --image=sidecar:dev \
#   --sidecar-env=OTEL_EXPORTER_OTLP_ENDPOINT=http://jaeger.sidecar-demo.svc:4317
# Do not edit: edit source/app.yaml, then
#   go test ./cmd/sidecar -run TestDemoAppInjected -update-k8s
`

// TestDemoAppInjected keeps the demo's injected app equal to what `sidecar
// inject` makes of its source.
func TestDemoAppInjected(t *testing.T) {
	if version != "dev" {
		t.Skipf("built with version %q; the demo is generated with dev", version)
	}
	out, errOut, err := injectCLI(t, "", demoInjectArgs...)
	if err != nil || errOut != "" {
		t.Fatalf("sidecar %s: %v, stderr %q", strings.Join(demoInjectArgs, " "), err, errOut)
	}
	got := demoHeader + out
	path := "../../k8s/demo/app.yaml"
	if *updateK8s {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if got != string(want) {
		t.Fatalf("k8s/demo/app.yaml is not what inject makes of k8s/demo/source/app.yaml; rerun with -update-k8s")
	}
	if n := strings.Count(got, "- name: sidecar\n"); n != 2 {
		t.Errorf("k8s/demo/app.yaml: %d sidecars, want 2 (frontend and backend)", n)
	}
}

// TestHooks drives the classic sidecar's lifecycle hooks against fake
// health and admin endpoints.
func TestHooks(t *testing.T) {
	var ready atomic.Bool
	var healthCalls, drains atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.Method == http.MethodGet && r.URL.Path == "/healthz/sidecar":
			if healthCalls.Add(1) >= 3 {
				ready.Store(true)
			}
			if !ready.Load() {
				http.Error(w, "not yet", http.StatusServiceUnavailable)
				return
			}
		case r.Method == http.MethodPost && r.URL.Path == "/drain":
			drains.Add(1)
		default:
			http.NotFound(w, r)
		}
	}))
	defer srv.Close()
	addr := srv.Listener.Addr().String()

	if _, errOut, err := injectCLI(t, "", "hook", "wait-ready", "--health-addr="+addr, "--interval=10ms", "--timeout=10s"); err != nil {
		t.Fatalf("hook wait-ready: %v (%s)", err, errOut)
	}
	if n := healthCalls.Load(); n != 3 {
		t.Errorf("hook wait-ready: %d health checks, want 3 (two 503s, then 200)", n)
	}
	if _, errOut, err := injectCLI(t, "", "hook", "drain", "--admin-addr="+addr, "--wait=1ms"); err != nil || errOut != "" {
		t.Fatalf("hook drain: %v (stderr %q)", err, errOut)
	}
	if n := drains.Load(); n != 1 {
		t.Errorf("hook drain: %d POST /drain, want 1", n)
	}

	// Nothing listening: wait-ready times out naming the last error, drain
	// reports and still succeeds (the app keeps its time).
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := ln.Addr().String()
	ln.Close()
	_, _, err = injectCLI(t, "", "hook", "wait-ready", "--health-addr="+dead, "--interval=10ms", "--timeout=200ms")
	if err == nil || !strings.Contains(err.Error(), "did not become ready within 200ms") || !strings.Contains(err.Error(), "connection refused") {
		t.Errorf("hook wait-ready with nothing listening: got %v, want a timeout naming the refused connection", err)
	}
	_, errOut, err := injectCLI(t, "", "hook", "drain", "--admin-addr="+dead, "--wait=1ms")
	if err != nil || !strings.Contains(errOut, "connection refused") || !strings.Contains(errOut, "(waiting anyway)") {
		t.Errorf("hook drain with nothing listening: err %v, stderr %q; want success and a note", err, errOut)
	}
}

const dashboardConfigMapHeader = `# GENERATED from k8s/grafana-dashboard.json (the dashboard itself): do not
# edit; run go test ./cmd/sidecar -run TestGrafanaDashboardConfigMap -update-k8s
# The sidecars' Grafana dashboard as a ConfigMap for Grafana's dashboard
# loader (kube-prometheus-stack, the grafana chart: label grafana_dashboard).
# The sidecars are scraped on :15090/metrics: injected pods carry the
# prometheus.io/scrape, port and path annotations.
apiVersion: v1
kind: ConfigMap
metadata:
  name: sidecar-grafana-dashboard
  namespace: monitoring
  labels:
    grafana_dashboard: "1"
data:
  sidecar.json: |
`

// TestGrafanaDashboardConfigMap keeps k8s/grafana-dashboard.yaml equal to
// the dashboard JSON wrapped in a ConfigMap (the JSON is checked against the
// registered metrics by TestDashboardQueriesExistingMetrics).
func TestGrafanaDashboardConfigMap(t *testing.T) {
	js, err := os.ReadFile("../../k8s/grafana-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	b.WriteString(dashboardConfigMapHeader)
	for _, line := range strings.Split(strings.TrimRight(string(js), "\n"), "\n") {
		if line == "" {
			b.WriteString("\n")
			continue
		}
		b.WriteString("    " + line + "\n")
	}
	path := "../../k8s/grafana-dashboard.yaml"
	if *updateK8s {
		if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != b.String() {
		t.Fatalf("%s is not k8s/grafana-dashboard.json wrapped in its ConfigMap; rerun with -update-k8s", path)
	}
	// And the YAML carries the JSON unchanged.
	var cm struct {
		Data map[string]string `json:"data"`
	}
	if err := sigsyaml.Unmarshal(got, &cm); err != nil {
		t.Fatal(err)
	}
	var a, c any
	if err := json.Unmarshal(js, &a); err != nil {
		t.Fatalf("k8s/grafana-dashboard.json: %v", err)
	}
	if err := json.Unmarshal([]byte(cm.Data["sidecar.json"]), &c); err != nil {
		t.Fatalf("the ConfigMap's sidecar.json: %v", err)
	}
	ab, _ := json.Marshal(a)
	cb, _ := json.Marshal(c)
	if !bytes.Equal(ab, cb) {
		t.Fatalf("the ConfigMap's sidecar.json differs from k8s/grafana-dashboard.json")
	}
}

// TestInjectedArgsAreValidRunFlags: the args of every sidecar in the
// injection goldens are accepted by `sidecar run`'s own flag parsing and
// configuration validation (files named by --config are left out: they live
// in the pod's ConfigMaps), once the kubelet has expanded $(HOST_IP).
func TestInjectedArgsAreValidRunFlags(t *testing.T) {
	files, _ := filepath.Glob("../../pkg/inject/testdata/*.golden.yaml")
	checked := 0
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		objs, err := kubetest.Objects(data)
		if err != nil {
			t.Fatal(err)
		}
		for _, o := range objs {
			for _, args := range sidecarArgs(t, o) {
				if len(args) == 0 || args[0] != "run" {
					t.Errorf("%s: sidecar args %q, want run first", f, args)
					continue
				}
				var flags []string
				for _, a := range args[1:] {
					if !strings.HasPrefix(a, "--config=") {
						flags = append(flags, kubeletExpand.Replace(a))
					}
				}
				o := newRunOptions(io.Discard, io.Discard, func(string) string { return "" })
				fs := pflag.NewFlagSet("run", pflag.ContinueOnError)
				o.addFlags(fs)
				if err := fs.Parse(flags); err != nil {
					t.Errorf("%s: sidecar run %q: %v", f, flags, err)
					continue
				}
				if err := o.complete(); err != nil {
					t.Errorf("%s: sidecar run %q: %v", f, flags, err)
					continue
				}
				if err := o.validate(); err != nil {
					t.Errorf("%s: sidecar run %q: %v", f, flags, err)
				}
				checked++
			}
		}
	}
	if checked < 25 {
		t.Fatalf("checked the args of %d sidecars, want at least 25", checked)
	}
}

// kubeletExpand puts values in place of the sidecar container's variables
// in its args, as the kubelet does.
var kubeletExpand = strings.NewReplacer("$(HOST_IP)", "10.0.0.7", "$(POD_IP)", "10.1.0.9")

// sidecarArgs finds the args of the containers named sidecar anywhere in a
// JSON object.
func sidecarArgs(t *testing.T, obj []byte) [][]string {
	t.Helper()
	var v any
	if err := json.Unmarshal(obj, &v); err != nil {
		t.Fatal(err)
	}
	var out [][]string
	var walk func(any)
	walk = func(v any) {
		switch x := v.(type) {
		case map[string]any:
			if x["name"] == "sidecar" && x["image"] != nil {
				var args []string
				for _, a := range x["args"].([]any) {
					args = append(args, a.(string))
				}
				out = append(out, args)
			}
			for _, c := range x {
				walk(c)
			}
		case []any:
			for _, c := range x {
				walk(c)
			}
		}
	}
	walk(v)
	return out
}

// TestInjectedSidecarKeepsAdminOnLoopback: a pod's config file that binds
// the admin API to 0.0.0.0 is refused by `sidecar run` on its own; the
// injected sidecar's flags keep the admin API on loopback, unless the
// operator allowed otherwise (--allow-non-loopback-admin), which a pod
// can't.
func TestInjectedSidecarKeepsAdminOnLoopback(t *testing.T) {
	file := filepath.Join(t.TempDir(), "sidecar.yaml")
	if err := os.WriteFile(file, []byte("listeners: {admin: '0.0.0.0:15000'}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	// run is `sidecar run` with args (a --config= replaced by file) and env,
	// up to its validation.
	run := func(args []string, env map[string]string) (*runOptions, error) {
		var flags []string
		for _, a := range args {
			if strings.HasPrefix(a, "--config=") {
				a = "--config=" + file
			}
			flags = append(flags, a)
		}
		o := newRunOptions(io.Discard, io.Discard, func(k string) string { return env[k] })
		fs := pflag.NewFlagSet("run", pflag.ContinueOnError)
		o.addFlags(fs)
		if err := fs.Parse(flags); err != nil {
			t.Fatal(err)
		}
		if err := o.complete(); err != nil {
			return o, err
		}
		return o, o.validate()
	}
	if _, err := run([]string{"--config=" + file}, nil); err == nil || !strings.Contains(err.Error(), `listeners.admin: "0.0.0.0:15000" is not a loopback address`) {
		t.Errorf("sidecar run with the pod's file alone: got %v, want the admin address refused", err)
	}
	pod := strings.Replace(cliPod, "metadata:\n  name: web\n", "metadata:\n  name: web\n  annotations: {sidecar.mesh/config-map: pod-config}\n", 1)
	for _, allow := range []bool{false, true} {
		args := []string{"inject", "-f", "-"}
		if allow {
			args = append(args, "--allow-non-loopback-admin")
		}
		out, _, err := injectCLI(t, pod, args...)
		if err != nil {
			t.Fatal(err)
		}
		objs, err := kubetest.Objects([]byte(out))
		if err != nil {
			t.Fatal(err)
		}
		var p corev1.Pod
		if err := json.Unmarshal(objs[0], &p); err != nil {
			t.Fatal(err)
		}
		sc := p.Spec.InitContainers[0]
		env := map[string]string{}
		for _, e := range sc.Env {
			env[e.Name] = e.Value
		}
		o, err := run(sc.Args[1:], env)
		want := "127.0.0.1:15000"
		if allow {
			want = "0.0.0.0:15000"
		}
		if err != nil || o.cfg.Listeners.Admin != want {
			t.Errorf("allowed %v: the injected sidecar (args %q) with the pod's file: %v, admin %q; want it valid with the admin API on %s",
				allow, sc.Args, err, o.cfg.Listeners.Admin, want)
		}
	}
}

// TestK8sReadmeListsEveryAnnotation: the annotation table of
// k8s/README.md has a row for every annotation the injector knows, and
// none it doesn't.
func TestK8sReadmeListsEveryAnnotation(t *testing.T) {
	data, err := os.ReadFile("../../k8s/README.md")
	if err != nil {
		t.Fatal(err)
	}
	var rows []string
	for _, line := range strings.Split(string(data), "\n") {
		if name, ok := strings.CutPrefix(line, "| `"+inject.Prefix); ok {
			name, _, _ = strings.Cut(name, "`")
			rows = append(rows, inject.Prefix+name)
		}
	}
	slices.Sort(rows)
	if known := inject.KnownAnnotations(); !slices.Equal(rows, known) {
		t.Errorf("k8s/README.md's annotation rows:\n  %q\nwant one per known annotation:\n  %q", rows, known)
	}
}
