package inject

import (
	"bytes"
	"encoding/json"
	"fmt"
	"runtime"
	"runtime/metrics"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	sigsyaml "sigs.k8s.io/yaml"
)

// podList is what `kubectl get pods -o yaml` writes for n small pods.
func podList(n int) []byte {
	var b bytes.Buffer
	b.WriteString("apiVersion: v1\nitems:\n")
	for i := range n {
		fmt.Fprintf(&b, "- apiVersion: v1\n  kind: Pod\n  metadata:\n    name: web-%d\n    namespace: default\n    labels:\n      app: web\n"+
			"  spec:\n    containers:\n    - name: web\n      image: example.com/web:1\n      ports:\n      - containerPort: 8080\n        protocol: TCP\n", i)
	}
	b.WriteString("kind: List\nmetadata:\n  resourceVersion: \"\"\n")
	return b.Bytes()
}

// podListJSON is what `kubectl get pods -o json` writes for n small pods.
func podListJSON(n int) []byte {
	js, err := sigsyaml.YAMLToJSON(podList(n))
	if err != nil {
		panic(err)
	}
	var b bytes.Buffer
	if err := json.Indent(&b, js, "", "    "); err != nil {
		panic(err)
	}
	b.WriteByte('\n')
	return b.Bytes()
}

// TestListHeldInProportion: a List's items are injected and written one by
// one, YAML or JSON (flow style, written in block style as when written
// whole), so the heap holds the document and the output, about 7 KB an
// item here; written as one document, the YAML encoder held every event of
// every item to the end (about 140 KB an item: 10,000 pods took 3 GB).
func TestListHeldInProportion(t *testing.T) {
	const n = 2000
	for _, c := range []struct {
		name  string
		input []byte
	}{
		{"YAML", podList(n)},
		{"JSON", podListJSON(n)},
	} {
		t.Run(c.name, func(t *testing.T) {
			in := newTestInjector(t, nil)
			runtime.GC()
			peak := peakLiveHeap(func() {
				var out bytes.Buffer
				if _, err := in.Documents(bytes.NewReader(c.input), &out); err != nil {
					t.Fatal(err)
				}
				if got := strings.Count(out.String(), "\n    - name: sidecar\n"); got != n {
					t.Fatalf("%d sidecars in the output, want %d", got, n)
				}
			})
			if limit := uint64(8<<20 + n*20<<10); peak > limit {
				t.Errorf("injecting a %s List of %d pods (%d KB): live heap up to %d MB, want at most %d MB (20 KB an item)", c.name, n, len(c.input)>>10, peak>>20, limit>>20)
			}
			t.Logf("%s List of %d pods (%d KB): live heap up to %d MB", c.name, n, len(c.input)>>10, peak>>20)
		})
	}
}

// peakLiveHeap runs f and returns the largest live heap a garbage
// collection measured meanwhile.
func peakLiveHeap(f func()) uint64 {
	done, peak := make(chan struct{}), make(chan uint64)
	go func() {
		s := []metrics.Sample{{Name: "/gc/heap/live:bytes"}}
		var most uint64
		tick := time.NewTicker(time.Millisecond)
		defer tick.Stop()
		for {
			metrics.Read(s)
			most = max(most, s[0].Value.Uint64())
			select {
			case <-done:
				peak <- most
				return
			case <-tick.C:
			}
		}
	}()
	f()
	runtime.GC() // a last measure
	close(done)
	return <-peak
}

// jsonList is a List as `kubectl get -o json` writes it.
const jsonList = `{
    "apiVersion": "v1",
    "items": [
        {
            "apiVersion": "v1",
            "data": {"a": "yes"},
            "kind": "ConfigMap",
            "metadata": {"name": "c"}
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"labels": {"app": "web"}, "name": "web"},
            "spec": {"containers": [{"image": "web:1", "name": "web", "ports": [{"containerPort": 8080}]}]}
        }
    ],
    "kind": "List",
    "metadata": {"resourceVersion": ""}
}
`

