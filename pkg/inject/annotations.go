package inject

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/sidecar-mesh/sidecar/pkg/config"
	"github.com/sidecar-mesh/sidecar/pkg/policy"
)

// Prefix is the prefix of every annotation (and the opt-out label) the
// injector reads or writes.
const Prefix = "sidecar.mesh/"

// Annotations on a pod (or a workload's pod template) that steer injection.
// Every value is validated; an unknown annotation under Prefix is an error,
// so that a typo is not silently ignored.
const (
	// AnnotationInject "false" (or "disabled") leaves the pod alone; "true"
	// (or "enabled") is the default. The label of the same name opts out too
	// and is what the webhook's objectSelector matches.
	AnnotationInject = Prefix + "inject"
	// AnnotationStatus is written by the injector: the version, mode and
	// hash of what was injected. A pod carrying it and a container named
	// "sidecar" is already injected and left as is.
	AnnotationStatus = Prefix + "status"
	// AnnotationImage overrides the sidecar image.
	AnnotationImage = Prefix + "image"
	// AnnotationAppPort is the app's port (--app-port). Default: the first
	// TCP containerPort of the app container.
	AnnotationAppPort = Prefix + "app-port"
	// AnnotationAppContainer names the app container, whose probes are
	// handed to the sidecar. Default: kubectl.kubernetes.io/default-container,
	// else the first container.
	AnnotationAppContainer = Prefix + "app-container"
	// AnnotationService is the app's service name (--service). Default: the
	// pod label app.kubernetes.io/name, else app.
	AnnotationService = Prefix + "service"
	// AnnotationConfigMap is NAME[:KEY] of a ConfigMap holding the sidecar's
	// config file (--config); KEY defaults to sidecar.yaml.
	AnnotationConfigMap = Prefix + "config-map"
	// AnnotationPolicyConfigMap is NAME[:KEY] of a ConfigMap holding Policy
	// documents (--policy-file, hot-reloaded); KEY defaults to policies.yaml.
	AnnotationPolicyConfigMap = Prefix + "policy-config-map"
	// AnnotationConsulAddr is the Consul agent's host:port (--consul-addr).
	// $(HOST_IP):8500 reaches an agent on the node.
	AnnotationConsulAddr = Prefix + "consul-addr"
	// Resources of the sidecar container (Kubernetes quantities); "none"
	// drops the injector's default for a limit.
	AnnotationCPURequest    = Prefix + "cpu-request"
	AnnotationCPULimit      = Prefix + "cpu-limit"
	AnnotationMemoryRequest = Prefix + "memory-request"
	AnnotationMemoryLimit   = Prefix + "memory-limit"
	// AnnotationLogLevel is the sidecar's log level (--log-level).
	AnnotationLogLevel = Prefix + "log-level"
	// AnnotationDrainWindow is the sidecar's drain window (--drain-window);
	// the pod's terminationGracePeriodSeconds grows by it.
	AnnotationDrainWindow = Prefix + "drain-window"
	// AnnotationClassic "true" injects a regular container instead of a
	// native sidecar, for clusters older than 1.29.
	AnnotationClassic = Prefix + "classic"
	// AnnotationHTTPProxy "true" sets HTTP_PROXY/NO_PROXY (and the lower-case
	// forms) in the app containers, so that their plain-HTTP calls go
	// through the sidecar.
	AnnotationHTTPProxy = Prefix + "http-proxy"
	// AnnotationNoProxyExtra is a comma-separated list of entries added to
	// the NO_PROXY of AnnotationHTTPProxy (IP addresses, CIDRs, domain
	// names with an optional leading dot), e.g. the cluster's pod and
	// service CIDRs. It replaces the injector's --no-proxy-extra.
	AnnotationNoProxyExtra = Prefix + "no-proxy-extra"
	// AnnotationRewriteProbes "false" keeps the app's probes as they are
	// (the kubelet probes the app directly; the sidecar does not know the
	// app's readiness).
	AnnotationRewriteProbes = Prefix + "rewrite-probes"
	// AnnotationMesh is the service mesh (--mesh): consul-connect (the
	// sidecar's identity, mutual TLS and intentions from the Consul agent;
	// it listens on PortMeshTLS too) or off, the default. consul-connect
	// needs the service name, the app port and a Consul address
	// (AnnotationConsulAddr or the injector's).
	AnnotationMesh = Prefix + "mesh"
	// AnnotationMeshPlaintextInbound is, in the mesh, deny (the plaintext
	// inbound listener serves loopback callers only) or allow
	// (--mesh-plaintext-inbound). Default: the sidecar's, deny.
	AnnotationMeshPlaintextInbound = Prefix + "mesh-plaintext-inbound"
)

