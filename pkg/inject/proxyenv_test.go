package inject

import (
	"net/url"
	"slices"
	"strings"
	"testing"

	"golang.org/x/net/http/httpproxy"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TestHTTPProxyEnv: with http-proxy, each app container gets HTTP_PROXY
// and NO_PROXY in both cases, once each, and NO_PROXY covers loopback,
// the pod's own addresses (through a variable from the downward API,
// defined before it so that the kubelet expands it) and the cluster's
// service DNS names, plus the injector's or the pod's extra entries.
func TestHTTPProxyEnv(t *testing.T) {
	const base = "localhost,127.0.0.1,::1,$(" + PodIPsEnv + "),.svc,.svc.cluster.local"
	for _, tc := range []struct {
		name  string
		extra []string          // the injector's --no-proxy-extra
		ann   map[string]string // the pod's annotations
		want  string
	}{
		{"default", nil, nil, base},
		{"the injector's extra", []string{"10.96.0.0/12", ".corp.example"}, nil, base + ",10.96.0.0/12,.corp.example"},
		{"the pod's extra replaces the injector's", []string{"10.96.0.0/12"}, map[string]string{AnnotationNoProxyExtra: "10.0.0.0/8, .svc.example.internal"},
			base + ",10.0.0.0/8,.svc.example.internal"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := newTestInjector(t, func(c *Config) { c.HTTPProxy = true; c.NoProxyExtra = tc.extra })
			meta := metav1.ObjectMeta{Name: "p", Annotations: tc.ann}
			spec := corev1.PodSpec{Containers: []corev1.Container{
				{Name: "app", Image: "a", Env: []corev1.EnvVar{{Name: "A", Value: "1"}}},
				{Name: "helper", Image: "h"},
			}}
			if res, err := in.InjectPod(&meta, &spec); err != nil || !res.Injected {
				t.Fatalf("InjectPod: %v, %+v", err, res)
			}
			for _, c := range spec.Containers {
				index := map[string]int{}
				for i, e := range c.Env {
					if _, dup := index[e.Name]; dup {
						t.Errorf("container %s: %s defined twice: %+v", c.Name, e.Name, c.Env)
					}
					index[e.Name] = i
				}
				for _, name := range []string{"HTTP_PROXY", "http_proxy"} {
					if i, ok := index[name]; !ok || c.Env[i].Value != "http://127.0.0.1:15001" {
						t.Errorf("container %s: %s missing or wrong: %+v", c.Name, name, c.Env)
					}
				}
				for _, name := range []string{"NO_PROXY", "no_proxy"} {
					if i, ok := index[name]; !ok || c.Env[i].Value != tc.want {
						t.Errorf("container %s: %s = %+v, want %q", c.Name, name, c.Env, tc.want)
					} else if ip, ok := index[PodIPsEnv]; !ok || ip > i {
						t.Errorf("container %s: %s must be defined before %s for the kubelet to expand it: %+v", c.Name, PodIPsEnv, name, c.Env)
					}
				}
				ip := c.Env[index[PodIPsEnv]]
				if ip.ValueFrom == nil || ip.ValueFrom.FieldRef == nil || ip.ValueFrom.FieldRef.FieldPath != "status.podIPs" {
					t.Errorf("container %s: %s = %+v, want the downward API's status.podIPs", c.Name, PodIPsEnv, ip)
				}
			}
		})
	}
}

