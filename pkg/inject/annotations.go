package inject

import (
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
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
	// AnnotationRewriteProbes "false" keeps the app's probes as they are
	// (the kubelet probes the app directly; the sidecar does not know the
	// app's readiness).
	AnnotationRewriteProbes = Prefix + "rewrite-probes"
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
	rewriteProbes bool
	transparent   Transparent
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
		if v == "" || strings.ContainsAny(v, " \t\n") {
			return fmt.Errorf("%q is not an image reference", v)
		}
		s.image = v
		return nil
	},
	AnnotationAppPort: func(s *podSettings, v string) error {
		p, err := strconv.Atoi(v)
		if err != nil || p < 1 || p > 65535 {
			return fmt.Errorf("%q is not a port number (allowed: 1 to 65535)", v)
		}
		if reserved(p) {
			return fmt.Errorf("%d is one of the sidecar's own ports (%s)", p, reservedList())
		}
		s.appPort = p
		return nil
	},
	AnnotationAppContainer: func(s *podSettings, v string) error {
		if v == "" {
			return fmt.Errorf("empty container name")
		}
		s.appContainer = v
		return nil
	},
	AnnotationService: func(s *podSettings, v string) error {
		if !validServiceName(v) {
			return fmt.Errorf("%q is not a valid service name (lower-case letters, digits and '-', at most 63)", v)
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
		if err := checkLogLevel(v); err != nil {
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
	AnnotationRewriteProbes: func(s *podSettings, v string) (err error) {
		s.rewriteProbes, err = parseBool(v)
		return err
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
			if v := meta.Labels[l]; validServiceName(v) {
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
	return false, fmt.Errorf("%q (allowed: true, false, enabled, disabled)", v)
}

func parseBool(v string) (bool, error) {
	switch strings.ToLower(v) {
	case "true":
		return true, nil
	case "false":
		return false, nil
	}
	return false, fmt.Errorf("%q (allowed: true, false)", v)
}

func parseConfigMapRef(v, defaultKey string) (name, key string, err error) {
	name, key, _ = strings.Cut(v, ":")
	if key == "" {
		key = defaultKey
	}
	if !validDNSSubdomain(name) {
		return "", "", fmt.Errorf("%q: want NAME[:KEY] with NAME a ConfigMap name", v)
	}
	if !validConfigMapKey(key) {
		return "", "", fmt.Errorf("%q: key %q is not a valid ConfigMap key", v, key)
	}
	return name, key, nil
}

// setQuantity sets a resource; "none" removes it (for limits).
func setQuantity(list *corev1.ResourceList, name corev1.ResourceName, v string) error {
	if v == "none" {
		delete(*list, name)
		return nil
	}
	q, err := resource.ParseQuantity(v)
	if err != nil || q.Sign() <= 0 {
		return fmt.Errorf("%q is not a positive quantity such as 100m or 128Mi (or none)", v)
	}
	if *list == nil {
		*list = corev1.ResourceList{}
	}
	(*list)[name] = q
	return nil
}

// checkResources rejects a request above its limit, which the API server
// would refuse.
func checkResources(r corev1.ResourceRequirements) error {
	for name, req := range r.Requests {
		if lim, ok := r.Limits[name]; ok && req.Cmp(lim) > 0 {
			return fmt.Errorf("the sidecar's %s request %s is above its limit %s", name, req.String(), lim.String())
		}
	}
	return nil
}

func checkLogLevel(v string) error {
	switch v {
	case "debug", "info", "warn", "error":
		return nil
	}
	return fmt.Errorf("%q (allowed: debug, info, warn, error)", v)
}

func parseDrainWindow(v string) (time.Duration, error) {
	d, err := time.ParseDuration(v)
	if err != nil || d < 0 || d > 10*time.Minute {
		return 0, fmt.Errorf("%q is not a duration from 0s to 10m", v)
	}
	return d, nil
}

// checkConsulAddr accepts host:port, where host may be a Kubernetes
// dependent variable such as $(HOST_IP).
func checkConsulAddr(v string) error {
	host, port, err := net.SplitHostPort(v)
	if err != nil || host == "" {
		return fmt.Errorf("%q: want host:port (e.g. consul.consul:8500 or $(HOST_IP):8500)", v)
	}
	if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 {
		return fmt.Errorf("%q: port out of range 1-65535", v)
	}
	return nil
}

// validServiceName mirrors the sidecar's own rule (pkg/policy): a DNS label.
func validServiceName(s string) bool {
	if s == "" || len(s) > 63 || s[0] == '-' || s[len(s)-1] == '-' {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-') {
			return false
		}
	}
	return true
}

// validDNSSubdomain is the rule for ConfigMap names.
func validDNSSubdomain(s string) bool {
	if s == "" || len(s) > 253 {
		return false
	}
	for _, label := range strings.Split(s, ".") {
		if !validServiceName(label) {
			return false
		}
	}
	return true
}

func validConfigMapKey(s string) bool {
	if s == "" || len(s) > 253 || s == "." || s == ".." {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.') {
			return false
		}
	}
	return true
}
