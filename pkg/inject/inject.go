// Package inject adds the sidecar to Kubernetes pods: to the pod templates
// of workload manifests (`sidecar inject`) and to Pods under admission
// (`sidecar webhook`), both through InjectPod, so that the CLI and the
// webhook produce the same pod.
//
// The sidecar is a native sidecar by default: the first init container, with
// restartPolicy Always and a startupProbe on /healthz/sidecar, so that the
// kubelet starts the app only once the proxy is serving, stops it only after
// the app has exited, and lets Jobs complete. The classic form (a regular
// container, first in the list) is for clusters older than 1.29.
//
// The package is pure: no I/O beyond the readers and writers it is given,
// no cluster access, no globals.
package inject

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/sidecar-mesh/sidecar/pkg/config"
	"github.com/sidecar-mesh/sidecar/pkg/iptables"
	"github.com/sidecar-mesh/sidecar/pkg/policy"
)

// The sidecar's container name and ports (DESIGN.md, "Ports").
const (
	ContainerName = "sidecar"
	PortAdmin     = 15000
	PortOutbound  = 15001
	PortInbound   = 15006
	PortHealth    = 15020
	PortMetrics   = 15090
	// PortMeshTLS is the mesh's mutual-TLS inbound listener
	// (mesh.inboundTLS's default), the sidecar's only with the mesh on.
	PortMeshTLS = 15008
	// UID is the uid and gid the sidecar runs as (the image's user, and the
	// uid interception rules exempt).
	UID = 1337
)

// DefaultDrainWindow is the sidecar's own default (lifecycle.drainWindow).
const DefaultDrainWindow = 5 * time.Second

// defaultGracePeriod is Kubernetes' default terminationGracePeriodSeconds.
const defaultGracePeriod = 30

// Config is the injector's configuration: defaults that a pod's annotations
// may override. The zero value is not usable: Image is required.
type Config struct {
	// Image of the sidecar container. Required.
	Image string
	// ImagePullPolicy of the sidecar container. Empty: IfNotPresent.
	ImagePullPolicy corev1.PullPolicy
	// Version is recorded in the status annotation. Empty: "unknown".
	Version string
	// Classic injects a regular container instead of a native sidecar.
	Classic bool
	// LogLevel of the sidecar (--log-level). Empty: the sidecar's default.
	LogLevel string
	// DrainWindow of the sidecar (--drain-window). Zero: DefaultDrainWindow.
	DrainWindow time.Duration
	// ConsulAddr of the sidecar (--consul-addr). Empty: none passed.
	ConsulAddr string
	// HTTPProxy sets HTTP_PROXY/NO_PROXY in the app containers by default.
	HTTPProxy bool
	// NoProxyExtra are entries added to the NO_PROXY of HTTPProxy after
	// the fixed ones (see NoProxyDefault): IP addresses, CIDRs (the
	// cluster's pod and service ranges) or domain names with an optional
	// leading dot. Nil: none. A pod's AnnotationNoProxyExtra replaces them.
	NoProxyExtra []string
	// Env is added to the sidecar container's environment (after POD_IP,
	// POD_NAME, POD_NAMESPACE, HOST_IP and GOMEMLIMIT, which it may not
	// redefine), e.g. OTEL_EXPORTER_OTLP_ENDPOINT. A GOMAXPROCS here
	// replaces the injector's (see maxProcsEnv).
	Env []corev1.EnvVar
	// Resources of the sidecar container. Nil lists: DefaultResources.
	Resources corev1.ResourceRequirements
	// AllowNonLoopbackAdmin lets the sidecar's admin API listen on an
	// address other than loopback, if a pod's config file asks for one: the
	// sidecar gets config.AllowNonLoopbackAdminEnv=true. False: a pod with a
	// config file gets --admin-addr=127.0.0.1:15000, which beats the file,
	// and the sidecar refuses any other admin address.
	AllowNonLoopbackAdmin bool
}

// DefaultResources are the sidecar container's default requests and limits:
// enough for a few thousand requests per second; no CPU limit, so that the
// proxy on the request path is never throttled.
func DefaultResources() corev1.ResourceRequirements {
	return corev1.ResourceRequirements{
		Requests: corev1.ResourceList{
			corev1.ResourceCPU:    resource.MustParse("50m"),
			corev1.ResourceMemory: resource.MustParse("64Mi"),
		},
		Limits: corev1.ResourceList{
			corev1.ResourceMemory: resource.MustParse("256Mi"),
		},
	}
}

// Injector adds the sidecar to pods. It is immutable and safe for concurrent
// use.
type Injector struct {
	cfg Config
}

