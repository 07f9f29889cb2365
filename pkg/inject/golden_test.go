package inject

import (
	"bytes"
	"flag"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var update = flag.Bool("update", false, "rewrite the golden files in testdata")

// testConfig is the injector the goldens are made with.
func testConfig() Config {
	return Config{Image: "sidecar:test", Version: "test"}
}

// goldenCases are the inputs in testdata and the injector settings for
// each: NAME.in.yaml gives NAME.golden.yaml (and NAME.notices.txt with what
// Documents reported, when anything).
var goldenCases = []struct {
	name string // golden name
	in   string // input name
	cfg  func(*Config)
}{
	{name: "deployment", in: "deployment"},
	{name: "statefulset", in: "statefulset"},
	{name: "daemonset", in: "daemonset"},
	{name: "job", in: "job"},
	{name: "cronjob", in: "cronjob"},
	{name: "pod", in: "pod"},
	{name: "list", in: "list"},
	{name: "untouched", in: "untouched"},
	{name: "annotations", in: "annotations"},
	{name: "probes", in: "probes"},
	{name: "classic", in: "classic", cfg: func(c *Config) { c.Classic = true }},
	{name: "anchors", in: "anchors"},
	{name: "pod-flags", in: "pod", cfg: func(c *Config) {
		c.Image = "registry.example.com/sidecar:2.0.0"
		c.ImagePullPolicy = corev1.PullAlways
		c.LogLevel = "warn"
		c.DrainWindow = 10 * time.Second
		c.ConsulAddr = "consul.consul.svc:8500"
		c.HTTPProxy = true
		c.NoProxyExtra = []string{"10.96.0.0/12", ".corp.example"}
		c.Env = []corev1.EnvVar{{Name: "OTEL_EXPORTER_OTLP_ENDPOINT", Value: "http://jaeger.observability:4317"}}
		c.Resources = corev1.ResourceRequirements{
			Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("10m"), corev1.ResourceMemory: resource.MustParse("32Mi")},
			Limits:   corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("500m")},
		}
	}},
}

func newTestInjector(t *testing.T, mod func(*Config)) *Injector {
	t.Helper()
	cfg := testConfig()
	if mod != nil {
		mod(&cfg)
	}
	in, err := New(cfg)
	if err != nil {
		t.Fatalf("New(%+v): %v", cfg, err)
	}
	return in
}

func runDocuments(t *testing.T, in *Injector, input []byte) (string, string) {
	t.Helper()
	var out bytes.Buffer
	notices, err := in.Documents(bytes.NewReader(input), &out)
	if err != nil {
		t.Fatalf("Documents: %v", err)
	}
	var ns strings.Builder
	for _, n := range notices {
		ns.WriteString(n.String() + "\n")
	}
	return out.String(), ns.String()
}

// TestGolden injects every input in testdata and compares with its golden
// file; `go test ./pkg/inject -run TestGolden -update` rewrites them.
func TestGolden(t *testing.T) {
	for _, tc := range goldenCases {
		t.Run(tc.name, func(t *testing.T) {
			input, err := os.ReadFile(filepath.Join("testdata", tc.in+".in.yaml"))
			if err != nil {
				t.Fatal(err)
			}
			in := newTestInjector(t, tc.cfg)
			got, notices := runDocuments(t, in, input)
			checkGolden(t, filepath.Join("testdata", tc.name+".golden.yaml"), got)
			noticeFile := filepath.Join("testdata", tc.name+".notices.txt")
			if notices != "" || fileExists(noticeFile) {
				checkGolden(t, noticeFile, notices)
			}

			// Idempotent: injecting the output again changes no byte, and
			// says why each pod was left alone.
			again, againNotices := runDocuments(t, in, []byte(got))
			if again != got {
				t.Errorf("injecting %s.golden.yaml again changed it:\n%s", tc.name, lineDiff(got, again))
			}
			if strings.Contains(againNotices, "warning") {
				t.Errorf("injecting %s.golden.yaml again: got warnings, want none:\n%s", tc.name, againNotices)
			}
		})
	}
}

func checkGolden(t *testing.T, path, got string) {
	t.Helper()
	if *update {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("reading the golden file (create it with -update): %v", err)
	}
	if got != string(want) {
		t.Errorf("%s: output differs from the golden file (rerun with -update if the change is intended):\n%s", path, lineDiff(string(want), got))
	}
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// lineDiff shows the first lines that differ, with context.
func lineDiff(want, got string) string {
	w, g := strings.Split(want, "\n"), strings.Split(got, "\n")
	for i := 0; i < max(len(w), len(g)); i++ {
		var wl, gl string
		if i < len(w) {
			wl = w[i]
		}
		if i < len(g) {
			gl = g[i]
		}
		if wl != gl {
			lo := max(0, i-3)
			var b strings.Builder
			for j := lo; j < i; j++ {
				b.WriteString("    " + w[j] + "\n")
			}
			b.WriteString("  - " + wl + "\n  + " + gl + "\n")
			return b.String() + "(first difference at line " + strconv.Itoa(i+1) + ")"
		}
	}
	return "(no line differs)"
}
