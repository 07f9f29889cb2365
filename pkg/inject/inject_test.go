package inject

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"
	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	sigsyaml "sigs.k8s.io/yaml"
)

const deployHead = `apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
`

// TestMalformedInput: every error names the document (index, line, kind
// and name) and the field, and nothing is written.
func TestMalformedInput(t *testing.T) {
	ok := "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: fine}\n---\n"
	cases := []struct {
		name  string
		input string
		want  []string
	}{
		{"unknown field", ok + deployHead + "    spec:\n      contaners: []\n",
			[]string{"document 2 (line 5, Deployment web)", `unknown field "spec.template.spec.contaners"`}},
		{"wrong type", ok + deployHead + "    spec:\n      containers:\n      - name: a\n        image: b\n        ports: [{containerPort: http}]\n",
			[]string{"document 2 (line 5, Deployment web)", "containerPort", "int32"}},
		{"bad annotation value", ok + deployHead + "      annotations: {sidecar.mesh/app-port: abc}\n    spec:\n      containers: [{name: a, image: b}]\n",
			[]string{"document 2 (line 5, Deployment web)", `spec.template.metadata.annotations[sidecar.mesh/app-port]: "abc" is not a port number`}},
		{"unknown annotation", deployHead + "      annotations: {sidecar.mesh/app-prot: '8080'}\n    spec:\n      containers: [{name: a, image: b}]\n",
			[]string{"document 1 (line 1, Deployment web)", "spec.template.metadata.annotations[sidecar.mesh/app-prot]: unknown annotation (known: sidecar.mesh/app-container, sidecar.mesh/app-port"}},
		{"bad inject label", "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  labels: {sidecar.mesh/inject: maybe}\nspec:\n  containers: [{name: a, image: b}]\n",
			[]string{"document 1 (line 1, Pod p)", `metadata.labels[sidecar.mesh/inject]: "maybe" (allowed: true, false, enabled, disabled)`}},
		{"several annotation errors", "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations: {sidecar.mesh/log-level: loud, sidecar.mesh/drain-window: forever, sidecar.mesh/memory-limit: lots}\nspec:\n  containers: [{name: a, image: b}]\n",
			[]string{`metadata.annotations[sidecar.mesh/drain-window]: invalid duration "forever"`, `metadata.annotations[sidecar.mesh/log-level]: "loud" (allowed: debug, info, warn, error)`, `metadata.annotations[sidecar.mesh/memory-limit]: "lots" is not a quantity`}},
		{"request above limit", "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations: {sidecar.mesh/memory-request: 1Gi}\nspec:\n  containers: [{name: a, image: b}]\n",
			[]string{"memory request 1Gi is above its limit 256Mi"}},
		{"missing kind", "apiVersion: v1\nmetadata: {name: x}\n",
			[]string{"document 1 (line 1): kind: missing"}},
		{"missing apiVersion", ok + "kind: Pod\nmetadata: {name: x}\n",
			[]string{"document 2 (line 5, Pod x): apiVersion: missing"}},
		{"old apiVersion", "apiVersion: extensions/v1beta1\nkind: Deployment\nmetadata: {name: old}\n",
			[]string{"document 1 (line 1, Deployment old): apiVersion: extensions/v1beta1 Deployment is not supported (want apps/v1)"}},
		{"yaml syntax", ok + ok + "kind: Pod\n  bad: indent\n",
			[]string{"document 3 (line 9)", "yaml"}},
		{"duplicate key", "apiVersion: v1\nkind: Pod\nkind: Pod\n",
			[]string{"document 1 (line 1)", `"kind" already set`}},
		{"no containers", "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {}\n",
			[]string{"document 1 (line 1, Pod p): spec.containers: the pod has no containers"}},
		{"no such app container", "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations: {sidecar.mesh/app-container: main}\nspec:\n  containers: [{name: a, image: b}]\n",
			[]string{`metadata.annotations[sidecar.mesh/app-container]: no container named "main"`}},
		{"port taken by the sidecar", "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: a, image: b, ports: [{containerPort: 8080}, {containerPort: 15020}]}]\n",
			[]string{"spec.containers[0].ports[1].containerPort: 15020 is one of the sidecar's own ports"}},
		{"volume name taken", "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations: {sidecar.mesh/config-map: cfg}\nspec:\n  volumes: [{name: sidecar-config, emptyDir: {}}]\n  containers: [{name: a, image: b}]\n",
			[]string{`spec.volumes[0].name: "sidecar-config" is the name of the sidecar's volume`}},
		{"list item", "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: ConfigMap, metadata: {name: a}}\n- {apiVersion: v1, kind: Pod, metadata: {name: b, annotations: {sidecar.mesh/classic: 'yes'}}, spec: {containers: [{name: a, image: b}]}}\n",
			[]string{"document 1 (line 1, Pod b): items[1].metadata.annotations[sidecar.mesh/classic]: \"yes\" (allowed: true, false)"}},
		{"cronjob template", "apiVersion: batch/v1\nkind: CronJob\nmetadata: {name: c}\nspec:\n  schedule: '* * * * *'\n  jobTemplate:\n    spec:\n      template:\n        metadata:\n          annotations: {sidecar.mesh/service: Not_Valid}\n        spec:\n          containers: [{name: a, image: b}]\n",
			[]string{"document 1 (line 1, CronJob c): spec.jobTemplate.spec.template.metadata.annotations[sidecar.mesh/service]"}},
	}
	in := newTestInjector(t, nil)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var out bytes.Buffer
			_, err := in.Documents(strings.NewReader(tc.input), &out)
			if err == nil {
				t.Fatalf("Documents(%q): got no error, want one containing %q", tc.input, tc.want)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("Documents: got error\n  %v\nwant it to contain\n  %s", err, w)
				}
			}
			if out.Len() != 0 {
				t.Errorf("Documents wrote %d bytes despite the error, want none", out.Len())
			}
		})
	}
}