// New validates cfg and fills its defaults.
func New(cfg Config) (*Injector, error) {
	var errs []error
	if err := checkImage(cfg.Image); err != nil {
		errs = append(errs, fmt.Errorf("image: %w", err))
	}
	switch cfg.ImagePullPolicy {
	case "":
		cfg.ImagePullPolicy = corev1.PullIfNotPresent
	case corev1.PullAlways, corev1.PullIfNotPresent, corev1.PullNever:
	default:
		errs = append(errs, fmt.Errorf("image pull policy: %q (allowed: Always, IfNotPresent, Never)", cfg.ImagePullPolicy))
	}
	if cfg.Version == "" {
		cfg.Version = "unknown"
	}
	if cfg.LogLevel != "" {
		if err := config.CheckLogLevel(cfg.LogLevel); err != nil {
			errs = append(errs, fmt.Errorf("log level: %w", err))
		}
	}
	if cfg.DrainWindow == 0 {
		cfg.DrainWindow = DefaultDrainWindow
	}
	if err := config.CheckDrainWindow(cfg.DrainWindow); err != nil {
		errs = append(errs, fmt.Errorf("drain window: %w", err))
	}
	if cfg.ConsulAddr != "" {
		if err := checkConsulAddr(cfg.ConsulAddr); err != nil {
			errs = append(errs, fmt.Errorf("consul address: %w", err))
		}
	}
	if err := checkNoProxy(cfg.NoProxyExtra); err != nil {
		errs = append(errs, fmt.Errorf("no-proxy extra: %w", err))
	}
	std := map[string]bool{}
	for _, e := range standardEnv() {
		std[e.Name] = true
	}
	std["GOMEMLIMIT"] = true
	for _, e := range cfg.Env {
		bad := validation.IsEnvVarName(e.Name)
		switch {
		case len(bad) > 0:
			errs = append(errs, fmt.Errorf("env: %s is not a variable name: %s", policy.Quote(e.Name), strings.Join(bad, "; ")))
		case std[e.Name]:
			errs = append(errs, fmt.Errorf("env: %s is set by the injector", e.Name))
		case e.Name == config.AllowNonLoopbackAdminEnv:
			errs = append(errs, fmt.Errorf("env: %s: allow a non-loopback admin API with the injector's own setting (--allow-non-loopback-admin), which also stops it from pinning the admin address", e.Name))
		}
	}
	if cfg.Resources.Requests == nil {
		cfg.Resources.Requests = DefaultResources().Requests
	}
	if cfg.Resources.Limits == nil {
		cfg.Resources.Limits = DefaultResources().Limits
	}
	if err := checkResources(cfg.Resources); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	cfg.Env = append([]corev1.EnvVar(nil), cfg.Env...)
	cfg.NoProxyExtra = slices.Clone(cfg.NoProxyExtra)
	cfg.Resources = *cfg.Resources.DeepCopy()
	return &Injector{cfg: cfg}, nil
}

// Result says what InjectPod did.
type Result struct {
	// Injected is true when the pod was changed.
	Injected bool
	// Skipped says why the pod was left as is (empty when injected).
	Skipped string
	// Warnings are things the user should know (probes not rewritten, a
	// classic sidecar in a pod that runs to completion).
	Warnings []string
	// Patch is the change as JSON Patch operations on the pod's JSON, with
	// paths from the pod (or the pod template): /metadata/..., /spec/....
	// Empty when not injected.
	Patch []Operation
}

// Status is the value of AnnotationStatus (JSON).
type Status struct {
	Version string `json:"version"`
	Mode    string `json:"mode"` // "native" or "classic"
	// Hash identifies the injected container: the first 12 hex digits of
	// the SHA-256 of its JSON.
	Hash string `json:"hash"`
}

// FieldError is a problem with one field of the pod (template), by path
// (e.g. metadata.annotations[sidecar.mesh/app-port]).
type FieldError struct {
	Path   string
	Detail string
}

func (e *FieldError) Error() string { return e.Path + ": " + e.Detail }

// ErrorList is every problem found in a pod (template).
type ErrorList []*FieldError

func (l ErrorList) Error() string {
	s := make([]string, len(l))
	for i, e := range l {
		s[i] = e.Error()
	}
	return strings.Join(s, "; ")
}

// Prefixed returns the list with prefix (e.g. "spec.template.") before each
// path.
func (l ErrorList) Prefixed(prefix string) ErrorList {
	out := make(ErrorList, len(l))
	for i, e := range l {
		out[i] = &FieldError{Path: prefix + e.Path, Detail: e.Detail}
	}
	return out
}

func (l ErrorList) err() error {
	if len(l) == 0 {
		return nil
	}
	return l
}