// TestListWrittenAsWhole: a List written item by item reads byte for byte
// as the same List patched and written whole, comments included; a List
// the placeholder can't stand in for is written whole.
func TestListWrittenAsWhole(t *testing.T) {
	pod := func(name string) string {
		return "  kind: Pod\n  metadata: {name: " + name + "}\n  spec:\n    containers: [{name: a, image: b, ports: [{containerPort: 8080}]}]\n"
	}
	cases := map[string]string{
		"comments": "# a list\napiVersion: v1\nkind: List\n# its items\nitems:\n# the first\n- apiVersion: v1\n" + pod("one") +
			"# the second\n- apiVersion: v1 # trailing\n" + pod("two") + "# after the items\nmetadata: {}\n# the end\n",
		"items first":         "items:\n- apiVersion: v1\n" + pod("one") + "apiVersion: v1\nkind: List\n",
		"items last":          "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n" + pod("one") + "- apiVersion: v1\n" + pod("two"),
		"a config map kept":   "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: ConfigMap, metadata: {name: c}, data: {a: 'yes'}}\n- apiVersion: v1\n" + pod("one"),
		"flow items":          "apiVersion: v1\nkind: List\nitems: [{apiVersion: v1, kind: Pod, metadata: {name: p}, spec: {containers: [{name: a, image: b}]}}]\n",
		"flow list":           "{apiVersion: v1, kind: List, items: [{apiVersion: v1, kind: Pod, metadata: {name: p}, spec: {containers: [{name: a, image: b}]}}]}\n",
		"JSON":                jsonList,
		"anchors":             "apiVersion: v1\nkind: List\nitems:\n- &p\n  apiVersion: v1\n" + pod("one") + "- *p\n",
		"a list in a list":    "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: List\n  items:\n  - apiVersion: v1\n  " + strings.ReplaceAll(pod("one"), "\n  ", "\n    "),
		"a PodList":           "apiVersion: v1\nkind: PodList\nitems:\n- apiVersion: v1\n" + pod("one"),
		"the placeholder too": "apiVersion: v1\nkind: List\nmetadata: {annotations: {x: " + itemsPlaceholder + "}}\nitems:\n- apiVersion: v1\n" + pod("one"),
	}
	in := newTestInjector(t, nil)
	for name, input := range cases {
		t.Run(name, func(t *testing.T) {
			var out bytes.Buffer
			if _, err := in.Documents(strings.NewReader(input), &out); err != nil {
				t.Fatal(err)
			}
			want := wholeDocument(t, in, []byte(input))
			if out.String() != want {
				t.Errorf("input:\n%s\nwritten item by item:\n%s\nwritten whole:\n%s\n%s", input, out.String(), want, lineDiff(want, out.String()))
			}
			if !strings.Contains(out.String(), "name: sidecar") {
				t.Errorf("no sidecar injected:\n%s", out.String())
			}
		})
	}
}

// wholeDocument injects a one-document input by patching the document's
// tree whole, by path, and writing it in one go.
func wholeDocument(t *testing.T, in *Injector, text []byte) string {
	t.Helper()
	js, err := sigsyaml.YAMLToJSONStrict(text)
	if err != nil {
		t.Fatal(err)
	}
	ops, _, err := in.object(js, "", "document 1 (line 1", "")
	if err != nil {
		t.Fatal(err)
	}
	doc, root, err := parseDocument(text, js)
	if err != nil {
		t.Fatal(err)
	}
	if err := Apply(root, ops); err != nil {
		t.Fatal(err)
	}
	out, err := encodeYAML(doc)
	if err != nil {
		t.Fatal(err)
	}
	return string(out)
}