func TestNewValidatesConfig(t *testing.T) {
	_, err := New(Config{ImagePullPolicy: "Sometimes", LogLevel: "loud", DrainWindow: time.Hour,
		ConsulAddr: "nope", Env: []corev1.EnvVar{{Name: "POD_IP", Value: "x"}}})
	for _, w := range []string{`image: "" is not an image reference`, `image pull policy: "Sometimes"`,
		`log level: "loud"`, "drain window: 1h0m0s is not allowed", `consul address: "nope"`, "env: POD_IP is set by the injector"} {
		if err == nil || !strings.Contains(err.Error(), w) {
			t.Errorf("New with a bad config: got %v, want an error containing %q", err, w)
		}
	}
}

// TestInjectPodSkips: opted out, host network, already injected, and a
// foreign container named "sidecar" are each left alone with a reason.
func TestInjectPodSkips(t *testing.T) {
	in := newTestInjector(t, nil)
	app := []corev1.Container{{Name: "app", Image: "app:1"}}
	cases := []struct {
		name    string
		meta    metav1.ObjectMeta
		spec    corev1.PodSpec
		skipped string
		warns   int
	}{
		{"annotation", metav1.ObjectMeta{Annotations: map[string]string{AnnotationInject: "disabled"}}, corev1.PodSpec{Containers: app}, "opted out", 0},
		{"label", metav1.ObjectMeta{Labels: map[string]string{AnnotationInject: "false"}}, corev1.PodSpec{Containers: app}, "opted out", 0},
		{"host network", metav1.ObjectMeta{}, corev1.PodSpec{HostNetwork: true, Containers: app}, "hostNetwork", 0},
		{"injected", metav1.ObjectMeta{Annotations: map[string]string{AnnotationStatus: "{}"}},
			corev1.PodSpec{InitContainers: []corev1.Container{{Name: ContainerName}}, Containers: app}, "already injected", 0},
		{"foreign sidecar", metav1.ObjectMeta{}, corev1.PodSpec{Containers: append([]corev1.Container{{Name: ContainerName}}, app...)}, "a container named sidecar exists", 1},
		// The API server refuses a Windows pod with the sidecar's security
		// context: injecting would block it.
		{"windows", metav1.ObjectMeta{}, corev1.PodSpec{OS: &corev1.PodOS{Name: corev1.Windows}, Containers: app}, "Windows pod (spec.os.name windows)", 1},
		{"istio's proxy", metav1.ObjectMeta{}, corev1.PodSpec{Containers: append(slices.Clone(app), corev1.Container{Name: "istio-proxy",
			Ports: []corev1.ContainerPort{{ContainerPort: 15090}}})}, "Istio's proxy (container istio-proxy)", 1},
		{"linkerd asked for", metav1.ObjectMeta{Annotations: map[string]string{"linkerd.io/inject": "enabled"}}, corev1.PodSpec{Containers: app},
			"Linkerd's proxy (linkerd.io/inject: enabled)", 1},
		{"istio asked for", metav1.ObjectMeta{Labels: map[string]string{"sidecar.istio.io/inject": "true"}}, corev1.PodSpec{Containers: app},
			"Istio's proxy (sidecar.istio.io/inject: true)", 1},
		{"windows nodes", metav1.ObjectMeta{}, corev1.PodSpec{NodeSelector: map[string]string{"kubernetes.io/os": "windows"}, Containers: app},
			"Windows pod (the node selector kubernetes.io/os: windows)", 1},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			meta, spec := tc.meta.DeepCopy(), tc.spec.DeepCopy()
			res, err := in.InjectPod(meta, spec)
			if err != nil || res.Injected || !strings.Contains(res.Skipped, tc.skipped) || len(res.Warnings) != tc.warns {
				t.Fatalf("InjectPod: got %+v, %v; want skipped %q with %d warnings", res, err, tc.skipped, tc.warns)
			}
			if !equalJSON(t, meta, &tc.meta) || !equalJSON(t, spec, &tc.spec) {
				t.Errorf("InjectPod changed a pod it skipped")
			}
		})
	}
}

