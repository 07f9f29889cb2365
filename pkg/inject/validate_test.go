package inject

import (
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/sidecar-mesh/sidecar/pkg/config"
)

// TestAnnotationsRefusedAsTheSidecarWould: each value the sidecar (or the
// kubelet) would refuse once the pod runs, leaving it crash-looping or
// stuck, is refused at injection with the annotation named; the values
// beside them are taken.
func TestAnnotationsRefusedAsTheSidecarWould(t *testing.T) {
	digest := "sha256:" + strings.Repeat("ab", 32)
	cases := []struct {
		annotation string
		bad        map[string]string // value: what the error says
		good       []string
	}{
		{AnnotationImage, map[string]string{
			"sidecar:1\r":            "is not an image reference",
			"sidecar\x00:1":          "is not an image reference",
			"Mesh/Sidecar:1":         "is not an image reference",
			"sidecar:1 --x":          "is not an image reference",
			"":                       "is not an image reference",
			"sidecar:" + tag(129):    "is not an image reference",
			"sidecar@sha256:abc":     "is not an image reference",
			strings.Repeat("a", 256): "longer than 255",
		}, []string{"sidecar", "registry.example.com:5000/mesh/sidecar:1.0.0", "sidecar@" + digest, "localhost/sidecar:dev", "[fd00::1]:5000/sidecar"}},
		{AnnotationInitImage, map[string]string{"sidecar-init:1\n": "is not an image reference"}, []string{"sidecar-init:1"}},
		{AnnotationConsulAddr, map[string]string{
			"consul/x:8500":         "want host:port",
			"consul:8500\n":         "want host:port",
			"consul:8500/v1":        "want host:port",
			"http://consul:8500/v1": "want host:port",
			"user@consul:8500":      "want host:port",
			"consul:0":              "want host:port",
			"$(NOPE):8500":          "want host:port",
			"x$(HOST_IP):8500":      "want host:port",
			"consul":                "want host:port",
		}, []string{"consul.consul:8500", "$(HOST_IP):8500", "$(POD_IP):8500", "http://consul:8500", "https://10.0.0.1:8501", "[fd00::1]:8500"}},
		{AnnotationMemoryRequest, map[string]string{"1": "memory 1 is not allowed (allowed: 32Mi to 64Gi)", "1Ti": "not allowed", "lots": "is not a quantity"}, []string{"32Mi", "100M"}},
		{AnnotationMemoryLimit, map[string]string{"1": "memory 1 is not allowed", "0": "not allowed", "-1Gi": "not allowed"}, []string{"128Mi", "none"}},
		{AnnotationCPURequest, map[string]string{"1e9": "cpu 1e9 is not allowed (allowed: 1m to 64)", "0.1m": "not allowed", "0": "not allowed"}, []string{"10m", "2"}},
		{AnnotationCPULimit, map[string]string{"65": "not allowed"}, []string{"500m", "none"}},
		{AnnotationConfigMap, map[string]string{"Bad_Name": "ConfigMap name", "cfg:a/b": "not a valid ConfigMap key", ":x": "ConfigMap name"}, []string{"cfg", "cfg:sidecar.yaml", "team.cfg:my_key"}},
		{AnnotationPolicyConfigMap, map[string]string{strings.Repeat("p", 254): "ConfigMap name"}, []string{"policies:p.yaml"}},
		{AnnotationAppContainer, map[string]string{"Main": "is not a container name", "": "is not a container name"}, []string{"app"}},
		{AnnotationDrainWindow, map[string]string{"11m": "is not allowed (allowed: 0s to 10m)", "-1s": "negative duration", "5": "invalid duration"}, []string{"0s", "10m", "1m30s"}},
		{AnnotationLogLevel, map[string]string{"trace": "allowed: debug, info, warn, error"}, []string{"debug"}},
		{AnnotationService, map[string]string{"Web_1": "is not a valid service name"}, []string{"web-1"}},
		{AnnotationAppPort, map[string]string{"15000": "one of the sidecar's own ports", "0x50": "is not a port number"}, []string{"8080"}},
	}
	in := newTestInjector(t, nil)
	for _, tc := range cases {
		field := "metadata.annotations[" + tc.annotation + "]: "
		for v, want := range tc.bad {
			meta, spec := validationPod(tc.annotation, v)
			_, err := in.InjectPod(&meta, &spec)
			if err == nil || !strings.Contains(err.Error(), field) || !strings.Contains(err.Error(), want) {
				t.Errorf("%s: %q: got %v, want an error naming the annotation and saying %q", tc.annotation, v, err, want)
			}
		}
		for _, v := range tc.good {
			meta, spec := validationPod(tc.annotation, v)
			if res, err := in.InjectPod(&meta, &spec); err != nil || !res.Injected {
				t.Errorf("%s: %q: got %v (injected %v), want it injected", tc.annotation, v, err, res.Injected)
			}
		}
	}
}

func tag(n int) string { return strings.Repeat("t", n) }

func validationPod(annotation, v string) (metav1.ObjectMeta, corev1.PodSpec) {
	return metav1.ObjectMeta{Name: "p", Annotations: map[string]string{annotation: v}},
		corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Image: "a", Ports: []corev1.ContainerPort{{ContainerPort: 8080}}}}}
}

