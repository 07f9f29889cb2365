package webhook

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/sidecar-mesh/sidecar/internal/freeport"
	"github.com/sidecar-mesh/sidecar/internal/kubetest"
	"github.com/sidecar-mesh/sidecar/pkg/inject"
)

// TestKubernetesAPIServerCallsWebhook holds the webhook to a real
// kube-apiserver (internal/kubetest), with the shipped RBAC and webhook
// configuration (k8s/webhook.yaml): the webhook puts its CA in the
// caBundle with the shipped service account's token; the API server calls
// it on pod creation (over HTTP/2) and stores the pod with its sidecar, a
// pod of 20,000 args too, and with 600 idle TLS connections held open to
// the webhook from another address; a bad annotation refuses the pod;
// after a rotation to a new CA the webhook serves the new certificate and
// puts the new CA in the caBundle; the namespaceSelector keeps kube-system
// and sidecar-system out; with failurePolicy Fail and the webhook down,
// pods of a labelled namespace are refused.
func TestKubernetesAPIServerCallsWebhook(t *testing.T) {
	s := kubetest.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	k := &kube{t: t, s: s, ctx: ctx}

	// The shipped RBAC, for real: the webhook runs with the token of the
	// shipped service account and must manage the caBundle with it.
	data, err := os.ReadFile("../../k8s/webhook.yaml")
	if err != nil {
		t.Fatal(err)
	}
	shipped, err := kubetest.Objects(data)
	if err != nil {
		t.Fatalf("k8s/webhook.yaml: %v", err)
	}
	var mwc map[string]any
	for _, o := range shipped {
		switch kindOf(o) {
		case "Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding":
			k.createOnce(o)
		case "MutatingWebhookConfiguration":
			if err := json.Unmarshal(o, &mwc); err != nil {
				t.Fatal(err)
			}
		}
	}
	token := k.serviceAccountToken("sidecar-system", "sidecar-injector")
	dir := t.TempDir()
	tokenFile := filepath.Join(dir, "token")
	if err := os.WriteFile(tokenFile, []byte(token), 0o600); err != nil {
		t.Fatal(err)
	}

	// The shipped webhook configuration, pointed at the webhook on loopback
	// and without a caBundle: the webhook adds it. The port is from below
	// the ephemeral range (internal/freeport): the API server is told it
	// before the webhook listens.
	ports, err := freeport.Stable(1, false)
	if err != nil {
		t.Fatal(err)
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[0]))
	hook := mwc["webhooks"].([]any)[0].(map[string]any)
	hook["clientConfig"] = map[string]any{"url": "https://" + addr + "/inject"}
	body, _ := json.Marshal(mwc)
	k.create(body)

	certFile, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	cert := kubetest.WriteCert(t, certFile, keyFile)
	w := startWebhook(t, Config{
		Addr: addr, CertFile: certFile, KeyFile: keyFile, Injector: injector(t, "sidecar:e2e"),
		CABundle: &CABundleConfig{File: certFile, WebhookConfig: "sidecar-injector",
			APIServer: k.s.URL, TokenFile: tokenFile, CAFile: k.s.CAFile},
	})
	k.waitCABundle(cert)
	waitLogLines(t, w, "caBundle updated", 1)

	k.namespace("mesh", map[string]string{"sidecar.mesh/inject": "enabled"})
	k.namespace("plain", nil)
	admissions := func() int { return len(w.logs.Lines("admission")) }

	// A pod in the labelled namespace: stored with the sidecar.
	stored := k.createPod("mesh", "web", nil, nil)
	init := stored.Spec.InitContainers
	if len(init) != 1 || init[0].Name != inject.ContainerName || init[0].Image != "sidecar:e2e" ||
		init[0].RestartPolicy == nil || *init[0].RestartPolicy != corev1.ContainerRestartPolicyAlways {
		t.Fatalf("stored pod mesh/web: init containers %+v, want the native sidecar sidecar:e2e", init)
	}
	if !slices.Contains(init[0].Args, "--readiness-probe=http:/ready,interval=10s,timeout=1s,failureThreshold=3,successThreshold=1") {
		t.Errorf("stored pod mesh/web: sidecar args %q, want the app's readiness probe handed over", init[0].Args)
	}
	if p := stored.Spec.Containers[0].ReadinessProbe; p == nil || p.HTTPGet == nil || p.HTTPGet.Path != "/app-health/readyz" || p.HTTPGet.Port.IntValue() != inject.PortHealth {
		t.Errorf("stored pod mesh/web: app readiness probe %+v, want GET /app-health/readyz on 15020", p)
	}
	if stored.Annotations[inject.AnnotationStatus] == "" {
		t.Errorf("stored pod mesh/web: no %s annotation", inject.AnnotationStatus)
	}
	if n := admissions(); n != 1 {
		t.Errorf("after one pod creation: %d admission reviews, want 1", n)
	}

	// Not called: opted out by label (objectSelector), or a namespace
	// without the label (namespaceSelector).
	if p := k.createPod("mesh", "opted-out", map[string]string{"sidecar.mesh/inject": "false"}, nil); len(p.Spec.InitContainers) != 0 {
		t.Errorf("pod mesh/opted-out: got init containers %v, want none", p.Spec.InitContainers)
	}
	if p := k.createPod("plain", "web", nil, nil); len(p.Spec.InitContainers) != 0 {
		t.Errorf("pod plain/web: got init containers %v, want none", p.Spec.InitContainers)
	}
	if n := admissions(); n != 1 {
		t.Errorf("after pods the selectors exclude: %d admission reviews, want still 1", n)
	}

	// Classic by annotation; a bad annotation refuses the pod with its field.
	if p := k.createPod("mesh", "classic", nil, map[string]string{inject.AnnotationClassic: "true"}); len(p.Spec.Containers) != 2 || p.Spec.Containers[0].Name != inject.ContainerName {
		t.Errorf("pod mesh/classic: containers %v, want the sidecar first", containerNames(p.Spec.Containers))
	}
	_, err = k.s.Create(k.ctx, podJSON("mesh", "bad", nil, map[string]string{inject.AnnotationAppPort: "http"}), kubetest.CreateOptions{})
	var apiErr *kubetest.APIError
	if !errors.As(err, &apiErr) || !strings.Contains(apiErr.Message, `sidecar injection: metadata.annotations[sidecar.mesh/app-port]: "http" is not a port number`) {
		t.Errorf("pod with app-port \"http\": got %v, want a refusal naming the annotation", err)
	}

	// A pod injected by the CLI is left as is: one sidecar.
	var cliOut bytes.Buffer
	in, err := inject.New(inject.Config{Image: "sidecar:cli", Version: "cli"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := in.Documents(bytes.NewReader(podYAML("mesh", "pre-injected")), &cliOut); err != nil {
		t.Fatal(err)
	}
	objs, err := kubetest.Objects(cliOut.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	resp := k.create(objs[0])
	var pre corev1.Pod
	if err := json.Unmarshal(resp.Body, &pre); err != nil {
		t.Fatal(err)
	}
	if len(pre.Spec.InitContainers) != 1 || pre.Spec.InitContainers[0].Image != "sidecar:cli" {
		t.Errorf("pod injected by the CLI: init containers %v, want the CLI's sidecar only", pre.Spec.InitContainers)
	}
	if n := admissions(); n != 4 {
		t.Errorf("after web, classic, bad and pre-injected: %d admission reviews, want 4", n)
	}

	// The certificate rotates to a new CA: the webhook serves it at the next
	// handshake and puts the new CA in the caBundle; pods are injected again.
	rotated := kubetest.WriteCert(t, certFile, keyFile)
	servedSerial(t, addr) // a handshake: the webhook reloads
	k.waitCABundle(rotated)
	if p := k.createPod("mesh", "after-rotation", nil, nil); len(p.Spec.InitContainers) != 1 {
		t.Errorf("pod mesh/after-rotation: init containers %v, want the sidecar", p.Spec.InitContainers)
	}
	waitLogLines(t, w, "caBundle updated", 2) // start and rotation
	for _, l := range w.logs.Lines("admission") {
		if l["proto"] != "HTTP/2.0" {
			t.Errorf("admission log line %v: the API server called over %v, want HTTP/2.0 (one connection carries its calls)", l, l["proto"])
		}
	}

	// A pod with 20,000 args is stored with its sidecar: the review is
	// answered well within the API server's timeout (it took 15 s and 3 GB
	// when every array was aligned with a table, and with failurePolicy
	// Ignore the pod was stored without the sidecar).
	var big map[string]any
	_ = json.Unmarshal(podJSON("mesh", "big-args", nil, nil), &big)
	ctr := big["spec"].(map[string]any)["containers"].([]any)[0].(map[string]any)
	args := make([]any, 20000)
	for i := range args {
		args[i] = "-v"
	}
	ctr["args"] = args
	body, _ = json.Marshal(big)
	var stored2 corev1.Pod
	if err := json.Unmarshal(k.create(body).Body, &stored2); err != nil {
		t.Fatal(err)
	}
	if init := stored2.Spec.InitContainers; len(init) != 1 || init[0].Name != inject.ContainerName || len(stored2.Spec.Containers[0].Args) != len(args) {
		t.Errorf("pod mesh/big-args (%d bytes): init containers %v and %d args, want the sidecar and the %d args", len(body), containerNames(init), len(stored2.Spec.Containers[0].Args), len(args))
	}

	// 600 idle TLS connections from another address don't keep the API
	// server (127.0.0.1) out.
	conns := openIdleConns(t, addr, rotated, "127.0.0.2", 600)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	if p := k.createPod("mesh", "after-idle-conns", nil, nil); len(p.Spec.InitContainers) != 1 {
		t.Errorf("pod mesh/after-idle-conns: init containers %v, want the sidecar", containerNames(p.Spec.InitContainers))
	}
	calls := admissions()

	// The namespaceSelector keeps kube-system and the injector's own
	// namespace out, labelled or not: the webhook is not even called.
	for _, ns := range []string{"kube-system", "sidecar-system"} {
		k.label(ns, "sidecar.mesh/inject", "enabled")
		k.namespace(ns, nil)
		// sidecar-system enforces the restricted pod security standard.
		var p corev1.Pod
		if err := json.Unmarshal(k.create(restrictedPodJSON(ns, "web")).Body, &p); err != nil {
			t.Fatal(err)
		}
		if len(p.Spec.InitContainers) != 0 {
			t.Errorf("pod %s/web in a labelled namespace: init containers %v, want none", ns, containerNames(p.Spec.InitContainers))
		}
	}
	if n := admissions(); n != calls {
		t.Errorf("after pods in kube-system and sidecar-system: %d admission reviews, want still %d", n, calls)
	}

	// failurePolicy Fail, as k8s/README.md offers it, with the webhook down:
	// a pod of a labelled namespace is refused; kube-system still gets its
	// pods.
	patch := []byte(`[{"op":"replace","path":"/webhooks/0/failurePolicy","value":"Fail"}]`)
	if resp, err := k.s.Do(k.ctx, http.MethodPatch, "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/sidecar-injector", patch); err != nil || resp.Status != http.StatusOK {
		t.Fatalf("setting failurePolicy Fail: %v %+v", err, resp)
	}
	w.stop(t)
	_, err = k.s.Create(k.ctx, podJSON("mesh", "while-down", nil, nil), kubetest.CreateOptions{})
	if !errors.As(err, &apiErr) || !strings.Contains(apiErr.Message, `failed calling webhook "inject.sidecar.mesh"`) {
		t.Errorf("pod mesh/while-down with failurePolicy Fail and the webhook down: got %v, want it refused", err)
	}
	if p := k.createPod("kube-system", "while-down", nil, nil); len(p.Spec.InitContainers) != 0 {
		t.Errorf("pod kube-system/while-down: init containers %v, want none", containerNames(p.Spec.InitContainers))
	}
}

// label sets a label on a namespace.
func (k *kube) label(ns, key, value string) {
	k.t.Helper()
	body, _ := json.Marshal(map[string]any{"metadata": map[string]any{"labels": map[string]string{key: value}}})
	if resp, err := k.s.Do(k.ctx, http.MethodPatch, "/api/v1/namespaces/"+ns, body); err != nil || resp.Status != http.StatusOK {
		k.t.Fatalf("labelling namespace %s: %v %+v", ns, err, resp)
	}
}

// ---- helpers ----------------------------------------------------------------

// waitLogLines waits until the webhook has logged msg exactly n times (the
// API server can show an update before the webhook logs it).
func waitLogLines(t *testing.T, w *runningWebhook, msg string, n int) {
	t.Helper()
	deadline := time.NewTimer(10 * time.Second)
	defer deadline.Stop()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		got := len(w.logs.Lines(msg))
		if got == n {
			return
		}
		if got > n {
			t.Fatalf("%d %q log lines, want %d", got, msg, n)
		}
		select {
		case <-deadline.C:
			t.Fatalf("%d %q log lines after 10s, want %d", got, msg, n)
		case <-tick.C:
		}
	}
}

// kube wraps the API server for the test.
type kube struct {
	t   *testing.T
	s   *kubetest.Server
	ctx context.Context
}

func (k *kube) create(obj []byte) *kubetest.Response {
	k.t.Helper()
	resp, err := k.s.Create(k.ctx, obj, kubetest.CreateOptions{})
	if err != nil {
		k.t.Fatalf("create: %v", err)
	}
	return resp
}

// createOnce creates obj unless it exists already.
func (k *kube) createOnce(obj []byte) {
	k.t.Helper()
	if err := k.s.CreateOnce(k.ctx, obj); err != nil {
		k.t.Fatalf("create: %v", err)
	}
}

// namespace creates a namespace (with labels) and its default service
// account, unless they exist.
func (k *kube) namespace(name string, labels map[string]string) {
	k.t.Helper()
	if err := k.s.Namespace(k.ctx, name, labels); err != nil {
		k.t.Fatalf("namespace %s: %v", name, err)
	}
}

func (k *kube) serviceAccountToken(ns, name string) string {
	k.t.Helper()
	path := fmt.Sprintf("/api/v1/namespaces/%s/serviceaccounts/%s/token", ns, name)
	resp, err := k.s.Do(k.ctx, http.MethodPost, path,
		[]byte(`{"apiVersion":"authentication.k8s.io/v1","kind":"TokenRequest","spec":{"expirationSeconds":3600}}`))
	if err != nil || resp.Status != http.StatusCreated {
		k.t.Fatalf("POST %s: %v %+v", path, err, resp)
	}
	var tr struct {
		Status struct{ Token string } `json:"status"`
	}
	if err := json.Unmarshal(resp.Body, &tr); err != nil || tr.Status.Token == "" {
		k.t.Fatalf("TokenRequest: %s (%v)", resp.Body, err)
	}
	return tr.Status.Token
}

// waitCABundle waits until the webhook configuration's caBundle is ca.
func (k *kube) waitCABundle(ca []byte) {
	k.t.Helper()
	path := "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/sidecar-injector"
	deadline := time.NewTimer(30 * time.Second)
	defer deadline.Stop()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		resp, err := k.s.Do(k.ctx, http.MethodGet, path, nil)
		if err != nil {
			k.t.Fatal(err)
		}
		var cfg struct {
			Webhooks []struct {
				ClientConfig struct{ CABundle []byte } `json:"clientConfig"`
			} `json:"webhooks"`
		}
		if err := json.Unmarshal(resp.Body, &cfg); err != nil {
			k.t.Fatal(err)
		}
		if len(cfg.Webhooks) == 1 && bytes.Equal(cfg.Webhooks[0].ClientConfig.CABundle, ca) {
			return
		}
		select {
		case <-deadline.C:
			k.t.Fatalf("the webhook did not set the caBundle within 30s: %s", resp.Body)
		case <-tick.C:
		}
	}
}