// TestInjectPodGracePeriod: the drain window is added to the grace period
// the app had (30 s when unset).
func TestInjectPodGracePeriod(t *testing.T) {
	in := newTestInjector(t, func(c *Config) { c.DrainWindow = 2500 * time.Millisecond })
	for _, tc := range []struct {
		grace *int64
		want  int64
	}{{nil, 33}, {ptr(int64(0)), 3}, {ptr(int64(120)), 123}, {ptr(int64(math.MaxInt64)), math.MaxInt64}, {ptr(int64(math.MaxInt64 - 1)), math.MaxInt64}} {
		spec := corev1.PodSpec{TerminationGracePeriodSeconds: tc.grace, Containers: []corev1.Container{{Name: "a", Image: "b"}}}
		meta := metav1.ObjectMeta{}
		if _, err := in.InjectPod(&meta, &spec); err != nil {
			t.Fatal(err)
		}
		if got := *spec.TerminationGracePeriodSeconds; got != tc.want {
			t.Errorf("grace %v with a 2.5s drain window: got %d, want %d", tc.grace, got, tc.want)
		}
		if got := spec.InitContainers[0].Args[len(spec.InitContainers[0].Args)-1]; got != "--drain-window=2.5s" {
			t.Errorf("last sidecar arg: got %q, want --drain-window=2.5s", got)
		}
	}
}