// InjectPod adds the sidecar to a pod, or to a workload's pod template,
// changing meta and spec in place. A pod that opted out, runs on the host
// network or already has the sidecar is left untouched (Result.Skipped says
// why). An error (an ErrorList, paths relative to the pod) leaves meta and
// spec untouched.
func (in *Injector) InjectPod(meta *metav1.ObjectMeta, spec *corev1.PodSpec) (Result, error) {
	s, errs := in.settings(meta)
	for _, e := range errs {
		if strings.Contains(e.Path, "["+AnnotationInject+"]") {
			return Result{}, errs
		}
	}
	if !s.inject {
		return Result{Skipped: "opted out (" + AnnotationInject + " is false)"}, nil
	}
	if len(errs) > 0 {
		return Result{}, errs
	}
	if spec.HostNetwork {
		return Result{Skipped: "hostNetwork pod: the sidecar's ports would be the node's"}, nil
	}
	if why := otherMesh(meta, spec); why != "" {
		// Two proxies would each take the app's traffic and ports
		// (Istio's takes 15090 too): the pod keeps the one it has.
		return Result{Skipped: why, Warnings: []string{"not injected: " + why}}, nil
	}
	if why := windowsPod(spec); why != "" {
		// The sidecar is a Linux program, and the API server refuses a
		// Windows pod with its security context: injecting would block the
		// pod; skipping leaves it as it was.
		return Result{Skipped: "Windows pod (" + why + "): the sidecar runs on Linux nodes only",
			Warnings: []string{"not injected: a Windows pod (" + why + "); the sidecar runs on Linux nodes only"}}, nil
	}
	if c, where := findContainer(spec, ContainerName); c != nil {
		if _, ok := meta.Annotations[AnnotationStatus]; ok {
			return Result{Skipped: "already injected"}, nil
		}
		return Result{
			Skipped:  "a container named " + ContainerName + " exists",
			Warnings: []string{fmt.Sprintf("not injected: %s already has a container named %q and no %s annotation", where, ContainerName, AnnotationStatus)},
		}, nil
	}
	p, errs := in.plan(meta, spec, s)
	if len(errs) > 0 {
		return Result{}, errs
	}
	ops, err := p.apply(meta, spec)
	if err != nil {
		return Result{}, fmt.Errorf("recording the injection: %w", err)
	}
	return Result{Injected: true, Warnings: p.warnings, Patch: ops}, nil
}

// otherMesh says which other service mesh's proxy the pod has or asks
// for, "" when none.
func otherMesh(meta *metav1.ObjectMeta, spec *corev1.PodSpec) string {
	for _, cs := range [][]corev1.Container{spec.InitContainers, spec.Containers} {
		for _, c := range cs {
			switch c.Name {
			case "istio-proxy":
				return "the pod has Istio's proxy (container istio-proxy)"
			case "linkerd-proxy":
				return "the pod has Linkerd's proxy (container linkerd-proxy)"
			}
		}
	}
	switch v := meta.Annotations["linkerd.io/inject"]; v {
	case "enabled", "ingress":
		return "the pod asks for Linkerd's proxy (linkerd.io/inject: " + v + ")"
	}
	if strings.EqualFold(meta.Annotations["sidecar.istio.io/inject"], "true") || strings.EqualFold(meta.Labels["sidecar.istio.io/inject"], "true") {
		return "the pod asks for Istio's proxy (sidecar.istio.io/inject: true)"
	}
	return ""
}

// windowsPod says why spec is a Windows pod ("spec.os.name windows", "the
// node selector kubernetes.io/os: windows"), "" when it is not one.
func windowsPod(spec *corev1.PodSpec) string {
	switch {
	case spec.OS != nil && strings.EqualFold(string(spec.OS.Name), "windows"):
		return "spec.os.name windows"
	case strings.EqualFold(spec.NodeSelector["kubernetes.io/os"], "windows"):
		return "the node selector kubernetes.io/os: windows"
	}
	return ""
}

// plan is everything InjectPod will change, worked out before anything is.
type plan struct {
	s            podSettings
	container    corev1.Container
	appIndex     int
	probes       map[probeKind]*corev1.Probe // rewritten app probes
	volumes      []corev1.Volume
	grace        int64
	status       string
	defaultCtr   string // classic: kubectl's default container, when unset
	proxyEnv     []int  // indexes of containers that get HTTP_PROXY
	promAnnotate bool
	warnings     []string
	// redirect is the transparent mode's init container; nil without it.
	redirect *corev1.Container
}