// createPod creates a pod with an HTTP readiness probe and returns it as
// stored.
func (k *kube) createPod(ns, name string, labels, annotations map[string]string) corev1.Pod {
	k.t.Helper()
	resp := k.create(podJSON(ns, name, labels, annotations))
	var p corev1.Pod
	if err := json.Unmarshal(resp.Body, &p); err != nil {
		k.t.Fatal(err)
	}
	// And it is what a later GET returns.
	get, err := k.s.Do(k.ctx, http.MethodGet, fmt.Sprintf("/api/v1/namespaces/%s/pods/%s", ns, name), nil)
	if err != nil || get.Status != http.StatusOK {
		k.t.Fatalf("GET pod %s/%s: %v %+v", ns, name, err, get)
	}
	var again corev1.Pod
	if err := json.Unmarshal(get.Body, &again); err != nil || len(again.Spec.InitContainers) != len(p.Spec.InitContainers) || len(again.Spec.Containers) != len(p.Spec.Containers) {
		k.t.Fatalf("GET pod %s/%s differs from the created one (%v)", ns, name, err)
	}
	return p
}

func podYAML(ns, name string) []byte {
	return fmt.Appendf(nil, `apiVersion: v1
kind: Pod
metadata:
  name: %s
  namespace: %s
spec:
  containers:
  - name: app
    image: example.com/app:1
    ports: [{containerPort: 8080}]
    readinessProbe:
      httpGet: {path: /ready, port: 8080}
`, name, ns)
}

