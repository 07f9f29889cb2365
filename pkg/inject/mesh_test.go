package inject

import (
	"encoding/json"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// meshPod is a pod with an app on 8080 whose readiness probe the sidecar
// takes over, named by its label, with annotations.
func meshPod(annotations map[string]string) (metav1.ObjectMeta, corev1.PodSpec) {
	return metav1.ObjectMeta{Name: "orders", Labels: map[string]string{"app": "orders"}, Annotations: annotations},
		corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Image: "a",
			Ports: []corev1.ContainerPort{{ContainerPort: 8080}},
			ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{
				HTTPGet: &corev1.HTTPGetAction{Path: "/ready", Port: intstr.FromInt32(8080)}}},
		}}}
}

// TestInjectPodMesh: with the mesh annotation, the sidecar runs in the
// mesh and declares the mesh's port; the app's probes still go to the
// health port; injecting twice is injecting once. Off is no mesh at all,
// the pod the injector makes without the annotation.
func TestInjectPodMesh(t *testing.T) {
	in := newTestInjector(t, nil)
	inject := func(annotations map[string]string) (metav1.ObjectMeta, corev1.PodSpec, Result) {
		t.Helper()
		meta, spec := meshPod(annotations)
		res, err := in.InjectPod(&meta, &spec)
		if err != nil || !res.Injected {
			t.Fatalf("InjectPod with %v: got %+v, %v; want it injected", annotations, res, err)
		}
		return meta, spec, res
	}
	meta, spec, res := inject(map[string]string{AnnotationMesh: "consul-connect",
		AnnotationMeshPlaintextInbound: "allow", AnnotationConsulAddr: "$(HOST_IP):8500"})
	if len(res.Warnings) != 0 {
		t.Errorf("warnings %q, want none", res.Warnings)
	}
	sc := spec.InitContainers[0]
	wantArgs := []string{"run", "--app-port=8080", "--service=orders", "--consul-addr=$(HOST_IP):8500",
		"--mesh=consul-connect", "--mesh-plaintext-inbound=allow"}
	if !slices.Equal(sc.Args[:len(wantArgs)], wantArgs) {
		t.Errorf("sidecar args %q, want them to begin %q", sc.Args, wantArgs)
	}
	want := []corev1.ContainerPort{
		{Name: "sidecar-inbound", ContainerPort: PortInbound, Protocol: corev1.ProtocolTCP},
		{Name: "sidecar-mtls", ContainerPort: PortMeshTLS, Protocol: corev1.ProtocolTCP},
		{Name: "sidecar-health", ContainerPort: PortHealth, Protocol: corev1.ProtocolTCP},
		{Name: "sidecar-metrics", ContainerPort: PortMetrics, Protocol: corev1.ProtocolTCP},
	}
	if !slices.Equal(sc.Ports, want) {
		t.Errorf("sidecar ports %+v, want %+v", sc.Ports, want)
	}
	if p := spec.Containers[0].ReadinessProbe; p == nil || p.HTTPGet == nil || p.HTTPGet.Path != "/app-health/readyz" || p.HTTPGet.Port.IntValue() != PortHealth {
		t.Errorf("app readiness probe %+v, want GET /app-health/readyz on %d", p, PortHealth)
	}
	if !slices.ContainsFunc(sc.Args, func(a string) bool { return strings.HasPrefix(a, "--readiness-probe=http:/ready,") }) {
		t.Errorf("sidecar args %q lack the app's readiness probe", sc.Args)
	}

	// Injecting again leaves the pod as it is.
	again, againSpec := meta.DeepCopy(), spec.DeepCopy()
	if res, err := in.InjectPod(again, againSpec); err != nil || res.Injected || !equalJSON(t, again, &meta) || !equalJSON(t, againSpec, &spec) {
		t.Errorf("injecting twice: got %+v, %v; want the pod left as is", res, err)
	}

	// The status annotation's hash is the container's: another with the
	// mesh, the same with the mesh off as without the annotation.
	status := func(meta metav1.ObjectMeta) Status {
		t.Helper()
		var st Status
		if err := json.Unmarshal([]byte(meta.Annotations[AnnotationStatus]), &st); err != nil {
			t.Fatalf("status annotation %q: %v", meta.Annotations[AnnotationStatus], err)
		}
		return st
	}
	offMeta, offSpec, _ := inject(map[string]string{AnnotationMesh: "off"})
	noneMeta, noneSpec, _ := inject(nil)
	if on, off, none := status(meta), status(offMeta), status(noneMeta); on.Hash == none.Hash || off != none {
		t.Errorf("status with the mesh %+v, off %+v, without the annotation %+v; want the mesh's hash apart and off the same as none", on, off, none)
	}
	if !equalJSON(t, offSpec, &noneSpec) {
		t.Errorf("the mesh off injected %+v, want what no annotation injects, %+v", offSpec.InitContainers[0], noneSpec.InitContainers[0])
	}
	for _, a := range offSpec.InitContainers[0].Args {
		if strings.HasPrefix(a, "--mesh") {
			t.Errorf("the mesh off: sidecar arg %q, want no mesh flag", a)
		}
	}

	// The injector's Consul address serves as the pod's.
	in = newTestInjector(t, func(c *Config) { c.ConsulAddr = "consul.consul:8500" })
	_, spec, _ = inject(map[string]string{AnnotationMesh: "consul-connect"})
	if args := spec.InitContainers[0].Args; !slices.Contains(args, "--consul-addr=consul.consul:8500") || !slices.Contains(args, "--mesh=consul-connect") ||
		slices.ContainsFunc(args, func(a string) bool { return strings.HasPrefix(a, "--mesh-plaintext-inbound") }) {
		t.Errorf("sidecar args %q, want the injector's Consul address, --mesh=consul-connect and the sidecar's own plaintext setting", args)
	}
}