func (in *Injector) plan(meta *metav1.ObjectMeta, spec *corev1.PodSpec, s podSettings) (*plan, ErrorList) {
	var errs ErrorList
	if len(spec.Containers) == 0 {
		return nil, ErrorList{{Path: "spec.containers", Detail: "the pod has no containers"}}
	}
	p := &plan{s: s, probes: map[probeKind]*corev1.Probe{}}

	// The app container.
	appName, from := s.appContainer, "metadata.annotations["+AnnotationAppContainer+"]"
	if appName == "" {
		appName, from = meta.Annotations[defaultContainerAnnotation], "metadata.annotations["+defaultContainerAnnotation+"]"
	}
	p.appIndex = 0
	if appName != "" {
		p.appIndex = -1
		for i := range spec.Containers {
			if spec.Containers[i].Name == appName {
				p.appIndex = i
			}
		}
		switch {
		case p.appIndex < 0 && s.appContainer == "":
			// kubectl's annotation is the user's, for kubectl: one that
			// names no app container (an init container, say) is no
			// reason to refuse a pod the API server takes.
			p.appIndex = 0
			p.warnings = append(p.warnings, fmt.Sprintf("%s names no container of spec.containers (%q): the app is taken to be the first, %q; set %s to choose",
				from, appName, spec.Containers[0].Name, AnnotationAppContainer))
		case p.appIndex < 0:
			return nil, ErrorList{{Path: from, Detail: fmt.Sprintf("no container named %q", appName)}}
		}
	}
	app := &spec.Containers[p.appIndex]
	own := s.ownPorts()
	if s.appPort == 0 {
		for _, cp := range app.Ports {
			if cp.Protocol == "" || cp.Protocol == corev1.ProtocolTCP {
				s.appPort = int(cp.ContainerPort)
				break
			}
		}
		if slices.Contains(own, s.appPort) {
			errs = append(errs, &FieldError{Path: fmt.Sprintf("spec.containers[%d].ports", p.appIndex),
				Detail: fmt.Sprintf("the app port %d is one of the sidecar's own ports (%s); set %s", s.appPort, portList(own, ", "), AnnotationAppPort)})
		}
	} else if s.mesh && s.appPort == PortMeshTLS {
		errs = append(errs, meshPortTaken(AnnotationAppPort, own))
	}

	// The sidecar's ports must be free in the pod's network namespace.
	for _, list := range []struct {
		field string
		cs    []corev1.Container
	}{{"spec.initContainers", spec.InitContainers}, {"spec.containers", spec.Containers}} {
		for i, c := range list.cs {
			for j, cp := range c.Ports {
				// The sidecar listens on TCP only: a UDP or SCTP port of the
				// same number is no collision.
				if (cp.Protocol == "" || cp.Protocol == corev1.ProtocolTCP) && slices.Contains(own, int(cp.ContainerPort)) {
					errs = append(errs, &FieldError{Path: fmt.Sprintf("%s[%d].ports[%d].containerPort", list.field, i, j),
						Detail: fmt.Sprintf("%d is one of the sidecar's own ports (%s)", cp.ContainerPort, portList(own, ", "))})
				}
			}
		}
	}

	// Config sources.
	var mounts []corev1.VolumeMount
	var args []string
	args = append(args, "run")
	if s.appPort != 0 {
		args = append(args, fmt.Sprintf("--app-port=%d", s.appPort))
	}
	if s.service != "" {
		args = append(args, "--service="+s.service)
	}
	for _, src := range []struct {
		name, key, volume, dir, flag string
	}{
		{s.configMap, s.configKey, "sidecar-config", "/etc/sidecar/config", "--config"},
		{s.policyMap, s.policyKey, "sidecar-policies", "/etc/sidecar/policies", "--policy-file"},
	} {
		if src.name == "" {
			continue
		}
		for i, v := range spec.Volumes {
			if v.Name == src.volume {
				errs = append(errs, &FieldError{Path: fmt.Sprintf("spec.volumes[%d].name", i),
					Detail: fmt.Sprintf("%q is the name of the sidecar's volume", v.Name)})
			}
		}
		// The whole ConfigMap is mounted (no subPath), so that the kubelet
		// updates the file and the sidecar's hot reload sees changes.
		p.volumes = append(p.volumes, corev1.Volume{Name: src.volume, VolumeSource: corev1.VolumeSource{
			ConfigMap: &corev1.ConfigMapVolumeSource{LocalObjectReference: corev1.LocalObjectReference{Name: src.name}},
		}})
		mounts = append(mounts, corev1.VolumeMount{Name: src.volume, MountPath: src.dir, ReadOnly: true})
		args = append(args, src.flag+"="+src.dir+"/"+src.key)
	}
	if s.configMap != "" && !in.cfg.AllowNonLoopbackAdmin {
		// The pod's config file may name any admin address; the flag beats
		// it, and keeps the admin API (drain, quit, the effective config)
		// to the pod itself.
		args = append(args, fmt.Sprintf("--admin-addr=127.0.0.1:%d", PortAdmin))
	}
	if s.consulAddr != "" {
		args = append(args, "--consul-addr="+s.consulAddr)
	}
	if s.mesh {
		errs = append(errs, meshNeeds(s, spec.Containers[p.appIndex].Name)...)
		args = append(args, "--mesh="+config.MeshConsulConnect)
		if s.plaintext != "" {
			args = append(args, "--mesh-plaintext-inbound="+s.plaintext)
		}
	} else if s.plaintext != "" {
		p.warnings = append(p.warnings, fmt.Sprintf("%s has no effect without %s: %s", AnnotationMeshPlaintextInbound, AnnotationMesh, config.MeshConsulConnect))
	}

	// The app's probes.
	if s.rewriteProbes {
		for _, k := range probeKinds {
			orig := k.of(app)
			if orig == nil {
				continue
			}
			flag, why := sidecarProbeFlag(k, orig, app, s.appPort)
			if why == "" {
				why = checkProbeFlag(k, flag)
			}
			if why != "" {
				p.warnings = append(p.warnings, fmt.Sprintf("container %q: %s probe left to the kubelet: %s", app.Name, k, why))
				continue
			}
			args = append(args, fmt.Sprintf("--%s-probe=%s", k, flag))
			p.probes[k] = kubeletProbe(k, orig)
		}
	}
	args = append(args, "--drain-window="+formatDuration(s.drainWindow))
	if s.logLevel != "" {
		args = append(args, "--log-level="+s.logLevel)
	}

	if s.transparent.Enabled {
		args = append(args, s.transparent.SidecarArgs()...)
		init := s.transparent.initContainer(s.image, in.cfg.ImagePullPolicy, own)
		p.redirect = &init
		if c, where := findContainer(spec, InitContainerName); c != nil {
			errs = append(errs, &FieldError{Path: where + ".name",
				Detail: fmt.Sprintf("%q is the name of transparent mode's init container", InitContainerName)})
		}
		if ports, _, _ := iptables.ParsePorts(s.transparent.InboundPorts, true); s.mesh && slices.Contains(ports, PortMeshTLS) {
			errs = append(errs, meshPortTaken(AnnotationInboundPorts, own))
		}
	}
	p.s = s
	p.container = in.sidecarContainer(s, args, mounts)
	if s.classic {
		// Held until the sidecar serves: the kubelet starts containers in
		// order and waits for each postStart hook. On the way out, the hook
		// drains (not ready, deregistered) and keeps the sidecar serving for
		// the drain window before it gets SIGTERM.
		p.container.Lifecycle = &corev1.Lifecycle{
			PostStart: &corev1.LifecycleHandler{Exec: &corev1.ExecAction{Command: []string{
				"/usr/local/bin/sidecar", "hook", "wait-ready", "--timeout=2m"}}},
			PreStop: &corev1.LifecycleHandler{Exec: &corev1.ExecAction{Command: []string{
				"/usr/local/bin/sidecar", "hook", "drain", "--wait=" + formatDuration(s.drainWindow)}}},
		}
		if _, ok := meta.Annotations[defaultContainerAnnotation]; !ok {
			p.defaultCtr = spec.Containers[p.appIndex].Name
		}
		if spec.RestartPolicy == corev1.RestartPolicyNever || spec.RestartPolicy == corev1.RestartPolicyOnFailure {
			p.warnings = append(p.warnings, "classic sidecar in a pod that runs to completion (restartPolicy "+string(spec.RestartPolicy)+"): the pod will not complete while the sidecar runs; use a native sidecar (Kubernetes 1.29+)")
		}
	} else {
		always := corev1.ContainerRestartPolicyAlways
		p.container.RestartPolicy = &always
	}

	// The pod's grace period covers the app's shutdown as before, plus the
	// sidecar's drain window after it (native: the kubelet stops the
	// sidecar once the app has exited; classic: the preStop hook).
	p.grace = defaultGracePeriod
	if spec.TerminationGracePeriodSeconds != nil {
		p.grace = *spec.TerminationGracePeriodSeconds
	}
	if add := int64(math.Ceil(s.drainWindow.Seconds())); p.grace > math.MaxInt64-add {
		p.grace = math.MaxInt64 // "for ever" stays for ever, never wraps round
	} else {
		p.grace += add
	}

	if s.noProxySet && !s.httpProxy {
		p.warnings = append(p.warnings, AnnotationNoProxyExtra+" has no effect without "+AnnotationHTTPProxy)
	}
	if s.httpProxy {
		for i := range spec.Containers {
			if !hasAnyEnv(&spec.Containers[i], "HTTP_PROXY", "http_proxy") {
				p.proxyEnv = append(p.proxyEnv, i)
			}
		}
		// The proxy variables go into every container: bounded, so that
		// no pod makes the injection's answer (and the injector's memory)
		// grow as its containers times its no-proxy list.
		if n := proxyEnvBytes(s.noProxyExtra) * len(p.proxyEnv); n > maxProxyEnvBytes {
			errs = append(errs, &FieldError{Path: "metadata.annotations[" + AnnotationHTTPProxy + "]",
				Detail: fmt.Sprintf("the proxy variables would add %d bytes of environment to %d containers, more than %d in all: shorten %s or set the variables in the containers yourself",
					n, len(p.proxyEnv), maxProxyEnvBytes, AnnotationNoProxyExtra)})
		}
	}
	if s.classic && s.transparent.Enabled && len(spec.InitContainers) > 0 {
		p.warnings = append(p.warnings, fmt.Sprintf("classic sidecar with transparent mode: the pod's %d init container(s) run after the redirect and before the sidecar serves, so their outbound TCP connections fail; use a native sidecar (Kubernetes 1.29+) or give them no network needs", len(spec.InitContainers)))
	}
	p.promAnnotate = true
	for k := range meta.Annotations {
		if strings.HasPrefix(k, "prometheus.io/") {
			p.promAnnotate = false
		}
	}

	cj, err := json.Marshal(p.container)
	if err != nil {
		errs = append(errs, &FieldError{Path: "spec", Detail: "encoding the sidecar container: " + err.Error()})
	}
	sum := sha256.Sum256(cj)
	mode := "native"
	if s.classic {
		mode = "classic"
	}
	st, _ := json.Marshal(Status{Version: in.cfg.Version, Mode: mode, Hash: hex.EncodeToString(sum[:6])})
	p.status = string(st)
	return p, errs
}

