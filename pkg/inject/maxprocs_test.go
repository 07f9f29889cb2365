package inject

import (
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TestMaxProcs: the sidecar's GOMAXPROCS is its CPU limit rounded up to
// whole cores, through the downward API (Go's own default from a limit
// under 2 cores is 2); without a limit, DefaultMaxProcs rather than a
// thread per core of the node; a GOMAXPROCS in the injector's env wins.
func TestMaxProcs(t *testing.T) {
	for _, tc := range []struct {
		name      string
		ann       map[string]string
		env       []corev1.EnvVar
		wantValue string // a fixed value, or "" for the downward API's limits.cpu
	}{
		{"no CPU limit", nil, nil, "2"},
		{"a CPU limit", map[string]string{AnnotationCPULimit: "500m"}, nil, ""},
		{"the injector's env", map[string]string{AnnotationCPULimit: "4"}, []corev1.EnvVar{{Name: "GOMAXPROCS", Value: "3"}}, "3"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := newTestInjector(t, func(c *Config) { c.Env = tc.env })
			meta := metav1.ObjectMeta{Name: "p", Annotations: tc.ann}
			spec := corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Image: "a"}}}
			if res, err := in.InjectPod(&meta, &spec); err != nil || !res.Injected {
				t.Fatalf("InjectPod: %v, %+v", err, res)
			}
			c, _ := findContainer(&spec, ContainerName)
			if c == nil {
				t.Fatalf("no sidecar container in %+v", spec)
			}
			var found []corev1.EnvVar
			for _, e := range c.Env {
				if e.Name == "GOMAXPROCS" {
					found = append(found, e)
				}
			}
			if len(found) != 1 {
				t.Fatalf("GOMAXPROCS %d times in %+v, want once", len(found), c.Env)
			}
			e := found[0]
			if tc.wantValue != "" {
				if e.Value != tc.wantValue || e.ValueFrom != nil {
					t.Fatalf("GOMAXPROCS = %+v, want %q", e, tc.wantValue)
				}
				return
			}
			rf := e.ValueFrom
			if e.Value != "" || rf == nil || rf.ResourceFieldRef == nil || rf.ResourceFieldRef.Resource != "limits.cpu" ||
				rf.ResourceFieldRef.Divisor.String() != "1" {
				t.Fatalf("GOMAXPROCS = %+v, want limits.cpu with divisor 1 from the downward API", e)
			}
		})
	}
}