// TestSidecarContainer checks the parts of the injected container that the
// issue asks for, by value rather than by golden text.
func TestSidecarContainer(t *testing.T) {
	in := newTestInjector(t, nil)
	meta := metav1.ObjectMeta{Labels: map[string]string{"app": "orders"}}
	spec := corev1.PodSpec{InitContainers: []corev1.Container{{Name: "init", Image: "i"}},
		Containers: []corev1.Container{{Name: "app", Image: "a", Ports: []corev1.ContainerPort{{ContainerPort: 8080}}}}}
	if _, err := in.InjectPod(&meta, &spec); err != nil {
		t.Fatal(err)
	}
	if n := len(spec.InitContainers); n != 2 || spec.InitContainers[0].Name != ContainerName || spec.InitContainers[1].Name != "init" {
		t.Fatalf("init containers: got %d, first %q; want the sidecar first, then init", n, spec.InitContainers[0].Name)
	}
	c := spec.InitContainers[0]
	if c.RestartPolicy == nil || *c.RestartPolicy != corev1.ContainerRestartPolicyAlways {
		t.Errorf("restartPolicy: got %v, want Always (a native sidecar)", c.RestartPolicy)
	}
	if c.StartupProbe == nil || c.StartupProbe.HTTPGet.Path != "/healthz/sidecar" || c.StartupProbe.HTTPGet.Port.IntValue() != PortHealth {
		t.Errorf("startupProbe: got %+v, want GET /healthz/sidecar on %d", c.StartupProbe, PortHealth)
	}
	sc := c.SecurityContext
	if sc == nil || !*sc.RunAsNonRoot || *sc.RunAsUser != UID || !*sc.ReadOnlyRootFilesystem || *sc.AllowPrivilegeEscalation ||
		len(sc.Capabilities.Drop) != 1 || sc.Capabilities.Drop[0] != "ALL" || sc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("securityContext: got %+v, want non-root uid 1337, read-only root, no escalation, drop ALL, RuntimeDefault seccomp", sc)
	}
	env := map[string]string{}
	for _, e := range c.Env {
		if e.ValueFrom != nil && e.ValueFrom.FieldRef != nil {
			env[e.Name] = e.ValueFrom.FieldRef.FieldPath
		}
	}
	for name, path := range map[string]string{"POD_IP": "status.podIP", "POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace", "HOST_IP": "status.hostIP"} {
		if env[name] != path {
			t.Errorf("env %s: got fieldPath %q, want %q", name, env[name], path)
		}
	}
	ports := map[string]int32{}
	for _, p := range c.Ports {
		ports[p.Name] = p.ContainerPort
	}
	if len(ports) != 3 || ports["sidecar-inbound"] != PortInbound || ports["sidecar-health"] != PortHealth || ports["sidecar-metrics"] != PortMetrics {
		t.Errorf("ports: got %v, want sidecar-inbound 15006, sidecar-health 15020, sidecar-metrics 15090", ports)
	}
	wantArgs := []string{"run", "--app-port=8080", "--service=orders", "--drain-window=5s"}
	if strings.Join(c.Args, " ") != strings.Join(wantArgs, " ") {
		t.Errorf("args: got %q, want %q", c.Args, wantArgs)
	}
	var st Status
	if err := json.Unmarshal([]byte(meta.Annotations[AnnotationStatus]), &st); err != nil || st.Version != "test" || st.Mode != "native" || len(st.Hash) != 12 {
		t.Errorf("status annotation: got %q (%v), want version test, mode native, a 12-digit hash", meta.Annotations[AnnotationStatus], err)
	}
}

// TestReviewPatchMatchesDocuments: for every Pod among the golden inputs,
// the webhook's JSON Patch, applied to the pod, gives the pod `inject`
// writes. One code path, two front ends.
func TestReviewPatchMatchesDocuments(t *testing.T) {
	in := newTestInjector(t, nil)
	files, _ := filepath.Glob(filepath.Join("testdata", "*.in.yaml"))
	pods := 0
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range splitDocuments(data) {
			js, err := sigsyaml.YAMLToJSON(d.text)
			if err != nil {
				t.Fatal(err)
			}
			var tm typeMeta
			if json.Unmarshal(js, &tm) != nil || tm.Kind != "Pod" {
				continue
			}
			pods++
			// What inject writes, as JSON.
			var out bytes.Buffer
			if _, err := in.Documents(bytes.NewReader(d.text), &out); err != nil {
				t.Fatalf("%s, pod %s: Documents: %v", f, tm.Metadata.Name, err)
			}
			want, err := sigsyaml.YAMLToJSON(out.Bytes())
			if err != nil {
				t.Fatal(err)
			}
			// What the webhook's patch makes of the same pod.
			review, d, err := in.Review(admissionRequest(t, "CREATE", "pods", js))
			if err != nil {
				t.Fatalf("%s, pod %s: Review: %v", f, tm.Metadata.Name, err)
			}
			resp := review.Response
			if !resp.Allowed || resp.UID != "uid-1" {
				t.Fatalf("%s, pod %s: got response %+v, want allowed with uid-1", f, tm.Metadata.Name, resp)
			}
			got := js
			if resp.Patch != nil {
				if *resp.PatchType != admissionv1.PatchTypeJSONPatch || d.Patch == 0 {
					t.Fatalf("%s, pod %s: patch type %v, %d ops", f, tm.Metadata.Name, *resp.PatchType, d.Patch)
				}
				got = applyJSONPatch(t, js, resp.Patch)
			}
			if !jsonEqual(t, got, want) {
				t.Errorf("%s, pod %s: the patched pod differs from inject's output\npatch: %s\npatched: %s\ninject:  %s", f, tm.Metadata.Name, resp.Patch, got, want)
			}
		}
	}
	if pods < 15 {
		t.Fatalf("checked %d pods from testdata, want at least 15", pods)
	}
}