// defaultContainerAnnotation is kubectl's: the container kubectl exec and
// logs use by default.
const defaultContainerAnnotation = "kubectl.kubernetes.io/default-container"

// KnownAnnotations lists the annotations under Prefix, sorted.
func KnownAnnotations() []string {
	out := make([]string, 0, len(annotationParsers)+1)
	for k := range annotationParsers {
		out = append(out, k)
	}
	out = append(out, AnnotationStatus)
	slices.Sort(out)
	return out
}

// podSettings are the injector's configuration with a pod's annotations
// applied.
type podSettings struct {
	inject        bool
	image         string
	appPort       int // 0: infer
	appContainer  string
	service       string
	configMap     string
	configKey     string
	policyMap     string
	policyKey     string
	consulAddr    string
	resources     corev1.ResourceRequirements
	logLevel      string
	drainWindow   time.Duration
	classic       bool
	httpProxy     bool
	noProxyExtra  []string
	noProxySet    bool // noProxyExtra is the pod's annotation
	rewriteProbes bool
	transparent   Transparent
	mesh          bool   // consul-connect
	plaintext     string // mesh-plaintext-inbound; empty: the sidecar's default
}

type annotationParser func(s *podSettings, v string) error

func init() {
	for _, name := range TransparentAnnotations {
		annotationParsers[name] = func(s *podSettings, v string) error { return s.transparent.Parse(name, v) }
	}
}