func podJSON(ns, name string, labels, annotations map[string]string) []byte {
	objs, err := kubetest.Objects(podYAML(ns, name))
	if err != nil {
		panic(err)
	}
	var p map[string]any
	_ = json.Unmarshal(objs[0], &p)
	meta := p["metadata"].(map[string]any)
	meta["labels"], meta["annotations"] = labels, annotations
	b, _ := json.Marshal(p)
	return b
}

// restrictedPodJSON is podJSON meeting the restricted pod security
// standard.
func restrictedPodJSON(ns, name string) []byte {
	var p map[string]any
	_ = json.Unmarshal(podJSON(ns, name, nil, nil), &p)
	ctr := p["spec"].(map[string]any)["containers"].([]any)[0].(map[string]any)
	ctr["securityContext"] = map[string]any{
		"allowPrivilegeEscalation": false, "runAsNonRoot": true, "runAsUser": 1000,
		"capabilities": map[string]any{"drop": []string{"ALL"}}, "seccompProfile": map[string]any{"type": "RuntimeDefault"},
	}
	b, _ := json.Marshal(p)
	return b
}

func containerNames(cs []corev1.Container) []string {
	var out []string
	for _, c := range cs {
		out = append(out, c.Name)
	}
	return out
}

func kindOf(obj []byte) string {
	var m struct{ Kind string }
	_ = json.Unmarshal(obj, &m)
	return m.Kind
}
