package inject

import (
	"fmt"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"

	"github.com/sidecar-mesh/sidecar/pkg/iptables"
)

// Transparent mode: for apps that can't be pointed at 127.0.0.1:15001, an
// init container runs `sidecar iptables` (NET_ADMIN, as root, before every
// other container) so that the pod's outbound TCP is redirected to the
// sidecar, and the sidecar runs with --transparent=true to serve it.
//
// Pods without the annotation are unchanged.

// Annotations of transparent mode.
const (
	// AnnotationTransparent "true" adds the init container that redirects
	// the pod's TCP to the sidecar, and runs the sidecar with
	// --transparent=true. Default false.
	AnnotationTransparent = Prefix + "transparent"
	// AnnotationInitImage is the image of that init container; it needs the
	// sidecar binary and iptables (the Dockerfile's "init" target). Default:
	// the sidecar image with "-init" after its repository name.
	AnnotationInitImage = Prefix + "init-image"
	// AnnotationExcludeOutboundCIDRs lists destinations never redirected
	// (comma-separated CIDRs or addresses), e.g. 169.254.169.254/32.
	AnnotationExcludeOutboundCIDRs = Prefix + "exclude-outbound-cidrs"
	// AnnotationIncludeOutboundCIDRs lists the only destinations redirected;
	// default all ("*").
	AnnotationIncludeOutboundCIDRs = Prefix + "include-outbound-cidrs"
	// AnnotationExcludeOutboundPorts lists destination ports never
	// redirected, e.g. 22 or a database's port.
	AnnotationExcludeOutboundPorts = Prefix + "exclude-outbound-ports"
	// AnnotationInboundPorts lists the pod's ports whose inbound TCP is
	// redirected to the sidecar's inbound port ("*" for all). Default none:
	// peers' sidecars reach 15006 directly.
	AnnotationInboundPorts = Prefix + "inbound-ports"
	// AnnotationExcludeInboundPorts lists ports never redirected inbound.
	AnnotationExcludeInboundPorts = Prefix + "exclude-inbound-ports"
)

// InitContainerName is the name of the init container of transparent mode.
const InitContainerName = "sidecar-init"

// TransparentAnnotations lists the annotations Transparent.Parse reads.
var TransparentAnnotations = []string{
	AnnotationTransparent, AnnotationInitImage,
	AnnotationIncludeOutboundCIDRs, AnnotationExcludeOutboundCIDRs, AnnotationExcludeOutboundPorts,
	AnnotationInboundPorts, AnnotationExcludeInboundPorts,
}

// Transparent is a pod's transparent-mode settings, from its annotations.
// The zero value is off. Values are kept as given once validated, and
// passed to `sidecar iptables` as they are.
type Transparent struct {
	Enabled              bool
	InitImage            string
	IncludeOutboundCIDRs string
	ExcludeOutboundCIDRs string
	ExcludeOutboundPorts string
	InboundPorts         string
	ExcludeInboundPorts  string
}

// Parse validates the value of annotation name (one of
// TransparentAnnotations) and sets it.
func (t *Transparent) Parse(name, v string) error {
	cidrs := func(dst *string) error {
		if _, err := iptables.ParseCIDRs(v); err != nil {
			return err
		}
		*dst = strings.TrimSpace(v)
		return nil
	}
	ports := func(dst *string, all bool) error {
		if _, _, err := iptables.ParsePorts(v, all); err != nil {
			return err
		}
		*dst = strings.TrimSpace(v)
		return nil
	}
	switch name {
	case AnnotationTransparent:
		on, err := parseBool(v)
		t.Enabled = on
		return err
	case AnnotationInitImage:
		if err := checkImage(v); err != nil {
			return err
		}
		t.InitImage = v
		return nil
	case AnnotationIncludeOutboundCIDRs:
		return cidrs(&t.IncludeOutboundCIDRs)
	case AnnotationExcludeOutboundCIDRs:
		return cidrs(&t.ExcludeOutboundCIDRs)
	case AnnotationExcludeOutboundPorts:
		return ports(&t.ExcludeOutboundPorts, false)
	case AnnotationInboundPorts:
		if p, _, err := iptables.ParsePorts(v, true); err == nil {
			for _, port := range p {
				if reserved(int(port)) {
					return fmt.Errorf("%d is one of the sidecar's own ports (%s)", port, reservedList())
				}
			}
		}
		return ports(&t.InboundPorts, true)
	case AnnotationExcludeInboundPorts:
		return ports(&t.ExcludeInboundPorts, false)
	}
	return fmt.Errorf("not a transparent-mode annotation: %s", name)
}