var annotationParsers = map[string]annotationParser{
	AnnotationInject: nil, // read by settings, with the label of the same name
	AnnotationImage: func(s *podSettings, v string) error {
		if err := checkImage(v); err != nil {
			return err
		}
		s.image = v
		return nil
	},
	AnnotationAppPort: func(s *podSettings, v string) error {
		p, err := strconv.Atoi(v)
		if err != nil || p < 1 || p > 65535 {
			return fmt.Errorf("%s is not a port number (allowed: 1 to 65535)", policy.Quote(v))
		}
		if reserved(p) {
			return fmt.Errorf("%d is one of the sidecar's own ports (%s)", p, reservedList())
		}
		s.appPort = p
		return nil
	},
	AnnotationAppContainer: func(s *podSettings, v string) error {
		if errs := validation.IsDNS1123Label(v); len(errs) > 0 {
			return fmt.Errorf("%s is not a container name: %s", policy.Quote(v), strings.Join(errs, "; "))
		}
		s.appContainer = v
		return nil
	},
	AnnotationService: func(s *podSettings, v string) error {
		if !policy.ValidServiceName(v) {
			return fmt.Errorf("%s is not a valid service name (lower-case letters, digits and '-', at most 63)", policy.Quote(v))
		}
		s.service = v
		return nil
	},
	AnnotationConfigMap: func(s *podSettings, v string) (err error) {
		s.configMap, s.configKey, err = parseConfigMapRef(v, "sidecar.yaml")
		return err
	},
	AnnotationPolicyConfigMap: func(s *podSettings, v string) (err error) {
		s.policyMap, s.policyKey, err = parseConfigMapRef(v, "policies.yaml")
		return err
	},
	AnnotationConsulAddr: func(s *podSettings, v string) error {
		if err := checkConsulAddr(v); err != nil {
			return err
		}
		s.consulAddr = v
		return nil
	},
	AnnotationCPURequest: func(s *podSettings, v string) error {
		return setQuantity(&s.resources.Requests, corev1.ResourceCPU, v)
	},
	AnnotationCPULimit: func(s *podSettings, v string) error {
		return setQuantity(&s.resources.Limits, corev1.ResourceCPU, v)
	},
	AnnotationMemoryRequest: func(s *podSettings, v string) error {
		return setQuantity(&s.resources.Requests, corev1.ResourceMemory, v)
	},
	AnnotationMemoryLimit: func(s *podSettings, v string) error {
		return setQuantity(&s.resources.Limits, corev1.ResourceMemory, v)
	},
	AnnotationLogLevel: func(s *podSettings, v string) error {
		if err := config.CheckLogLevel(v); err != nil {
			return err
		}
		s.logLevel = v
		return nil
	},
	AnnotationDrainWindow: func(s *podSettings, v string) error {
		d, err := parseDrainWindow(v)
		if err != nil {
			return err
		}
		s.drainWindow = d
		return nil
	},
	AnnotationClassic: func(s *podSettings, v string) (err error) {
		s.classic, err = parseBool(v)
		return err
	},
	AnnotationHTTPProxy: func(s *podSettings, v string) (err error) {
		s.httpProxy, err = parseBool(v)
		return err
	},
	AnnotationNoProxyExtra: func(s *podSettings, v string) error {
		entries := strings.Split(v, ",")
		if len(entries) > maxNoProxyEntries {
			return fmt.Errorf("%d entries, at most %d", len(entries), maxNoProxyEntries)
		}
		for i := range entries {
			entries[i] = strings.TrimSpace(entries[i])
		}
		if err := checkNoProxy(entries); err != nil {
			return err
		}
		s.noProxyExtra, s.noProxySet = entries, true
		return nil
	},
	AnnotationRewriteProbes: func(s *podSettings, v string) (err error) {
		s.rewriteProbes, err = parseBool(v)
		return err
	},
	AnnotationMesh: func(s *podSettings, v string) error {
		switch v {
		case config.MeshConsulConnect:
			s.mesh = true
		case config.MeshOff:
			s.mesh = false
		default:
			return fmt.Errorf("%s is not allowed (allowed: %s, %s)", policy.Quote(v), config.MeshOff, config.MeshConsulConnect)
		}
		return nil
	},
	AnnotationMeshPlaintextInbound: func(s *podSettings, v string) error {
		switch v {
		case config.PlaintextDeny, config.PlaintextAllow:
			s.plaintext = v
		default:
			return fmt.Errorf("%s is not allowed (allowed: %s, %s)", policy.Quote(v), config.PlaintextDeny, config.PlaintextAllow)
		}
		return nil
	},
}

