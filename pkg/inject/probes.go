package inject

import (
	"fmt"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/sidecar-mesh/sidecar/pkg/config"
)

// probeKind is one of the app's three probes.
//
// How a probe is handed to the sidecar: the kubelet's probe of the app
// becomes an HTTP GET of the sidecar's /app-health/{readyz,livez,startupz}
// on port 15020, and the original probe (HTTP GET, TCP connect or gRPC
// health, with its timings) becomes the sidecar's --KIND-probe flag. The
// sidecar runs it against 127.0.0.1, so that one prober judges the app: its
// readiness gates the sidecar's own /healthz/ready and the Consul check as
// well as the kubelet's view. TCP and gRPC probes are handed over too, for
// that reason. Each threshold is applied once, by the side that owns the
// consequence: readiness thresholds by the sidecar (it feeds Consul and the
// pod's readiness; the kubelet's successThreshold becomes 1), liveness and
// startup thresholds by the kubelet (it owns restarts; the sidecar reports
// its latest check, failureThreshold=1). Probes the sidecar can't run as the
// kubelet would (exec, HTTPS, another host, httpHeaders) stay with the
// kubelet, with a warning.
type probeKind string

const (
	readiness probeKind = "readiness"
	liveness  probeKind = "liveness"
	startup   probeKind = "startup"
)

// probeKinds in the order their flags are written.
var probeKinds = []probeKind{readiness, liveness, startup}

// field is where the container keeps this probe.
func (k probeKind) field(c *corev1.Container) **corev1.Probe {
	switch k {
	case readiness:
		return &c.ReadinessProbe
	case liveness:
		return &c.LivenessProbe
	}
	return &c.StartupProbe
}

func (k probeKind) of(c *corev1.Container) *corev1.Probe { return *k.field(c) }

// path is the sidecar's endpoint that answers this probe for the app.
func (k probeKind) path() string {
	switch k {
	case readiness:
		return "/app-health/readyz"
	case liveness:
		return "/app-health/livez"
	}
	return "/app-health/startupz"
}

// sidecarProbeFlag renders a Kubernetes probe as the sidecar's probe flag
// (config.ParseProbe's form), or says why it can't be. The probe's own port
// is named in the flag unless it is appPort; appPort 0 (the container
// declares no port, none is annotated) is no obstacle.
func sidecarProbeFlag(k probeKind, p *corev1.Probe, app *corev1.Container, appPort int) (flag, why string) {
	var b strings.Builder
	var port int
	switch {
	case p.HTTPGet != nil:
		h := p.HTTPGet
		switch {
		case h.Scheme != "" && h.Scheme != corev1.URISchemeHTTP:
			return "", "HTTPS probes are not run by the sidecar"
		case h.Host != "":
			return "", "a probe of another host (httpGet.host) is not run by the sidecar"
		case len(h.HTTPHeaders) > 0:
			return "", "a probe with httpHeaders can't be handed to the sidecar as a flag"
		}
		path := h.Path
		if !strings.HasPrefix(path, "/") {
			path = "/" + path
		}
		if strings.ContainsAny(path, ", \t\n") {
			return "", fmt.Sprintf("the path %q has a comma or space, which the sidecar's probe flag can't carry", path)
		}
		if port, why = resolvePort(h.Port, app); why != "" {
			return "", why
		}
		b.WriteString("http:" + path)
	case p.TCPSocket != nil:
		if p.TCPSocket.Host != "" {
			return "", "a probe of another host (tcpSocket.host) is not run by the sidecar"
		}
		if port, why = resolvePort(p.TCPSocket.Port, app); why != "" {
			return "", why
		}
		b.WriteString("tcp")
	case p.GRPC != nil:
		port = int(p.GRPC.Port)
		b.WriteString("grpc")
		if svc := p.GRPC.Service; svc != nil && *svc != "" {
			if strings.ContainsAny(*svc, ", \t\n") {
				return "", fmt.Sprintf("the gRPC service %q has a comma or space", *svc)
			}
			b.WriteString(":" + *svc)
		}
	case p.Exec != nil:
		return "", "exec probes run in the app's container"
	default:
		return "", "the probe has no handler"
	}
	if port < 1 || port > 65535 {
		return "", fmt.Sprintf("port %d out of range", port)
	}
	if port != appPort {
		fmt.Fprintf(&b, ",port=%d", port)
	}
	fmt.Fprintf(&b, ",interval=%ds,timeout=%ds", or(p.PeriodSeconds, 10), or(p.TimeoutSeconds, 1))
	if p.InitialDelaySeconds > 0 {
		fmt.Fprintf(&b, ",initialDelay=%ds", p.InitialDelaySeconds)
	}
	if k == readiness {
		fmt.Fprintf(&b, ",failureThreshold=%d,successThreshold=%d", or(p.FailureThreshold, 3), or(p.SuccessThreshold, 1))
	} else {
		b.WriteString(",failureThreshold=1,successThreshold=1")
	}
	return b.String(), ""
}

// checkProbeFlag says why the sidecar would refuse a probe flag (timings
// or thresholds the kubelet takes and the sidecar doesn't, such as a period
// of 2^31-1 s), or "".
func checkProbeFlag(k probeKind, flag string) string {
	p, err := config.ParseProbe(flag)
	if err == nil {
		err = p.Validate("probes." + string(k))
	}
	if err != nil {
		return "the sidecar would refuse it as its probe flag: " + strings.ReplaceAll(err.Error(), "\n", "; ")
	}
	return ""
}

// kubeletProbe is the app's probe pointed at the sidecar: the same timings
// and thresholds, except a readiness successThreshold, which the sidecar
// applies.
func kubeletProbe(k probeKind, orig *corev1.Probe) *corev1.Probe {
	p := &corev1.Probe{
		ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{
			Path: k.path(),
			Port: intstr.FromInt32(PortHealth),
		}},
		InitialDelaySeconds:           orig.InitialDelaySeconds,
		TimeoutSeconds:                orig.TimeoutSeconds,
		PeriodSeconds:                 orig.PeriodSeconds,
		SuccessThreshold:              orig.SuccessThreshold,
		FailureThreshold:              orig.FailureThreshold,
		TerminationGracePeriodSeconds: orig.TerminationGracePeriodSeconds,
	}
	if k == readiness && p.SuccessThreshold > 1 {
		p.SuccessThreshold = 1
	}
	return p
}

// healthProbe is a probe of the sidecar's own health endpoint.
func healthProbe(path string, period, failureThreshold int32) *corev1.Probe {
	return &corev1.Probe{
		ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{
			Path: path,
			Port: intstr.FromInt32(PortHealth),
		}},
		PeriodSeconds:    period,
		FailureThreshold: failureThreshold,
	}
}

// resolvePort finds a probe's port as the kubelet does: a number, or the
// name of one of the container's ports, or a number in a string.
func resolvePort(p intstr.IntOrString, c *corev1.Container) (int, string) {
	if p.Type == intstr.Int {
		return int(p.IntVal), ""
	}
	for _, cp := range c.Ports {
		if cp.Name == p.StrVal {
			return int(cp.ContainerPort), ""
		}
	}
	if n, err := strconv.Atoi(p.StrVal); err == nil {
		return n, ""
	}
	return 0, fmt.Sprintf("container %q has no port named %q", c.Name, p.StrVal)
}

func or(v, def int32) int32 {
	if v == 0 {
		return def
	}
	return v
}