// TestInjectPodMeshRefused: a mesh value the sidecar would refuse, or a
// mesh the sidecar can't join (no Consul address, service or app port, a
// pod port on the mesh's), refuses the pod with the annotations named.
func TestInjectPodMeshRefused(t *testing.T) {
	in := newTestInjector(t, nil)
	consul := map[string]string{AnnotationConsulAddr: "consul:8500"}
	with := func(m map[string]string, kv ...string) map[string]string {
		out := map[string]string{}
		for k, v := range m {
			out[k] = v
		}
		for i := 0; i+1 < len(kv); i += 2 {
			out[kv[i]] = kv[i+1]
		}
		return out
	}
	field := func(a string) string { return "metadata.annotations[" + a + "]: " }
	cases := []struct {
		name        string
		annotations map[string]string
		spec        func(*corev1.PodSpec)
		labels      map[string]string
		want        []string
	}{
		{name: "upper case", annotations: with(consul, AnnotationMesh, "Consul-Connect"),
			want: []string{field(AnnotationMesh) + `"Consul-Connect" is not allowed (allowed: off, consul-connect)`}},
		{name: "true", annotations: with(consul, AnnotationMesh, "true"), want: []string{field(AnnotationMesh), "allowed: off, consul-connect"}},
		{name: "empty", annotations: with(consul, AnnotationMesh, ""), want: []string{field(AnnotationMesh), "allowed: off, consul-connect"}},
		{name: "trailing space", annotations: with(consul, AnnotationMesh, "consul-connect "), want: []string{field(AnnotationMesh), "not allowed"}},
		{name: "plaintext", annotations: with(consul, AnnotationMesh, "consul-connect", AnnotationMeshPlaintextInbound, "Deny"),
			want: []string{field(AnnotationMeshPlaintextInbound) + `"Deny" is not allowed (allowed: deny, allow)`}},
		{name: "plaintext empty", annotations: with(consul, AnnotationMesh, "consul-connect", AnnotationMeshPlaintextInbound, ""),
			want: []string{field(AnnotationMeshPlaintextInbound), "allowed: deny, allow"}},
		{name: "no Consul address", annotations: map[string]string{AnnotationMesh: "consul-connect"},
			want: []string{field(AnnotationMesh) + "consul-connect needs the Consul agent's address", AnnotationConsulAddr, "--consul-addr"}},
		{name: "no service", annotations: with(consul, AnnotationMesh, "consul-connect"), labels: map[string]string{},
			want: []string{field(AnnotationMesh) + "consul-connect needs the service name", AnnotationService, "app.kubernetes.io/name"}},
		{name: "no app port", annotations: with(consul, AnnotationMesh, "consul-connect"),
			spec: func(s *corev1.PodSpec) { s.Containers[0].Ports = nil },
			want: []string{field(AnnotationMesh) + "consul-connect needs the app port", AnnotationAppPort, `container "app"`}},
		{name: "app port annotation on the mesh's", annotations: with(consul, AnnotationMesh, "consul-connect", AnnotationAppPort, "15008"),
			want: []string{field(AnnotationAppPort) + "15008 is the mesh's port", "15000, 15001, 15006, 15008, 15020, 15090"}},
		{name: "container port on the mesh's", annotations: with(consul, AnnotationMesh, "consul-connect"),
			spec: func(s *corev1.PodSpec) {
				s.Containers = append(s.Containers, corev1.Container{Name: "tls", Image: "t", Ports: []corev1.ContainerPort{{ContainerPort: 15008}}})
			},
			want: []string{"spec.containers[1].ports[0].containerPort: 15008 is one of the sidecar's own ports (15000, 15001, 15006, 15008, 15020, 15090)"}},
		{name: "inbound port on the mesh's", annotations: with(consul, AnnotationMesh, "consul-connect", AnnotationTransparent, "true", AnnotationInboundPorts, "8080,15008"),
			want: []string{field(AnnotationInboundPorts) + "15008 is the mesh's port"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			meta, spec := meshPod(tc.annotations)
			if tc.labels != nil {
				meta.Labels = tc.labels
			}
			if tc.spec != nil {
				tc.spec(&spec)
			}
			before, beforeSpec := meta.DeepCopy(), spec.DeepCopy()
			res, err := in.InjectPod(&meta, &spec)
			for _, w := range tc.want {
				if err == nil || !strings.Contains(err.Error(), w) {
					t.Errorf("InjectPod with %v: got %+v, %v; want an error containing %q", tc.annotations, res, err, w)
				}
			}
			if !equalJSON(t, &meta, before) || !equalJSON(t, &spec, beforeSpec) {
				t.Errorf("InjectPod changed a pod it refused")
			}
		})
	}

	// Without the mesh, its port is the app's to use, and the plaintext
	// setting is only a warning.
	meta, spec := meshPod(map[string]string{AnnotationMesh: "off", AnnotationMeshPlaintextInbound: "deny"})
	spec.Containers[0].Ports = []corev1.ContainerPort{{ContainerPort: 15008}}
	res, err := in.InjectPod(&meta, &spec)
	if err != nil || !res.Injected || len(res.Warnings) != 1 || !strings.Contains(res.Warnings[0], AnnotationMeshPlaintextInbound+" has no effect without "+AnnotationMesh+": consul-connect") {
		t.Fatalf("the mesh off, the app on 15008, plaintext deny: got %+v, %v; want it injected with a warning about the plaintext setting", res, err)
	}
	if args := spec.InitContainers[0].Args; slices.ContainsFunc(args, func(a string) bool { return strings.HasPrefix(a, "--mesh") }) {
		t.Errorf("the mesh off: sidecar args %q, want no mesh flag", args)
	}
}

// TestInjectPodMeshTransparent: in transparent mode, the mesh's port is
// among the sidecar's own, never redirected inbound, so that peers'
// mutual TLS reaches it even with every inbound port redirected.
func TestInjectPodMeshTransparent(t *testing.T) {
	in := newTestInjector(t, nil)
	for _, tc := range []struct {
		mesh, want string
	}{
		{"consul-connect", "--own-ports=15000,15001,15006,15008,15020,15090"},
		{"off", "--own-ports=15000,15001,15006,15020,15090"},
	} {
		meta, spec := meshPod(map[string]string{AnnotationMesh: tc.mesh, AnnotationConsulAddr: "consul:8500",
			AnnotationTransparent: "true", AnnotationInboundPorts: "*"})
		if _, err := in.InjectPod(&meta, &spec); err != nil {
			t.Fatal(err)
		}
		if init := spec.InitContainers[0]; init.Name != InitContainerName || !slices.Contains(init.Args, tc.want) {
			t.Errorf("mesh %s: init container %s args %q, want %s", tc.mesh, init.Name, init.Args, tc.want)
		}
	}
}