func TestReviewOtherRequests(t *testing.T) {
	in := newTestInjector(t, nil)
	pod := []byte(`{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p"},"spec":{"containers":[{"name":"a","image":"b"}]}}`)
	for _, tc := range []struct {
		name, op, resource string
		obj                []byte
	}{
		{"update", "UPDATE", "pods", pod},
		{"configmap", "CREATE", "configmaps", []byte(`{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c"}}`)},
	} {
		review, d, err := in.Review(admissionRequest(t, tc.op, tc.resource, tc.obj))
		if err != nil || !review.Response.Allowed || review.Response.Patch != nil || d.Injected || !strings.Contains(d.Skipped, "not a pod creation") {
			t.Errorf("%s: got %+v %+v %v, want allowed, no patch, skipped as not a pod creation", tc.name, review.Response, d, err)
		}
	}

	// A bad annotation is refused with its field.
	bad := []byte(`{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p","annotations":{"sidecar.mesh/app-port":"0"}},"spec":{"containers":[{"name":"a","image":"b"}]}}`)
	review, d, err := in.Review(admissionRequest(t, "CREATE", "pods", bad))
	if err != nil || review.Response.Allowed || review.Response.Result == nil || review.Response.Result.Code != 422 ||
		!strings.Contains(review.Response.Result.Message, `metadata.annotations[sidecar.mesh/app-port]: "0" is not a port number`) || d.Denied == "" {
		t.Errorf("bad annotation: got %+v %v, want a 422 denial naming the annotation", review.Response, err)
	}

	// Malformed reviews are errors.
	for _, body := range []string{`{`, `{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":{}}`,
		`{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}`} {
		if _, _, err := in.Review([]byte(body)); err == nil {
			t.Errorf("Review(%s): got no error, want one", body)
		}
	}
}