// apply makes the planned changes and returns them as JSON Patch
// operations on the pod's JSON (paths from the pod, or the template: /spec,
// /metadata). The operations are recorded from what is changed, so their
// number and size follow the change, never the pod's size. New fields are
// added in the order of the pod's JSON (the types' field order, sorted map
// keys), so that a manifest patched with them reads as one written that way.
func (p *plan) apply(meta *metav1.ObjectMeta, spec *corev1.PodSpec) ([]Operation, error) {
	r := &recorder{}
	// spec, in PodSpec's field order: volumes, initContainers, containers,
	// terminationGracePeriodSeconds.
	if len(p.volumes) > 0 {
		appendAll(r, "/spec/volumes", len(spec.Volumes), p.volumes)
		spec.Volumes = append(spec.Volumes, p.volumes...)
	}
	var first []corev1.Container // put before the existing init containers
	if p.redirect != nil {
		// Before everything, the native sidecar included: no container may
		// open a connection before the redirect is in place.
		first = append(first, *p.redirect)
	}
	if !p.s.classic {
		first = append(first, p.container)
	}
	if len(first) > 0 {
		prependAll(r, "/spec/initContainers", len(spec.InitContainers), first)
		spec.InitContainers = append(first, spec.InitContainers...)
	}
	// The existing containers first, at their indexes, then the classic
	// sidecar before them.
	for _, i := range p.proxyEnv {
		c := &spec.Containers[i]
		env := proxyEnv(p.s.noProxyExtra)
		appendAll(r, fmt.Sprintf("/spec/containers/%d/env", i), len(c.Env), env)
		c.Env = append(c.Env, env...)
	}
	app := &spec.Containers[p.appIndex]
	for _, k := range probeKinds {
		probe, ok := p.probes[k]
		if !ok {
			continue
		}
		r.diff(fmt.Sprintf("/spec/containers/%d/%sProbe", p.appIndex, k), *k.field(app), probe)
		*k.field(app) = probe
	}
	if p.s.classic {
		prependAll(r, "/spec/containers", len(spec.Containers), []corev1.Container{p.container})
		spec.Containers = append([]corev1.Container{p.container}, spec.Containers...)
	}
	grace := p.grace
	r.set("/spec/terminationGracePeriodSeconds", spec.TerminationGracePeriodSeconds != nil, grace)
	spec.TerminationGracePeriodSeconds = &grace

	// metadata.annotations, keys in sorted order.
	add := map[string]string{AnnotationStatus: p.status}
	if p.defaultCtr != "" {
		add[defaultContainerAnnotation] = p.defaultCtr
	}
	if p.promAnnotate {
		add["prometheus.io/scrape"] = "true"
		add["prometheus.io/port"] = fmt.Sprint(PortMetrics)
		add["prometheus.io/path"] = "/metrics"
	}
	if meta.Annotations == nil {
		r.set("/metadata/annotations", false, add)
		meta.Annotations = map[string]string{}
	} else {
		for _, k := range slices.Sorted(maps.Keys(add)) {
			_, exists := meta.Annotations[k]
			r.set("/metadata/annotations/"+escapePointer(k), exists, add[k])
		}
	}
	maps.Copy(meta.Annotations, add)
	return r.ops, r.err
}