// TestNoProxyAsClientsReadIt: the NO_PROXY the injector writes, expanded as
// the kubelet does, read by Go's own proxy selection (net/http's
// ProxyFromEnvironment): service names discovery routes go through the
// sidecar; loopback, the pod's addresses, Kubernetes service DNS names and
// the extra CIDR go direct.
func TestNoProxyAsClientsReadIt(t *testing.T) {
	in := newTestInjector(t, func(c *Config) { c.HTTPProxy = true; c.NoProxyExtra = []string{"10.96.0.0/12"} })
	meta := metav1.ObjectMeta{Name: "p"}
	spec := corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Image: "a"}}}
	if _, err := in.InjectPod(&meta, &spec); err != nil {
		t.Fatal(err)
	}
	env := spec.Containers[0].Env
	i := slices.IndexFunc(env, func(e corev1.EnvVar) bool { return e.Name == "no_proxy" })
	if i < 0 {
		t.Fatalf("no no_proxy in %+v", env)
	}
	// The kubelet puts the pod's IPs (status.podIPs: comma-separated) in
	// place of the variable.
	noProxy := strings.ReplaceAll(env[i].Value, "$("+PodIPsEnv+")", "10.244.1.7,fd00:10:244:1::7")
	cfg := httpproxy.Config{HTTPProxy: "http://127.0.0.1:15001", NoProxy: noProxy}
	proxy := cfg.ProxyFunc()
	for host, viaSidecar := range map[string]bool{
		"user-service":                        true,
		"user-service:8080":                   true,
		"user-service.service.consul":         true,
		"backend.shop.svc.cluster.local":      false,
		"backend.shop.svc":                    false,
		"web-0.web.shop.svc.cluster.local:80": false,
		"localhost:8080":                      false,
		"127.0.0.1:9090":                      false,
		"[::1]:9090":                          false,
		"10.244.1.7:8080":                     false,
		"[fd00:10:244:1::7]:8080":             false,
		"10.96.0.10":                          false,
		"10.244.2.9:8080":                     true, // another pod: through the sidecar (which refuses IPs unless allowed)
	} {
		u, err := proxy(&url.URL{Scheme: "http", Host: host})
		if err != nil {
			t.Fatal(err)
		}
		if got := u != nil; got != viaSidecar {
			t.Errorf("http://%s with no_proxy=%q: through the sidecar %v, want %v", host, noProxy, got, viaSidecar)
		}
	}
}

// TestNoProxyExtraChecked: the extra entries must be ones no_proxy readers
// understand, and none may turn the proxy off or name a variable.
func TestNoProxyExtraChecked(t *testing.T) {
	for v, want := range map[string]string{
		"*":                "would send nothing through the sidecar",
		"10.0.0.0/33":      "is not an IP address, a CIDR or a domain name",
		"a b":              "is not an IP address, a CIDR or a domain name",
		"$(POD_IP)":        "is not an IP address, a CIDR or a domain name",
		"http://x":         "is not an IP address, a CIDR or a domain name",
		"x,,y":             "an empty entry",
		"-bad.example":     "is not an IP address, a CIDR or a domain name",
		".corp..example":   "is not an IP address, a CIDR or a domain name",
		"db.internal:5432": "is not an IP address, a CIDR or a domain name",
	} {
		meta, spec := validationPod(AnnotationNoProxyExtra, v)
		meta.Annotations[AnnotationHTTPProxy] = "true"
		_, err := newTestInjector(t, nil).InjectPod(&meta, &spec)
		if err == nil || !strings.Contains(err.Error(), "metadata.annotations["+AnnotationNoProxyExtra+"]: ") || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %q: got %v, want an error naming the annotation and saying %q", AnnotationNoProxyExtra, v, err, want)
		}
		if _, err := New(Config{Image: "sidecar:1", NoProxyExtra: strings.Split(v, ",")}); err == nil || !strings.Contains(err.Error(), "no-proxy extra: ") {
			t.Errorf("New with NoProxyExtra %q: got %v, want it refused", v, err)
		}
	}
	for _, v := range []string{"10.96.0.0/12", "10.0.0.1", "fd00::/8", ".corp.example,example.com", "Example.COM"} {
		meta, spec := validationPod(AnnotationNoProxyExtra, v)
		meta.Annotations[AnnotationHTTPProxy] = "true"
		if res, err := newTestInjector(t, nil).InjectPod(&meta, &spec); err != nil || !res.Injected || len(res.Warnings) > 0 {
			t.Errorf("%s: %q: got %v (injected %v, warnings %q), want it injected without a warning", AnnotationNoProxyExtra, v, err, res.Injected, res.Warnings)
		}
	}
	// Without http-proxy the entries do nothing: a warning says so.
	meta, spec := validationPod(AnnotationNoProxyExtra, "10.96.0.0/12")
	res, err := newTestInjector(t, nil).InjectPod(&meta, &spec)
	if err != nil || !slices.ContainsFunc(res.Warnings, func(w string) bool {
		return strings.Contains(w, AnnotationNoProxyExtra+" has no effect without "+AnnotationHTTPProxy)
	}) {
		t.Errorf("no-proxy-extra without http-proxy: %v, warnings %q; want a warning that it has no effect", err, res.Warnings)
	}
}