// TestFlagsValidatedAsAnnotations: the injector's own settings (the flags
// of inject and webhook) are held to the same rules.
func TestFlagsValidatedAsAnnotations(t *testing.T) {
	cpu := func(v string) corev1.ResourceRequirements {
		return corev1.ResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceCPU: resourceQuantity(t, v)}}
	}
	for _, tc := range []struct {
		cfg  Config
		want string
	}{
		{Config{Image: "sidecar:1\r"}, "image: "},
		{Config{Image: "sidecar:1", ConsulAddr: "consul:8500/x"}, "consul address: "},
		{Config{Image: "sidecar:1", Resources: cpu("1e9")}, "cpu 1e9 is not allowed"},
		{Config{Image: "sidecar:1", Env: []corev1.EnvVar{{Name: "A B"}}}, `env: "A B" is not a variable name`},
		{Config{Image: "sidecar:1", Env: []corev1.EnvVar{{Name: config.AllowNonLoopbackAdminEnv, Value: "true"}}}, "--allow-non-loopback-admin"},
	} {
		if _, err := New(tc.cfg); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("New(%+v): got %v, want an error containing %q", tc.cfg, err, tc.want)
		}
	}
}

// TestProbesTheSidecarWouldRefuse: a probe the kubelet takes but the
// sidecar's probe flag can't (a period of 2^31-1 s, a readiness
// failureThreshold of 100000) stays with the kubelet, with a warning,
// instead of becoming a flag the sidecar refuses at every start. Startup
// and liveness thresholds are the kubelet's anyway.
func TestProbesTheSidecarWouldRefuse(t *testing.T) {
	in := newTestInjector(t, nil)
	probe := func(period, failures int32) *corev1.Probe {
		return &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/ready", Port: intstr.FromInt32(8080)}},
			PeriodSeconds: period, FailureThreshold: failures}
	}
	meta := metav1.ObjectMeta{Name: "p"}
	spec := corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Image: "a", Ports: []corev1.ContainerPort{{ContainerPort: 8080}},
		ReadinessProbe: probe(10, 100000), LivenessProbe: probe(1<<31-1, 3), StartupProbe: probe(10, 100000)}}}
	res, err := in.InjectPod(&meta, &spec)
	if err != nil || !res.Injected {
		t.Fatalf("InjectPod: %v, %+v", err, res)
	}
	args := spec.InitContainers[0].Args
	for _, k := range []string{"readiness", "liveness"} {
		if slices.ContainsFunc(args, func(a string) bool { return strings.HasPrefix(a, "--"+k+"-probe=") }) {
			t.Errorf("sidecar args %q: got a --%s-probe flag, want the probe left to the kubelet", args, k)
		}
	}
	if !slices.ContainsFunc(args, func(a string) bool { return strings.HasPrefix(a, "--startup-probe=") }) {
		t.Errorf("sidecar args %q: want the startup probe handed over", args)
	}
	for _, want := range []string{
		`readiness probe left to the kubelet: the sidecar would refuse it as its probe flag: probes.readiness.failureThreshold: 100000 is not allowed`,
		`liveness probe left to the kubelet: the sidecar would refuse it as its probe flag: probes.liveness.interval: 596523h14m7s is not allowed`,
	} {
		if !slices.ContainsFunc(res.Warnings, func(w string) bool { return strings.Contains(w, want) }) {
			t.Errorf("warnings %q: want one containing %q", res.Warnings, want)
		}
	}
	if p := spec.Containers[0].LivenessProbe; p.HTTPGet.Path != "/ready" || p.PeriodSeconds != 1<<31-1 {
		t.Errorf("liveness probe %+v: want the app's own, untouched", p)
	}
}

// TestAdminPinnedWithAConfigFile: a pod that brings its own config file
// gets --admin-addr on loopback (the flag beats the file); the operator's
// AllowNonLoopbackAdmin lifts it and tells the sidecar so instead.
func TestAdminPinnedWithAConfigFile(t *testing.T) {
	for _, allow := range []bool{false, true} {
		in := newTestInjector(t, func(c *Config) { c.AllowNonLoopbackAdmin = allow })
		for _, ann := range []map[string]string{nil, {AnnotationConfigMap: "cfg"}} {
			meta := metav1.ObjectMeta{Name: "p", Annotations: ann}
			spec := corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Image: "a"}}}
			if _, err := in.InjectPod(&meta, &spec); err != nil {
				t.Fatal(err)
			}
			sc := spec.InitContainers[0]
			pinned := slices.Contains(sc.Args, "--admin-addr=127.0.0.1:15000")
			allowed := slices.ContainsFunc(sc.Env, func(e corev1.EnvVar) bool { return e.Name == config.AllowNonLoopbackAdminEnv && e.Value == "true" })
			if want := ann != nil && !allow; pinned != want {
				t.Errorf("allow %v, annotations %v: --admin-addr pinned %v, want %v (args %q)", allow, ann, pinned, want, sc.Args)
			}
			if allowed != allow {
				t.Errorf("allow %v, annotations %v: %s set %v, want %v", allow, ann, config.AllowNonLoopbackAdminEnv, allowed, allow)
			}
		}
	}
}

func resourceQuantity(t *testing.T, v string) resource.Quantity {
	t.Helper()
	q, err := resource.ParseQuantity(v)
	if err != nil {
		t.Fatal(err)
	}
	return q
}