// settings applies a pod's annotations (and its opt-out label) to the
// injector's defaults. Errors name the annotation with its field path,
// relative to the pod (template).
func (in *Injector) settings(meta *metav1.ObjectMeta) (podSettings, ErrorList) {
	c := in.cfg
	s := podSettings{
		inject:        true,
		image:         c.Image,
		consulAddr:    c.ConsulAddr,
		resources:     *c.Resources.DeepCopy(),
		logLevel:      c.LogLevel,
		drainWindow:   c.DrainWindow,
		classic:       c.Classic,
		httpProxy:     c.HTTPProxy,
		noProxyExtra:  c.NoProxyExtra,
		rewriteProbes: true,
	}
	var errs ErrorList
	if v, ok := meta.Labels[AnnotationInject]; ok {
		on, err := parseSwitch(v)
		if err != nil {
			errs = append(errs, &FieldError{Path: fmt.Sprintf("metadata.labels[%s]", AnnotationInject), Detail: err.Error()})
		}
		s.inject = s.inject && on
	}
	keys := make([]string, 0, len(meta.Annotations))
	for k := range meta.Annotations {
		if strings.HasPrefix(k, Prefix) {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys) // errors in a stable order
	for _, k := range keys {
		v := meta.Annotations[k]
		path := fmt.Sprintf("metadata.annotations[%s]", k)
		if k == AnnotationStatus {
			continue
		}
		if len(v) > maxAnnotationValue {
			errs = append(errs, &FieldError{Path: path, Detail: fmt.Sprintf("%d bytes long, at most %d", len(v), maxAnnotationValue)})
			continue
		}
		parse, ok := annotationParsers[k]
		if !ok {
			errs = append(errs, &FieldError{Path: path, Detail: fmt.Sprintf("unknown annotation (known: %s)", strings.Join(KnownAnnotations(), ", "))})
			continue
		}
		if k == AnnotationInject {
			on, err := parseSwitch(v)
			if err != nil {
				errs = append(errs, &FieldError{Path: path, Detail: err.Error()})
			}
			s.inject = s.inject && on
			continue
		}
		if err := parse(&s, v); err != nil {
			errs = append(errs, &FieldError{Path: path, Detail: err.Error()})
		}
	}
	if s.service == "" {
		for _, l := range []string{"app.kubernetes.io/name", "app"} {
			if v := meta.Labels[l]; policy.ValidServiceName(v) {
				s.service = v
				break
			}
		}
	}
	if err := checkResources(s.resources); err != nil {
		errs = append(errs, &FieldError{Path: "metadata.annotations", Detail: err.Error()})
	}
	return s, errs
}

// parseSwitch reads the inject annotation or label.
func parseSwitch(v string) (bool, error) {
	switch strings.ToLower(v) {
	case "true", "enabled":
		return true, nil
	case "false", "disabled":
		return false, nil
	}
	return false, fmt.Errorf("%s (allowed: true, false, enabled, disabled)", policy.Quote(v))
}

func parseBool(v string) (bool, error) {
	switch strings.ToLower(v) {
	case "true":
		return true, nil
	case "false":
		return false, nil
	}
	return false, fmt.Errorf("%s (allowed: true, false)", policy.Quote(v))
}

func parseConfigMapRef(v, defaultKey string) (name, key string, err error) {
	name, key, _ = strings.Cut(v, ":")
	if key == "" {
		key = defaultKey
	}
	if errs := validation.IsDNS1123Subdomain(name); len(errs) > 0 {
		return "", "", fmt.Errorf("%s: want NAME[:KEY] with NAME a ConfigMap name: %s", policy.Quote(v), strings.Join(errs, "; "))
	}
	if errs := validation.IsConfigMapKey(key); len(errs) > 0 {
		return "", "", fmt.Errorf("%s: key %s is not a valid ConfigMap key: %s", policy.Quote(v), policy.Quote(key), strings.Join(errs, "; "))
	}
	return name, key, nil
}

// Bounds of the sidecar's resources: below them the sidecar can't run (the
// Go runtime and its buffers take about 20 MiB), above them no node has
// room and the pod never schedules.
var (
	minCPU    = resource.MustParse("1m")
	maxCPU    = resource.MustParse("64")
	minMemory = resource.MustParse("32Mi")
	maxMemory = resource.MustParse("64Gi")
)

// setQuantity sets a resource; "none" removes it.
func setQuantity(list *corev1.ResourceList, name corev1.ResourceName, v string) error {
	if v == "none" {
		delete(*list, name)
		return nil
	}
	q, err := resource.ParseQuantity(v)
	if err != nil {
		return fmt.Errorf("%s is not a quantity such as 100m or 128Mi (or none)", policy.Quote(v))
	}
	if err := checkQuantity(name, q); err != nil {
		return err
	}
	if *list == nil {
		*list = corev1.ResourceList{}
	}
	(*list)[name] = q
	return nil
}

// checkQuantity checks the sidecar's CPU or memory against its bounds.
func checkQuantity(name corev1.ResourceName, q resource.Quantity) error {
	lo, hi := minCPU, maxCPU
	if name == corev1.ResourceMemory {
		lo, hi = minMemory, maxMemory
	}
	if q.Cmp(lo) < 0 || q.Cmp(hi) > 0 {
		return fmt.Errorf("%s %s is not allowed (allowed: %s to %s)", name, q.String(), lo.String(), hi.String())
	}
	return nil
}

// checkResources checks every quantity against its bounds and rejects a
// request above its limit, which the API server would refuse.
func checkResources(r corev1.ResourceRequirements) error {
	var errs []error
	for _, list := range []corev1.ResourceList{r.Requests, r.Limits} {
		for _, name := range slices.Sorted(maps.Keys(list)) {
			if err := checkQuantity(name, list[name]); err != nil {
				errs = append(errs, err)
			}
		}
	}
	for _, name := range slices.Sorted(maps.Keys(r.Requests)) {
		req := r.Requests[name]
		if lim, ok := r.Limits[name]; ok && req.Cmp(lim) > 0 {
			errs = append(errs, fmt.Errorf("the sidecar's %s request %s is above its limit %s", name, req.String(), lim.String()))
		}
	}
	return errors.Join(errs...)
}

// parseDrainWindow reads a drain window as the sidecar's --drain-window.
func parseDrainWindow(v string) (time.Duration, error) {
	d, err := policy.ParseDuration(v)
	if err != nil {
		return 0, err
	}
	if err := config.CheckDrainWindow(d.D()); err != nil {
		return 0, err
	}
	return d.D(), nil
}

// consulAddrVars are the variables an annotation's Consul address may
// name as its host: the sidecar container has them (standardEnv), so the
// kubelet puts the node's or the pod's IP in their place.
var consulAddrVars = []string{"$(HOST_IP)", "$(POD_IP)"}

// checkConsulAddr checks a Consul address as the sidecar will once the
// kubelet has expanded it.
func checkConsulAddr(v string) error {
	expanded := v
	for _, ref := range consulAddrVars {
		expanded = strings.ReplaceAll(expanded, ref, "[::1]")
	}
	if err := config.CheckConsulAddress(expanded); err != nil {
		return fmt.Errorf("%s: want host:port, the host an IP address, a DNS name or %s (e.g. consul.consul:8500 or $(HOST_IP):8500)",
			policy.Quote(v), strings.Join(consulAddrVars, " or "))
	}
	return nil
}

// checkNoProxy checks entries for NO_PROXY as its readers (Go, curl,
// Python, wget) understand them alike: an IP address, a CIDR, or a domain
// name, with an optional leading dot. "*" (no proxy at all) and anything
// the kubelet would expand ($(VAR)) are refused.
// maxAnnotationValue bounds the value of every annotation of the sidecar:
// the longest of them, a no-proxy list, needs a few hundred bytes.
const maxAnnotationValue = 4 << 10

// maxNoProxyEntries bounds a pod's no-proxy list.
const maxNoProxyEntries = 64

func checkNoProxy(entries []string) error {
	var errs []error
	for _, e := range entries {
		switch {
		case e == "":
			errs = append(errs, errors.New("an empty entry (want comma-separated IP addresses, CIDRs or domain names)"))
			continue
		case e == "*":
			errs = append(errs, errors.New(`"*" would send nothing through the sidecar: leave http-proxy off instead`))
			continue
		}
		if _, err := netip.ParseAddr(e); err == nil {
			continue
		}
		if _, err := netip.ParsePrefix(e); err == nil {
			continue
		}
		if len(validation.IsDNS1123Subdomain(strings.ToLower(strings.TrimPrefix(e, ".")))) == 0 {
			continue
		}
		errs = append(errs, fmt.Errorf("%s is not an IP address, a CIDR or a domain name (such as 10.96.0.0/12 or .corp.example)", policy.Quote(e)))
	}
	return errors.Join(errs...)
}
