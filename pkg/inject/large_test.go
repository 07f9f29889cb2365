package inject

import (
	"encoding/json"
	"fmt"
	"runtime"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// largeN is the size of the arrays of the large pods: what made the
// webhook take gigabytes and more than the API server's 5 s timeout when
// every array was aligned with an (n+1)x(m+1) table.
const largeN = 20000

// largePods are pods with one large array each, and the annotations that
// make injection change that array.
func largePods() []struct {
	name string
	pod  corev1.Pod
} {
	app := func() corev1.Container {
		return corev1.Container{Name: "app", Image: "example.com/app:1", Ports: []corev1.ContainerPort{{ContainerPort: 8080}},
			ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{}}}}
	}
	pod := func(name string, ann map[string]string, mod func(*corev1.PodSpec)) corev1.Pod {
		p := corev1.Pod{
			TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"},
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "ns", Annotations: ann},
			Spec:       corev1.PodSpec{Containers: []corev1.Container{app()}},
		}
		mod(&p.Spec)
		return p
	}
	type tc = struct {
		name string
		pod  corev1.Pod
	}
	return []tc{
		{"args", pod("args", nil, func(s *corev1.PodSpec) {
			for range largeN {
				s.Containers[0].Args = append(s.Containers[0].Args, "-v")
			}
		})},
		{"env, HTTP_PROXY added", pod("env", map[string]string{AnnotationHTTPProxy: "true"}, func(s *corev1.PodSpec) {
			for i := range largeN {
				s.Containers[0].Env = append(s.Containers[0].Env, corev1.EnvVar{Name: fmt.Sprintf("E%d", i), Value: "v"})
			}
		})},
		{"containers of one name, classic sidecar added", pod("containers", map[string]string{AnnotationClassic: "true"}, func(s *corev1.PodSpec) {
			for range largeN - 1 {
				s.Containers = append(s.Containers, corev1.Container{Name: "c", Image: "c"})
			}
		})},
		{"volumes, the config volume added", pod("volumes", map[string]string{AnnotationConfigMap: "cfg"}, func(s *corev1.PodSpec) {
			for i := range largeN {
				s.Volumes = append(s.Volumes, corev1.Volume{Name: fmt.Sprintf("v%d", i)})
			}
		})},
		{"init containers, the sidecar added first", pod("init", nil, func(s *corev1.PodSpec) {
			for range largeN {
				s.InitContainers = append(s.InitContainers, corev1.Container{Name: "i", Image: "i"})
			}
		})},
	}
}

// TestReviewLargePod: a pod with a 20,000-element array is answered with
// memory in proportion to its size, and well inside the API server's
// timeout; its patch changes only what injection changed.
func TestReviewLargePod(t *testing.T) {
	in := newTestInjector(t, nil)
	for _, tc := range largePods() {
		t.Run(tc.name, func(t *testing.T) {
			obj, err := json.Marshal(&tc.pod)
			if err != nil {
				t.Fatal(err)
			}
			body := admissionRequest(t, "CREATE", "pods", obj)
			var before, after runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			start := time.Now()
			review, d, err := in.Review(body)
			took := time.Since(start)
			runtime.ReadMemStats(&after)
			if err != nil || !d.Injected {
				t.Fatalf("Review of a %d-byte pod: %v, decision %+v; want it injected", len(obj), err, d)
			}
			// Mostly the pod's typed form (about 1 KB a container): 10 to 60
			// bytes per byte of input. Aligning the arrays with a table took
			// 3 GB for the 100 KB of args.
			alloc := after.TotalAlloc - before.TotalAlloc
			if limit := uint64(100 * len(body)); alloc > limit {
				t.Errorf("Review of a %d-byte pod allocated %d MB, want at most %d MB (100 bytes per byte of input)", len(body), alloc>>20, limit>>20)
			}
			if d.Patch > 20 {
				t.Errorf("Review of a %d-byte pod: %d patch operations, want at most 20 (the array's unchanged elements are not in the patch)", len(body), d.Patch)
			}
			// A guard, not the measure: the API server gives up at 5 s.
			if took > 5*time.Second {
				t.Errorf("Review of a %d-byte pod took %s, want well under the API server's 5s", len(body), took)
			}
			patched := applyJSONPatch(t, obj, review.Response.Patch)
			want := tc.pod.DeepCopy()
			if _, err := in.InjectPod(&want.ObjectMeta, &want.Spec); err != nil {
				t.Fatal(err)
			}
			wantJSON, _ := json.Marshal(want)
			if !jsonEqual(t, patched, wantJSON) {
				t.Errorf("the patch applied to the pod is not the injected pod")
			}
			t.Logf("%d-byte review: %d MB allocated, %d patch operations, %s", len(body), alloc>>20, d.Patch, took.Round(time.Millisecond))
		})
	}
}

// TestDiffLargeArrays counts the element comparisons Diff makes on arrays
// of 20,000: in proportion to their length, whatever changed.
func TestDiffLargeArrays(t *testing.T) {
	list := func(mod func([]string) []string) *yaml.Node {
		s := make([]string, largeN)
		for i := range s {
			s[i] = fmt.Sprintf("a%d", i)
		}
		n := &yaml.Node{Kind: yaml.SequenceNode, Tag: "!!seq"}
		for _, v := range mod(s) {
			n.Content = append(n.Content, &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!str", Value: v})
		}
		return n
	}
	same := func(s []string) []string { return s }
	for _, tc := range []struct {
		name string
		b    func([]string) []string
		ops  int
	}{
		{"equal", same, 0},
		{"one first", func(s []string) []string { return append([]string{"new"}, s...) }, 1},
		{"one last", func(s []string) []string { return append(s, "new") }, 1},
		{"one changed in the middle", func(s []string) []string { s[largeN/2] = "new"; return s }, 2},
		{"all different", func(s []string) []string {
			for i := range s {
				s[i] = "b" + s[i]
			}
			return s
		}, 1},
	} {
		a, b := list(same), list(tc.b)
		d := &differ{}
		d.diff(a, b, "")
		if d.steps > 4*(len(a.Content)+len(b.Content)) {
			t.Errorf("%s: Diff of arrays of %d and %d made %d comparisons, want at most %d", tc.name, len(a.Content), len(b.Content), d.steps, 4*(len(a.Content)+len(b.Content)))
		}
		if len(d.ops) != tc.ops {
			t.Errorf("%s: Diff gave %d operations, want %d", tc.name, len(d.ops), tc.ops)
		}
		if err := Apply(a, d.ops); err != nil || !equal(a, b) {
			t.Errorf("%s: Apply(Diff(a, b)) to a: %v, or not b", tc.name, err)
		}
	}
}