// BenchmarkDocumentsList injects a List of 10,000 small pods, as
// `kubectl get pods -o yaml | sidecar inject -f -` does, and as JSON
// (`-o json`).
func BenchmarkDocumentsList(b *testing.B) {
	const n = 10000
	in, err := New(testConfig())
	if err != nil {
		b.Fatal(err)
	}
	for _, c := range []struct {
		name  string
		input []byte
	}{
		{"yaml", podList(n)},
		{"json", podListJSON(n)},
	} {
		b.Run(c.name, func(b *testing.B) {
			b.SetBytes(int64(len(c.input)))
			b.ReportAllocs()
			var out bytes.Buffer
			for b.Loop() {
				out.Reset()
				if _, err := in.Documents(bytes.NewReader(c.input), &out); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/n, "ns/item")
		})
	}
}

// What `sidecar inject` writes reads back as the same strings in YAML 1.1,
// as kubectl (sigs.k8s.io/yaml) reads it: a label "yes", args "on" and
// "Y", a container named "no" stay strings, in a document rebuilt from
// JSON (it has anchors) and in one edited in place.
func TestInjectedYAMLKeepsStringsForKubectl(t *testing.T) {
	in := newTestInjector(t, func(c *Config) { c.Classic = true })
	for name, doc := range map[string]string{
		"anchors": `apiVersion: v1
kind: Pod
metadata:
  name: web
  labels: &l {enabled: "yes", flag: "on", "off": "x"}
  annotations: *l
spec:
  containers:
  - name: "no"
    image: app:1
    args: ["yes", "off", "Y", "~", "null"]
`,
		"plain": `apiVersion: v1
kind: Pod
metadata:
  name: web
  labels: {enabled: "yes"}
spec:
  containers:
  - name: "no"
    image: app:1
`,
	} {
		var out bytes.Buffer
		if _, err := in.DocumentBytes([]byte(doc), &out); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		var pod corev1.Pod
		if err := sigsyaml.UnmarshalStrict(out.Bytes(), &pod); err != nil {
			t.Fatalf("%s: kubectl's reading of the output: %v\n%s", name, err, out.String())
		}
		if pod.Labels["enabled"] != "yes" || pod.Spec.Containers[1].Name != "no" || pod.Annotations["kubectl.kubernetes.io/default-container"] != "no" {
			t.Errorf("%s: labels %v, containers %s, annotations %v; want the strings as written\n%s", name, pod.Labels, pod.Spec.Containers[1].Name, pod.Annotations, out.String())
		}
		if name == "anchors" && (pod.Labels["flag"] != "on" || pod.Labels["off"] != "x" || strings.Join(pod.Spec.Containers[1].Args, ",") != "yes,off,Y,~,null") {
			t.Errorf("%s: labels %v, args %q; want the strings as written\n%s", name, pod.Labels, pod.Spec.Containers[1].Args, out.String())
		}
	}
}

// `kubectl get -o yaml` of a newer cluster than this build knows is
// injected: a status field the build does not know is no user's typo
// (status is never patched); one elsewhere still is.
func TestUnknownStatusFieldsPass(t *testing.T) {
	in := newTestInjector(t, nil)
	doc := `apiVersion: v1
kind: Pod
metadata:
  name: web
spec:
  containers:
  - name: app
    image: app:1
status:
  phase: Running
  observedGeneration: 3
`
	var out bytes.Buffer
	if _, err := in.DocumentBytes([]byte(doc), &out); err != nil || !strings.Contains(out.String(), "observedGeneration: 3") {
		t.Fatalf("a newer status field: %v\n%s", err, out.String())
	}
	typo := strings.Replace(doc, "    image: app:1", "    image: app:1\n    imagePullPolicyy: Always", 1)
	if _, err := in.DocumentBytes([]byte(typo), &bytes.Buffer{}); err == nil || !strings.Contains(err.Error(), `unknown field "spec.containers[0].imagePullPolicyy"`) {
		t.Fatalf("a typo in spec: %v, want it refused by name", err)
	}
}