func TestPatchOperations(t *testing.T) {
	node := func(s string) *yaml.Node {
		n, err := jsonNode([]byte(s))
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	a := node(`{"metadata":{"annotations":{"a/b":"1","x~y":"2"}},"list":[{"name":"one","v":1},{"name":"two"}],"args":["x","y"],"gone":true}`)
	b := node(`{"metadata":{"annotations":{"a/b":"1","x~y":"3","new":"n"}},"list":[{"name":"zero"},{"name":"one","v":2},{"name":"two"}],"args":["x","z","y"]}`)
	ops := Diff(a, b)
	got, err := PatchJSON(ops)
	if err != nil {
		t.Fatal(err)
	}
	want := `[{"op":"replace","path":"/metadata/annotations/x~0y","value":"3"},{"op":"add","path":"/metadata/annotations/new","value":"n"},` +
		`{"op":"add","path":"/list/0","value":{"name":"zero"}},{"op":"replace","path":"/list/1/v","value":2},` +
		`{"op":"add","path":"/args/1","value":"z"},{"op":"remove","path":"/gone"}]`
	if string(got) != want {
		t.Errorf("Diff:\n got %s\nwant %s", got, want)
	}
	if err := Apply(a, ops); err != nil {
		t.Fatal(err)
	}
	if !equal(a, b) {
		t.Errorf("Apply(Diff(a, b)) to a is not b")
	}
	if err := Apply(a, []Operation{{Op: "remove", Path: "/nope"}}); err == nil || !strings.Contains(err.Error(), `remove /nope: "nope" does not exist`) {
		t.Errorf("Apply remove of a missing key: got %v", err)
	}
	if b, _ := PatchJSON(nil); string(b) != "[]" {
		t.Errorf("PatchJSON(nil): got %s, want []", b)
	}
}

// ---- helpers --------------------------------------------------------------

func admissionRequest(t *testing.T, op, resource string, obj []byte) []byte {
	t.Helper()
	review := map[string]any{
		"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
		"request": map[string]any{
			"uid": "uid-1", "kind": map[string]string{"group": "", "version": "v1", "kind": "Pod"},
			"resource":  map[string]string{"group": "", "version": "v1", "resource": resource},
			"namespace": "ns", "operation": op, "object": json.RawMessage(obj),
			"userInfo": map[string]any{"username": "test"},
		},
	}
	b, err := json.Marshal(review)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// applyJSONPatch applies an RFC 6902 patch with the package's Apply, made
// strict: every op must find its parent (the API server's patcher would).
func applyJSONPatch(t *testing.T, doc, patch []byte) []byte {
	t.Helper()
	var raw []struct {
		Op    string          `json:"op"`
		Path  string          `json:"path"`
		Value json.RawMessage `json:"value"`
	}
	if err := json.Unmarshal(patch, &raw); err != nil {
		t.Fatalf("the patch is not JSON Patch: %v\n%s", err, patch)
	}
	root, err := jsonNode(doc)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range raw {
		op := Operation{Op: r.Op, Path: r.Path}
		if r.Op != "remove" {
			if op.Value, err = jsonNode(r.Value); err != nil {
				t.Fatal(err)
			}
		}
		parent := r.Path[:strings.LastIndex(r.Path, "/")]
		if parent != "" {
			if n, err := lookup(root, parent); err != nil || n == nil {
				t.Fatalf("patch op %s %s: the parent %s does not exist in the pod (%v); the API server would refuse it", r.Op, r.Path, parent, err)
			}
		}
		if err := Apply(root, []Operation{op}); err != nil {
			t.Fatalf("applying %s %s: %v", r.Op, r.Path, err)
		}
	}
	var buf bytes.Buffer
	if err := writeNodeJSON(&buf, root); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func lookup(root *yaml.Node, path string) (*yaml.Node, error) {
	n := root
	for _, tok := range strings.Split(strings.TrimPrefix(path, "/"), "/") {
		var err error
		if n, err = child(n, unescapePointer(tok)); err != nil || n == nil {
			return nil, err
		}
	}
	return n, nil
}

func jsonEqual(t *testing.T, a, b []byte) bool {
	t.Helper()
	var x, y any
	if err := json.Unmarshal(a, &x); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &y); err != nil {
		t.Fatal(err)
	}
	xb, _ := json.Marshal(x)
	yb, _ := json.Marshal(y)
	return bytes.Equal(xb, yb)
}

func equalJSON(t *testing.T, a, b any) bool {
	t.Helper()
	x, err1 := json.Marshal(a)
	y, err2 := json.Marshal(b)
	if err := errors.Join(err1, err2); err != nil {
		t.Fatal(err)
	}
	return bytes.Equal(x, y)
}

func ptr[T any](v T) *T { return &v }

// With the transparent annotation, the redirect's init container runs
// first and the sidecar serves redirected connections.
func TestInjectPodTransparent(t *testing.T) {
	in := newTestInjector(t, nil)
	meta := metav1.ObjectMeta{Annotations: map[string]string{AnnotationTransparent: "true",
		AnnotationExcludeOutboundCIDRs: "169.254.169.254/32"}}
	spec := corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Image: "a", Ports: []corev1.ContainerPort{{ContainerPort: 8080}}}}}
	if _, err := in.InjectPod(&meta, &spec); err != nil {
		t.Fatal(err)
	}
	if len(spec.InitContainers) != 2 || spec.InitContainers[0].Name != InitContainerName || spec.InitContainers[1].Name != ContainerName {
		t.Fatalf("init containers %v, want %s then %s", names(spec.InitContainers), InitContainerName, ContainerName)
	}
	if args := strings.Join(spec.InitContainers[0].Args, " "); !strings.Contains(args, "169.254.169.254/32") {
		t.Fatalf("redirect args %q lack the excluded CIDR", args)
	}
	if !slices.Contains(spec.InitContainers[1].Args, "--transparent=true") {
		t.Fatalf("sidecar args %v lack --transparent=true", spec.InitContainers[1].Args)
	}
	again := spec.DeepCopy()
	if _, err := in.InjectPod(&meta, again); err != nil || len(again.InitContainers) != 2 {
		t.Fatalf("injecting twice: %v, %d init containers; want it left as is", err, len(again.InitContainers))
	}
}

func names(cs []corev1.Container) []string {
	var out []string
	for _, c := range cs {
		out = append(out, c.Name)
	}
	return out
}