// recorder collects JSON Patch operations with values from typed objects.
type recorder struct {
	ops []Operation
	err error // the first value that could not be encoded
}

func (r *recorder) node(v any) *yaml.Node {
	b, err := json.Marshal(v)
	if err == nil {
		var n *yaml.Node
		if n, err = jsonNode(b); err == nil {
			return n
		}
	}
	if r.err == nil {
		r.err = err
	}
	return nil
}

// set adds or replaces the value at path.
func (r *recorder) set(path string, exists bool, v any) {
	op := "add"
	if exists {
		op = "replace"
	}
	r.ops = append(r.ops, Operation{Op: op, Path: path, Value: r.node(v)})
}

// appendAll appends vs to the array at path, which has n elements.
func appendAll[T any](r *recorder, path string, n int, vs []T) {
	if n == 0 {
		r.ops = append(r.ops, Operation{Op: "add", Path: path, Value: r.node(vs)})
		return
	}
	for i, v := range vs {
		r.ops = append(r.ops, Operation{Op: "add", Path: path + "/" + strconv.Itoa(n+i), Value: r.node(v)})
	}
}

// prependAll puts vs, in order, before the n elements of the array at path.
func prependAll[T any](r *recorder, path string, n int, vs []T) {
	if n == 0 {
		r.ops = append(r.ops, Operation{Op: "add", Path: path, Value: r.node(vs)})
		return
	}
	for i, v := range vs {
		r.ops = append(r.ops, Operation{Op: "add", Path: path + "/" + strconv.Itoa(i), Value: r.node(v)})
	}
}

// diff records the changes from a to b, two values of one type at path, as
// Diff finds them: a probe rewritten in place keeps whatever of it did not
// change (a comment in a manifest, a field newer than these types).
func (r *recorder) diff(path string, a, b any) {
	x, y := r.node(a), r.node(b)
	if x == nil || y == nil {
		return
	}
	for _, op := range Diff(x, y) {
		op.Path = path + op.Path
		r.ops = append(r.ops, op)
	}
}