// SidecarArgs are the flags the sidecar container gains in transparent
// mode.
func (t Transparent) SidecarArgs() []string { return []string{"--transparent=true"} }

// InitImageFor is the default init image for a sidecar image: "-init"
// after the repository name ("ghcr.io/x/sidecar:v1" gives
// "ghcr.io/x/sidecar-init:v1"). An image pinned by digest has no such
// sibling: it is returned as is, and AnnotationInitImage must name one.
func InitImageFor(image string) string {
	if strings.Contains(image, "@") {
		return image
	}
	slash := strings.LastIndexByte(image, '/')
	if colon := strings.LastIndexByte(image, ':'); colon > slash {
		return image[:colon] + "-init" + image[colon:]
	}
	return image + "-init"
}

// InitContainer is the init container that installs the redirect rules:
// `sidecar iptables` as root with NET_ADMIN and NET_RAW only, exempting
// the sidecar's uid. sidecarImage gives the default init image.
func (t Transparent) InitContainer(sidecarImage string, pull corev1.PullPolicy) corev1.Container {
	return t.initContainer(sidecarImage, pull, fixedPorts)
}

// initContainer is InitContainer for a sidecar that binds own, the ports
// never redirected inbound (with the mesh on, its port too).
func (t Transparent) initContainer(sidecarImage string, pull corev1.PullPolicy, own []int) corev1.Container {
	args := []string{"iptables",
		fmt.Sprintf("--proxy-uid=%d", UID),
		fmt.Sprintf("--proxy-port=%d", PortOutbound),
		fmt.Sprintf("--inbound-port=%d", PortInbound),
		"--own-ports=" + portList(own, ","),
	}
	for _, f := range []struct{ flag, v string }{
		{"--include-cidrs", t.IncludeOutboundCIDRs},
		{"--exclude-cidrs", t.ExcludeOutboundCIDRs},
		{"--exclude-ports", t.ExcludeOutboundPorts},
		{"--inbound-ports", t.InboundPorts},
		{"--exclude-inbound-ports", t.ExcludeInboundPorts},
	} {
		if f.v != "" {
			args = append(args, f.flag+"="+f.v)
		}
	}
	image := t.InitImage
	if image == "" {
		image = InitImageFor(sidecarImage)
	}
	root, no := int64(0), false
	return corev1.Container{
		Name:            InitContainerName,
		Image:           image,
		ImagePullPolicy: pull,
		Command:         []string{"/usr/local/bin/sidecar"},
		Args:            args,
		Resources: corev1.ResourceRequirements{
			Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("10m"), corev1.ResourceMemory: resource.MustParse("16Mi")},
			Limits:   corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("64Mi")},
		},
		SecurityContext: &corev1.SecurityContext{
			RunAsUser:    &root,
			RunAsGroup:   &root,
			RunAsNonRoot: &no,
			// iptables takes its lock under /run.
			ReadOnlyRootFilesystem:   &no,
			AllowPrivilegeEscalation: &no,
			Privileged:               &no,
			Capabilities: &corev1.Capabilities{
				Add:  []corev1.Capability{"NET_ADMIN", "NET_RAW"},
				Drop: []corev1.Capability{"ALL"},
			},
			SeccompProfile: &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
		},
		TerminationMessagePolicy: corev1.TerminationMessageFallbackToLogsOnError,
	}
}

// ApplyTransparent adds transparent mode to a pod the sidecar was injected
// into (its container named ContainerName): the init container first in
// spec.initContainers and SidecarArgs on the sidecar. For callers that
// inject first and then add transparent mode; with the hook in InjectPod
// described above it is not needed. It does nothing when t is off, and
// fails when the pod has no sidecar or already has the init container.
func ApplyTransparent(spec *corev1.PodSpec, t Transparent, sidecarImage string, pull corev1.PullPolicy) error {
	if !t.Enabled {
		return nil
	}
	sc, _ := findContainer(spec, ContainerName)
	if sc == nil {
		return fmt.Errorf("transparent mode: the pod has no %q container", ContainerName)
	}
	if c, where := findContainer(spec, InitContainerName); c != nil {
		return fmt.Errorf("transparent mode: %s is already named %q", where, InitContainerName)
	}
	sc.Args = append(sc.Args, t.SidecarArgs()...)
	spec.InitContainers = append([]corev1.Container{t.InitContainer(sidecarImage, pull)}, spec.InitContainers...)
	return nil
}