// What a pod's annotations make the injection add is bounded: a long
// no-proxy list is refused, and the proxy variables added to all of a
// pod's containers together are at most maxProxyEnvBytes, however many
// containers it has (a 200 KiB list times 100 containers made a 55 MB
// answer and 600 MB of allocations in the webhook).
func TestInjectionSizeIsBounded(t *testing.T) {
	in := newTestInjector(t, nil)
	many := func(n int) []corev1.Container {
		cs := make([]corev1.Container, n)
		for i := range cs {
			cs[i] = corev1.Container{Name: fmt.Sprintf("c%d", i), Image: "b"}
		}
		return cs
	}
	long := strings.TrimSuffix(strings.Repeat("a.b,", 50000), ",")
	sixtyFive := strings.TrimSuffix(strings.Repeat("a.example,", 65), ",")
	allowed := strings.TrimSuffix(strings.Repeat("service-"+strings.Repeat("x", 40)+".example,", 60), ",")
	for _, tc := range []struct {
		name       string
		value      string
		containers int
		want       string // "" : injected
	}{
		{"200 KiB list", long, 100, "bytes long, at most 4096"},
		{"65 entries", sixtyFive, 1, "65 entries, at most 64"},
		{"a long list in many containers", allowed, 400, "more than 262144 in all"},
		{"a long list in a few containers", allowed, 10, ""},
		{"the default list in many containers", "", 400, ""},
	} {
		meta := metav1.ObjectMeta{Annotations: map[string]string{AnnotationHTTPProxy: "true"}}
		if tc.value != "" {
			meta.Annotations[AnnotationNoProxyExtra] = tc.value
		}
		spec := corev1.PodSpec{Containers: many(tc.containers)}
		res, err := in.InjectPod(&meta, &spec)
		switch {
		case tc.want == "" && (err != nil || !res.Injected):
			t.Errorf("%s: %+v, %v; want injected", tc.name, res.Skipped, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%s: %v; want an error saying %q", tc.name, err, tc.want)
		}
	}
}

// A UDP port of the number of one of the sidecar's (TCP) ports is no
// collision; a TCP one is.
func TestOwnPortsAreTCP(t *testing.T) {
	in := newTestInjector(t, nil)
	for proto, ok := range map[corev1.Protocol]bool{corev1.ProtocolUDP: true, corev1.ProtocolTCP: false, "": false} {
		spec := corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Image: "b",
			Ports: []corev1.ContainerPort{{ContainerPort: 8080}, {ContainerPort: PortMetrics, Protocol: proto}}}}}
		meta := metav1.ObjectMeta{}
		_, err := in.InjectPod(&meta, &spec)
		if (err == nil) != ok {
			t.Errorf("a %q port %d: %v; want injected %v", proto, PortMetrics, err, ok)
		}
	}
}

// kubectl's default-container annotation naming an init container is
// kubectl's business: the pod is injected, the app taken to be the first
// container, and the user told. The sidecar's own annotation naming no
// container is an error.
func TestDefaultContainerAnnotationNamingNoApp(t *testing.T) {
	in := newTestInjector(t, nil)
	spec := func() *corev1.PodSpec {
		return &corev1.PodSpec{InitContainers: []corev1.Container{{Name: "setup", Image: "b"}},
			Containers: []corev1.Container{{Name: "web", Image: "b"}, {Name: "worker", Image: "b"}}}
	}
	meta := metav1.ObjectMeta{Annotations: map[string]string{defaultContainerAnnotation: "setup"}}
	res, err := in.InjectPod(&meta, spec())
	if err != nil || !res.Injected || len(res.Warnings) != 1 || !strings.Contains(res.Warnings[0], `the app is taken to be the first, "web"`) {
		t.Fatalf("kubectl's annotation naming an init container: %+v, %v; want injected with a warning", res, err)
	}
	meta = metav1.ObjectMeta{Annotations: map[string]string{AnnotationAppContainer: "setup"}}
	if _, err := in.InjectPod(&meta, spec()); err == nil || !strings.Contains(err.Error(), `no container named "setup"`) {
		t.Fatalf("the sidecar's annotation naming an init container: %v, want refused", err)
	}
}