// sidecarContainer builds the sidecar container.
func (in *Injector) sidecarContainer(s podSettings, args []string, mounts []corev1.VolumeMount) corev1.Container {
	env := standardEnv()
	if _, ok := s.resources.Limits[corev1.ResourceMemory]; ok {
		// The Go runtime collects harder near the limit instead of being
		// OOM-killed by surprise.
		env = append(env, corev1.EnvVar{Name: "GOMEMLIMIT", ValueFrom: &corev1.EnvVarSource{
			ResourceFieldRef: &corev1.ResourceFieldSelector{Resource: "limits.memory", Divisor: resource.MustParse("1")}}})
	}
	if !slices.ContainsFunc(in.cfg.Env, func(e corev1.EnvVar) bool { return e.Name == "GOMAXPROCS" }) {
		env = append(env, maxProcsEnv(s.resources))
	}
	env = append(env, in.cfg.Env...)
	if in.cfg.AllowNonLoopbackAdmin {
		env = append(env, corev1.EnvVar{Name: config.AllowNonLoopbackAdminEnv, Value: "true"})
	}
	ports := []corev1.ContainerPort{
		{Name: "sidecar-health", ContainerPort: PortHealth, Protocol: corev1.ProtocolTCP},
		{Name: "sidecar-metrics", ContainerPort: PortMetrics, Protocol: corev1.ProtocolTCP},
	}
	if s.mesh {
		ports = append([]corev1.ContainerPort{{Name: "sidecar-mtls", ContainerPort: PortMeshTLS, Protocol: corev1.ProtocolTCP}}, ports...)
	}
	if s.appPort != 0 {
		ports = append([]corev1.ContainerPort{{Name: "sidecar-inbound", ContainerPort: PortInbound, Protocol: corev1.ProtocolTCP}}, ports...)
	}
	yes, no := true, false
	uid := int64(UID)
	return corev1.Container{
		Name:            ContainerName,
		Image:           s.image,
		ImagePullPolicy: in.cfg.ImagePullPolicy,
		Args:            args,
		Ports:           ports,
		Env:             env,
		Resources:       *s.resources.DeepCopy(),
		VolumeMounts:    mounts,
		// The startup probe holds the app containers back until the
		// outbound listener serves (native sidecar); /healthz/ready also
		// needs the app's readiness and is false while draining.
		StartupProbe:   healthProbe("/healthz/sidecar", 1, 120),
		ReadinessProbe: healthProbe("/healthz/ready", 2, 2),
		LivenessProbe:  healthProbe("/healthz/live", 10, 3),
		SecurityContext: &corev1.SecurityContext{
			RunAsNonRoot:             &yes,
			RunAsUser:                &uid,
			RunAsGroup:               &uid,
			ReadOnlyRootFilesystem:   &yes,
			AllowPrivilegeEscalation: &no,
			Privileged:               &no,
			Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
			SeccompProfile:           &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
		},
		TerminationMessagePolicy: corev1.TerminationMessageFallbackToLogsOnError,
	}
}

// DefaultMaxProcs is the sidecar's GOMAXPROCS when it has no CPU limit: the
// threads that run Go code, as Istio's proxies default to two workers. A
// proxy beside one app needs no thread per core of the node; each idle one
// is woken and spins at every request at low rates (at 1000 requests a
// second one thread costs 8-15% less CPU per request than two, with a
// lower p99: docs/benchmarks.md).
const DefaultMaxProcs = 2

// maxProcsEnv is the sidecar's GOMAXPROCS: its CPU limit rounded up (the
// downward API rounds limits.cpu up to whole cores: 500m is 1, where Go's
// own default from the limit would be 2), else DefaultMaxProcs.
func maxProcsEnv(r corev1.ResourceRequirements) corev1.EnvVar {
	if _, ok := r.Limits[corev1.ResourceCPU]; ok {
		return corev1.EnvVar{Name: "GOMAXPROCS", ValueFrom: &corev1.EnvVarSource{
			ResourceFieldRef: &corev1.ResourceFieldSelector{Resource: "limits.cpu", Divisor: resource.MustParse("1")}}}
	}
	return corev1.EnvVar{Name: "GOMAXPROCS", Value: strconv.Itoa(DefaultMaxProcs)}
}

func standardEnv() []corev1.EnvVar {
	field := func(name, path string) corev1.EnvVar {
		return corev1.EnvVar{Name: name, ValueFrom: &corev1.EnvVarSource{
			FieldRef: &corev1.ObjectFieldSelector{FieldPath: path}}}
	}
	return []corev1.EnvVar{
		field("POD_IP", "status.podIP"),
		field("POD_NAME", "metadata.name"),
		field("POD_NAMESPACE", "metadata.namespace"),
		field("HOST_IP", "status.hostIP"),
	}
}

// PodIPsEnv is the variable the injector adds to an app container that
// gets HTTP_PROXY: the pod's IP addresses (the downward API's
// status.podIPs, comma-separated), which NO_PROXY names as $(PodIPsEnv).
const PodIPsEnv = "SIDECAR_POD_IPS"

// NoProxyDefault is what NO_PROXY always holds: loopback, the pod's own
// addresses, and Kubernetes service DNS names. The sidecar routes services
// by the names discovery knows (user-service, user-service.service.consul),
// and those keep going through it; an IP address is refused there unless
// allowed, and NAME.NAMESPACE.svc[.cluster.local] is no Consul service, so
// through the sidecar both would fail where a direct call works.
var NoProxyDefault = []string{"localhost", "127.0.0.1", "::1", "$(" + PodIPsEnv + ")", ".svc", ".svc.cluster.local"}

