package inject

import (
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
)

func TestTransparentParse(t *testing.T) {
	var tr Transparent
	for name, v := range map[string]string{
		AnnotationTransparent:          "true",
		AnnotationInitImage:            "registry.local/sidecar-init:v2",
		AnnotationExcludeOutboundCIDRs: "169.254.169.254/32, fd00::/8",
		AnnotationExcludeOutboundPorts: "22,5432",
		AnnotationInboundPorts:         "*",
		AnnotationExcludeInboundPorts:  "9100",
	} {
		if err := tr.Parse(name, v); err != nil {
			t.Fatalf("Parse(%s, %q): %v", name, v, err)
		}
	}
	if !tr.Enabled || tr.InboundPorts != "*" || tr.ExcludeOutboundPorts != "22,5432" {
		t.Errorf("parsed %+v", tr)
	}
	for _, bad := range []struct{ name, v, want string }{
		{AnnotationTransparent, "yes", "allowed: true, false"},
		{AnnotationExcludeOutboundCIDRs, "10.0.0.0/33", "not a CIDR"},
		{AnnotationExcludeOutboundPorts, "*", `"*" is not allowed`},
		{AnnotationInboundPorts, "8080,15020", "one of the sidecar's own ports"},
		{AnnotationInitImage, "a b", "not an image"},
		{Prefix + "other", "x", "not a transparent-mode annotation"},
	} {
		var tr Transparent
		if err := tr.Parse(bad.name, bad.v); err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("Parse(%s, %q) = %v, want an error containing %q", bad.name, bad.v, err, bad.want)
		}
	}
}

func TestInitImageFor(t *testing.T) {
	for in, want := range map[string]string{
		"ghcr.io/x/sidecar:v1":        "ghcr.io/x/sidecar-init:v1",
		"sidecar":                     "sidecar-init",
		"localhost:5000/sidecar":      "localhost:5000/sidecar-init",
		"localhost:5000/sidecar:dev":  "localhost:5000/sidecar-init:dev",
		"ghcr.io/x/sidecar@sha256:ab": "ghcr.io/x/sidecar@sha256:ab",
	} {
		if got := InitImageFor(in); got != want {
			t.Errorf("InitImageFor(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestApplyTransparent(t *testing.T) {
	in, err := New(Config{Image: "ghcr.io/x/sidecar:v1"})
	if err != nil {
		t.Fatal(err)
	}
	pod := func() *corev1.Pod {
		return &corev1.Pod{Spec: corev1.PodSpec{
			InitContainers: []corev1.Container{{Name: "migrate", Image: "app"}},
			Containers:     []corev1.Container{{Name: "app", Image: "app", Ports: []corev1.ContainerPort{{ContainerPort: 8080}}}},
		}}
	}
	p := pod()
	if _, err := in.InjectPod(&p.ObjectMeta, &p.Spec); err != nil {
		t.Fatal(err)
	}
	if err := ApplyTransparent(&p.Spec, Transparent{}, in.cfg.Image, in.cfg.ImagePullPolicy); err != nil || len(p.Spec.InitContainers) != 2 {
		t.Fatalf("off: %v, %d init containers; want nothing changed", err, len(p.Spec.InitContainers))
	}
	tr := Transparent{Enabled: true, ExcludeOutboundPorts: "22", InboundPorts: "8080"}
	if err := ApplyTransparent(&p.Spec, tr, in.cfg.Image, in.cfg.ImagePullPolicy); err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, c := range p.Spec.InitContainers {
		names = append(names, c.Name)
	}
	if !slices.Equal(names, []string{InitContainerName, ContainerName, "migrate"}) {
		t.Fatalf("init containers %v, want the rules first, then the sidecar, then the pod's own", names)
	}
	init := p.Spec.InitContainers[0]
	wantArgs := []string{"iptables", "--proxy-uid=1337", "--proxy-port=15001", "--inbound-port=15006",
		"--own-ports=15000,15001,15006,15020,15090", "--exclude-ports=22", "--inbound-ports=8080"}
	if !slices.Equal(init.Args, wantArgs) || init.Image != "ghcr.io/x/sidecar-init:v1" {
		t.Errorf("init container image %s args %v, want ghcr.io/x/sidecar-init:v1 %v", init.Image, init.Args, wantArgs)
	}
	sc := init.SecurityContext
	if *sc.RunAsUser != 0 || *sc.RunAsNonRoot || *sc.Privileged || !slices.Equal(sc.Capabilities.Add, []corev1.Capability{"NET_ADMIN", "NET_RAW"}) {
		t.Errorf("init container security context %+v, want root with NET_ADMIN and NET_RAW only", sc)
	}
	if args := p.Spec.InitContainers[1].Args; !slices.Contains(args, "--transparent=true") {
		t.Errorf("sidecar args %v lack --transparent=true", args)
	}
	if err := ApplyTransparent(&p.Spec, tr, in.cfg.Image, in.cfg.ImagePullPolicy); err == nil {
		t.Error("a second ApplyTransparent succeeded; want an error (the init container exists)")
	}
	bare := pod()
	if err := ApplyTransparent(&bare.Spec, tr, in.cfg.Image, in.cfg.ImagePullPolicy); err == nil {
		t.Error("ApplyTransparent on a pod without the sidecar succeeded")
	}
}