// proxyEnv points the app's plain-HTTP clients at the outbound port, in
// both cases (curl and wget read only the lower-case names for http://
// URLs); TLS (HTTPS_PROXY) is left alone. NO_PROXY is NoProxyDefault and
// extra, after the variable it names.
// maxProxyEnvBytes bounds the proxy variables added to all of a pod's
// containers together.
const maxProxyEnvBytes = 256 << 10

// proxyEnvBytes is about what proxyEnv adds to one container.
func proxyEnvBytes(extra []string) int {
	n := 256 // the names, HTTP_PROXY's values, the pod IPs' field reference
	for _, e := range NoProxyDefault {
		n += 2 * (len(e) + 1)
	}
	for _, e := range extra {
		n += 2 * (len(e) + 1)
	}
	return n
}

func proxyEnv(extra []string) []corev1.EnvVar {
	proxy := fmt.Sprintf("http://127.0.0.1:%d", PortOutbound)
	noProxy := strings.Join(append(slices.Clone(NoProxyDefault), extra...), ",")
	return []corev1.EnvVar{
		{Name: PodIPsEnv, ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "status.podIPs"}}},
		{Name: "HTTP_PROXY", Value: proxy},
		{Name: "http_proxy", Value: proxy},
		{Name: "NO_PROXY", Value: noProxy},
		{Name: "no_proxy", Value: noProxy},
	}
}

func hasAnyEnv(c *corev1.Container, names ...string) bool {
	for _, e := range c.Env {
		for _, n := range names {
			if e.Name == n {
				return true
			}
		}
	}
	return false
}

func findContainer(spec *corev1.PodSpec, name string) (*corev1.Container, string) {
	for i := range spec.InitContainers {
		if spec.InitContainers[i].Name == name {
			return &spec.InitContainers[i], fmt.Sprintf("spec.initContainers[%d]", i)
		}
	}
	for i := range spec.Containers {
		if spec.Containers[i].Name == name {
			return &spec.Containers[i], fmt.Sprintf("spec.containers[%d]", i)
		}
	}
	return nil, ""
}

// meshNeeds checks that the sidecar gets what the mesh needs (the
// sidecar refuses to start without it): the service name (its identity),
// the app port (the mesh calls the app through the sidecar) and the Consul
// agent's address (certificates and intentions). app is the app
// container's name.
func meshNeeds(s podSettings, app string) ErrorList {
	var errs ErrorList
	need := func(what, set string) {
		errs = append(errs, &FieldError{Path: "metadata.annotations[" + AnnotationMesh + "]",
			Detail: fmt.Sprintf("%s needs %s: %s", config.MeshConsulConnect, what, set)})
	}
	if s.consulAddr == "" {
		need("the Consul agent's address (identities and intentions come from it)",
			"set "+AnnotationConsulAddr+" (e.g. $(HOST_IP):8500), or run the injector with --consul-addr")
	}
	if s.service == "" {
		need("the service name (the mesh identity is the service's)",
			"set "+AnnotationService+", or the label app.kubernetes.io/name or app")
	}
	if s.appPort == 0 {
		need("the app port (the mesh calls the app through the sidecar)",
			fmt.Sprintf("set %s, or give container %q a TCP containerPort", AnnotationAppPort, app))
	}
	return errs
}

// meshPortTaken is the error of an annotation naming PortMeshTLS, which
// the sidecar binds with the mesh on; own are its ports then.
func meshPortTaken(annotation string, own []int) *FieldError {
	return &FieldError{Path: "metadata.annotations[" + annotation + "]",
		Detail: fmt.Sprintf("%d is the mesh's port, one of the sidecar's own with %s: %s (%s)", PortMeshTLS, AnnotationMesh, config.MeshConsulConnect, portList(own, ", "))}
}

// fixedPorts are the ports the sidecar binds in every pod, ascending.
var fixedPorts = []int{PortAdmin, PortOutbound, PortInbound, PortHealth, PortMetrics}

// ownPorts are the ports the sidecar binds in the pod, ascending: the
// fixed ones, and PortMeshTLS with the mesh on.
func (s *podSettings) ownPorts() []int {
	if !s.mesh {
		return fixedPorts
	}
	ports := append(slices.Clone(fixedPorts), PortMeshTLS)
	slices.Sort(ports)
	return ports
}

// reserved says whether port is one the sidecar binds in every pod.
func reserved(port int) bool { return slices.Contains(fixedPorts, port) }

func reservedList() string { return portList(fixedPorts, ", ") }

// portList prints ports with sep between them.
func portList(ports []int, sep string) string {
	s := make([]string, len(ports))
	for i, p := range ports {
		s[i] = strconv.Itoa(p)
	}
	return strings.Join(s, sep)
}

// formatDuration prints d as the sidecar's flags read it: "5s", "1m30s",
// "500ms".
func formatDuration(d time.Duration) string {
	if d == 0 {
		return "0s"
	}
	return d.String()
}
