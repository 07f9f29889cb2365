// Package kubetest runs a real Kubernetes API server (kube-apiserver v1.32.3
// on a real etcd) for tests: no nodes, no controllers, just the API with
// its validation, defaulting, admission and webhooks, on loopback.
//
// Start returns once /readyz answers 200 and stops both processes, and every
// goroutine they needed, when the test ends. Binaries: kube-apiserver from
// $SIDECAR_KUBE_APISERVER_BIN, else PATH, else the cache of scripts/tools.sh;
// etcd from $SIDECAR_ETCD_BIN, else PATH, else /usr/bin/etcd (Debian's
// etcd-server). `scripts/tools.sh test` installs both. Without them, Start
// skips the test, or fails it when $CI is set.
package kubetest

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sidecar-mesh/sidecar/internal/toolbin"
)

const (
	// readyTimeout bounds the wait for etcd and for the API server's /readyz
	// (about 3 s on an idle 2-core machine; much more under load).
	readyTimeout = 120 * time.Second
	// stopTimeout is how long a process gets after SIGTERM before SIGKILL.
	stopTimeout = 10 * time.Second
	// startAttempts is how often Start tries fresh ports when a process
	// exits during startup (another process took a port in between).
	startAttempts = 3
	// tailBytes is how much of a process's output failure messages quote.
	tailBytes = 6 << 10
	// Version is the kube-apiserver version scripts/tools.sh builds.
	Version     = "v1.32.3"
	installHint = "run scripts/tools.sh test (builds kube-apiserver " + Version + " into ${XDG_CACHE_HOME:-$HOME/.cache}/sidecar-tools and installs Debian's etcd-server) or set SIDECAR_KUBE_APISERVER_BIN and SIDECAR_ETCD_BIN"
)

// Server is a running kube-apiserver with its etcd. Its methods are safe
// for concurrent use.
type Server struct {
	// URL is the API server's base URL, https://127.0.0.1:PORT.
	URL string
	// Token is a bearer token of a cluster admin (group system:masters).
	Token string
	// CAFile is the PEM file of the CA that signed the serving certificate.
	CAFile string

	client *http.Client
	dir    string

	mu        sync.Mutex // guards the fields below
	etcd      *process
	apiserver *process
	resources map[string]apiResource // "group/version Kind" -> resource
}

// apiResource is what discovery says about a kind.
type apiResource struct {
	Name       string `json:"name"`
	Kind       string `json:"kind"`
	Namespaced bool   `json:"namespaced"`
}

// Start runs etcd and kube-apiserver on free loopback ports and waits until
// the API server is ready. Both are stopped, and their files removed, when
// t ends.
func Start(t testing.TB) *Server {
	t.Helper()
	apiserverBin, err := findBinary("kube-apiserver", "SIDECAR_KUBE_APISERVER_BIN", true)
	if err != nil {
		missingBinary(t, err)
		return nil
	}
	etcdBin, err := findBinary("etcd", "SIDECAR_ETCD_BIN", false)
	if err != nil {
		missingBinary(t, err)
		return nil
	}
	s := &Server{dir: t.TempDir(), resources: map[string]apiResource{}}
	t.Cleanup(s.Stop) // before the directory is removed
	if err := s.writeCredentials(); err != nil {
		t.Fatalf("kubetest: %v", err)
	}
	ca, err := os.ReadFile(s.CAFile)
	if err != nil {
		t.Fatalf("kubetest: %v", err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca)
	s.client = &http.Client{
		Timeout: 30 * time.Second,
		// No kept connections: nothing outlives a request (goleak), and a
		// stopped server is seen at once.
		Transport: &http.Transport{
			TLSClientConfig:   &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12},
			DisableKeepAlives: true,
			Proxy:             nil,
		},
	}
	start := time.Now()
	for attempt := 1; ; attempt++ {
		err := s.run(etcdBin, apiserverBin)
		if err == nil {
			t.Logf("kubetest: kube-apiserver %s ready at %s in %.1fs", Version, s.URL, time.Since(start).Seconds())
			return s
		}
		if !errors.Is(err, errExited) || attempt == startAttempts {
			t.Fatalf("kubetest: starting etcd and kube-apiserver (attempt %d of %d): %v", attempt, startAttempts, err)
		}
		t.Logf("kubetest: a process exited during startup (attempt %d), retrying on new ports: %v", attempt, err)
	}
}

// Stop stops the API server, then etcd: SIGTERM, SIGKILL after 10 s. It
// returns once the processes and their waiter goroutines are gone.
func (s *Server) Stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, p := range []**process{&s.apiserver, &s.etcd} {
		if *p != nil {
			(*p).stop()
			*p = nil
		}
	}
}

// run starts etcd and the API server on fresh ports and waits for both.
func (s *Server) run(etcdBin, apiserverBin string) error {
	ports, err := freePorts(3)
	if err != nil {
		return err
	}
	etcdURL := "http://127.0.0.1:" + strconv.Itoa(ports[0])
	peerURL := "http://127.0.0.1:" + strconv.Itoa(ports[1])
	dataDir, err := os.MkdirTemp(s.dir, "etcd-")
	if err != nil {
		return err
	}
	etcd, err := launch("etcd", etcdBin, []string{
		"--name=kubetest",
		"--data-dir=" + dataDir,
		"--listen-client-urls=" + etcdURL,
		"--advertise-client-urls=" + etcdURL,
		"--listen-peer-urls=" + peerURL,
		"--initial-advertise-peer-urls=" + peerURL,
		"--initial-cluster=kubetest=" + peerURL,
		"--logger=zap",
		"--log-level=warn",
	}, s.dir)
	if err != nil {
		return err
	}
	s.mu.Lock()
	s.etcd = etcd
	s.mu.Unlock()
	if err := waitFor(etcd, readyTimeout, func(ctx context.Context) error {
		return checkEtcd(ctx, etcdURL)
	}); err != nil {
		s.Stop()
		return err
	}
	s.URL = "https://127.0.0.1:" + strconv.Itoa(ports[2])
	apiserver, err := launch("kube-apiserver", apiserverBin, []string{
		"--etcd-servers=" + etcdURL,
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(ports[2]),
		"--cert-dir=" + filepath.Join(s.dir, "certs"),
		"--tls-cert-file=" + filepath.Join(s.dir, "serving.crt"),
		"--tls-private-key-file=" + filepath.Join(s.dir, "serving.key"),
		"--token-auth-file=" + filepath.Join(s.dir, "tokens.csv"),
		"--authorization-mode=RBAC",
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file=" + filepath.Join(s.dir, "sa.key"),
		"--service-account-signing-key-file=" + filepath.Join(s.dir, "sa.key"),
		"--service-cluster-ip-range=10.96.0.0/24",
		"--endpoint-reconciler-type=none",
		"--profiling=false",
	}, s.dir)
	if err != nil {
		s.Stop()
		return err
	}
	s.mu.Lock()
	s.apiserver = apiserver
	s.mu.Unlock()
	if err := waitFor(apiserver, readyTimeout, s.checkReady); err != nil {
		s.Stop()
		return err
	}
	return nil
}

// writeCredentials writes the serving certificate, the service account
// signing key and the token file.
func (s *Server) writeCredentials() error {
	certPEM, keyPEM, err := SelfSignedCert([]string{"127.0.0.1", "localhost"})
	if err != nil {
		return err
	}
	s.CAFile = filepath.Join(s.dir, "serving.crt")
	saKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	saDER, err := x509.MarshalECPrivateKey(saKey)
	if err != nil {
		return err
	}
	token := make([]byte, 16)
	if _, err := rand.Read(token); err != nil {
		return err
	}
	s.Token = hex.EncodeToString(token)
	for name, data := range map[string][]byte{
		"serving.crt": certPEM,
		"serving.key": keyPEM,
		"sa.key":      pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: saDER}),
		"tokens.csv":  []byte(s.Token + ",kubetest-admin,kubetest-admin,system:masters\n"),
	} {
		if err := os.WriteFile(filepath.Join(s.dir, name), data, 0o600); err != nil {
			return err
		}
	}
	return nil
}

// SelfSignedCert makes an ECDSA P-256 certificate for hosts (IPs or DNS
// names) that is its own CA, valid for a day: PEM certificate and key.
func SelfSignedCert(hosts []string) (certPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: hosts[0]},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, err
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), nil
}

// WriteCert writes a fresh SelfSignedCert for 127.0.0.1 and localhost to
// certFile and keyFile, each written beside and renamed into place, as the
// kubelet swaps the files of a mounted Secret, and returns the
// certificate's PEM.
func WriteCert(t testing.TB, certFile, keyFile string) []byte {
	t.Helper()
	certPEM, keyPEM, err := SelfSignedCert([]string{"127.0.0.1", "localhost"})
	if err != nil {
		t.Fatal(err)
	}
	for file, data := range map[string][]byte{certFile: certPEM, keyFile: keyPEM} {
		if err := os.WriteFile(file+".new", data, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(file+".new", file); err != nil {
			t.Fatal(err)
		}
	}
	return certPEM
}

func (s *Server) checkReady(ctx context.Context) error {
	resp, err := s.Do(ctx, http.MethodGet, "/readyz", nil)
	if err != nil {
		return err
	}
	if resp.Status != http.StatusOK {
		return fmt.Errorf("GET /readyz: %d %s", resp.Status, tail(resp.Body, 2000))
	}
	return nil
}

func checkEtcd(ctx context.Context, base string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/health", nil)
	if err != nil {
		return err
	}
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableKeepAlives: true, Proxy: nil}}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if resp.StatusCode != http.StatusOK || !bytes.Contains(body, []byte(`"true"`)) {
		return fmt.Errorf("GET %s/health: %s %s", base, resp.Status, body)
	}
	return nil
}

// Response is an API server answer.
type Response struct {
	Status int
	Body   []byte
	// Warnings are the API server's Warning headers (deprecations, fields
	// it dropped).
	Warnings []string
}

// Do sends a request with the admin token; a JSON body is sent as
// application/json, unless it starts with '[' on a PATCH (a JSON Patch).
func (s *Server) Do(ctx context.Context, method, path string, body []byte) (*Response, error) {
	var r io.Reader
	if body != nil {
		r = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, s.URL+path, r)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+s.Token)
	req.Header.Set("Accept", "application/json")
	if body != nil {
		ct := "application/json"
		if method == http.MethodPatch {
			ct = "application/merge-patch+json"
			if len(body) > 0 && body[0] == '[' {
				ct = "application/json-patch+json"
			}
		}
		req.Header.Set("Content-Type", ct)
	}
	resp, err := s.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 32<<20))
	if err != nil {
		return nil, fmt.Errorf("%s %s: reading the body: %w", method, path, err)
	}
	return &Response{Status: resp.StatusCode, Body: data, Warnings: resp.Header.Values("Warning")}, nil
}

// ResourcePath is the collection path of a kind (from discovery), e.g.
// /apis/apps/v1/namespaces/default/deployments; namespace is ignored for
// cluster-scoped kinds, and "default" when empty for namespaced ones.
func (s *Server) ResourcePath(ctx context.Context, apiVersion, kind, namespace string) (string, error) {
	r, err := s.resource(ctx, apiVersion, kind)
	if err != nil {
		return "", err
	}
	base := "/apis/" + apiVersion
	if !strings.Contains(apiVersion, "/") {
		base = "/api/" + apiVersion
	}
	if !r.Namespaced {
		return base + "/" + r.Name, nil
	}
	if namespace == "" {
		namespace = "default"
	}
	return base + "/namespaces/" + url.PathEscape(namespace) + "/" + r.Name, nil
}

func (s *Server) resource(ctx context.Context, apiVersion, kind string) (apiResource, error) {
	key := apiVersion + " " + kind
	s.mu.Lock()
	r, ok := s.resources[key]
	s.mu.Unlock()
	if ok {
		return r, nil
	}
	path := "/apis/" + apiVersion
	if !strings.Contains(apiVersion, "/") {
		path = "/api/" + apiVersion
	}
	resp, err := s.Do(ctx, http.MethodGet, path, nil)
	if err != nil {
		return apiResource{}, err
	}
	if resp.Status != http.StatusOK {
		return apiResource{}, fmt.Errorf("discovery: GET %s: %d %s", path, resp.Status, tail(resp.Body, 500))
	}
	var list struct {
		Resources []apiResource `json:"resources"`
	}
	if err := json.Unmarshal(resp.Body, &list); err != nil {
		return apiResource{}, fmt.Errorf("discovery: GET %s: %w", path, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, r := range list.Resources {
		if !strings.Contains(r.Name, "/") { // not a subresource
			s.resources[apiVersion+" "+r.Kind] = r
		}
	}
	r, ok = s.resources[key]
	if !ok {
		return apiResource{}, fmt.Errorf("discovery: the API server has no kind %s in %s", kind, apiVersion)
	}
	return r, nil
}

// CreateOptions say how Create sends an object.
type CreateOptions struct {
	// DryRun validates and admits the object (webhooks included) without
	// storing it.
	DryRun bool
}

// Create posts one object (JSON) with strict field validation: unknown or
// duplicate fields are errors. It fails unless the API server answers 201
// (200 for a dry run), and returns the object as the server has it.
func (s *Server) Create(ctx context.Context, obj []byte, opts CreateOptions) (*Response, error) {
	var m struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
		Metadata   struct {
			Name      string `json:"name"`
			Namespace string `json:"namespace"`
		} `json:"metadata"`
	}
	if err := json.Unmarshal(obj, &m); err != nil {
		return nil, fmt.Errorf("not a Kubernetes object: %w", err)
	}
	path, err := s.ResourcePath(ctx, m.APIVersion, m.Kind, m.Metadata.Namespace)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", m.Kind, m.Metadata.Name, err)
	}
	q := url.Values{"fieldValidation": {"Strict"}}
	if opts.DryRun {
		q.Set("dryRun", "All")
	}
	path += "?" + q.Encode()
	resp, err := s.Do(ctx, http.MethodPost, path, obj)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", m.Kind, m.Metadata.Name, err)
	}
	if resp.Status != http.StatusCreated && resp.Status != http.StatusOK {
		return resp, &APIError{Method: http.MethodPost, Path: path, Status: resp.Status, Message: statusMessage(resp.Body),
			Object: m.Kind + " " + m.Metadata.Name}
	}
	return resp, nil
}

// CreateOnce creates obj as Create does, unless it exists already.
func (s *Server) CreateOnce(ctx context.Context, obj []byte) error {
	_, err := s.Create(ctx, obj, CreateOptions{})
	var apiErr *APIError
	if errors.As(err, &apiErr) && apiErr.Status == http.StatusConflict {
		return nil
	}
	return err
}

// Namespace creates a namespace with labels, and its default service
// account (no controller manager runs to make it), unless they exist.
func (s *Server) Namespace(ctx context.Context, name string, labels map[string]string) error {
	ns, _ := json.Marshal(map[string]any{"apiVersion": "v1", "kind": "Namespace",
		"metadata": map[string]any{"name": name, "labels": labels}})
	if err := s.CreateOnce(ctx, ns); err != nil {
		return err
	}
	sa, _ := json.Marshal(map[string]any{"apiVersion": "v1", "kind": "ServiceAccount",
		"metadata": map[string]any{"name": "default", "namespace": name}})
	return s.CreateOnce(ctx, sa)
}

// APIError is an answer other than success.
type APIError struct {
	Method, Path, Object string
	Status               int
	Message              string
}

func (e *APIError) Error() string {
	return fmt.Sprintf("%s: %s %s: %d: %s", e.Object, e.Method, e.Path, e.Status, e.Message)
}

// statusMessage is the message of a metav1.Status body, or the body.
func statusMessage(body []byte) string {
	var st struct {
		Message string `json:"message"`
	}
	if json.Unmarshal(body, &st) == nil && st.Message != "" {
		return st.Message
	}
	return tail(body, 2000)
}

func tail(b []byte, n int) string {
	if len(b) > n {
		return "..." + string(b[len(b)-n:])
	}
	return string(b)
}

// ---- processes ----------------------------------------------------------

// process is one run of a binary.
type process struct {
	name string
	cmd  *exec.Cmd
	out  *syncBuffer
	done chan struct{} // closed once cmd.Wait has returned
	err  error         // cmd.Wait's result, set before done is closed
}

var errExited = errors.New("process exited")

func launch(name, bin string, args []string, dir string) (*process, error) {
	out := &syncBuffer{}
	cmd := exec.Command(bin, args...)
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = out, out
	cmd.Env = environWithoutProxy()
	cmd.WaitDelay = time.Second
	setProcAttr(cmd)
	fmt.Fprintf(out, "--- kubetest: %s %s\n", bin, strings.Join(args, " "))
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("exec %s: %w", bin, err)
	}
	p := &process{name: name, cmd: cmd, out: out, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// environWithoutProxy drops proxy settings: the API server must call the
// webhooks on loopback directly.
func environWithoutProxy() []string {
	var env []string
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		switch strings.ToUpper(name) {
		case "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY":
			continue
		}
		env = append(env, kv)
	}
	return env
}

// waitFor polls check every 100 ms until it succeeds, the process exits or
// timeout passes.
func waitFor(p *process, timeout time.Duration, check func(context.Context) error) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	var last error
	for {
		cctx, ccancel := context.WithTimeout(ctx, 5*time.Second)
		last = check(cctx)
		ccancel()
		if last == nil {
			return nil
		}
		select {
		case <-p.done:
			return fmt.Errorf("%w: %s exited before it was ready (%v); last check: %v\n%s output (tail):\n%s",
				errExited, p.name, p.err, last, p.name, p.out.tail(tailBytes))
		case <-ctx.Done():
			return fmt.Errorf("%s not ready within %s; last check: %v\n%s output (tail):\n%s",
				p.name, timeout, last, p.name, p.out.tail(tailBytes))
		case <-tick.C:
		}
	}
}

func (p *process) stop() {
	select {
	case <-p.done:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	timer := time.NewTimer(stopTimeout)
	defer timer.Stop()
	select {
	case <-p.done:
	case <-timer.C:
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

// freePorts finds n distinct free TCP ports on 127.0.0.1; they are released
// before the processes bind them.
func freePorts(n int) ([]int, error) {
	var ports []int
	var lns []net.Listener
	defer func() {
		for _, l := range lns {
			l.Close()
		}
	}()
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		lns = append(lns, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// findBinary returns the binary named by env (and then only that), else
// name on PATH, else (cached) the scripts/tools.sh cache, else /usr/bin.
func findBinary(name, env string, cached bool) (string, error) {
	if bin := os.Getenv(env); bin != "" {
		if err := toolbin.Executable(bin); err != nil {
			return "", fmt.Errorf("%s=%s: %w", env, bin, err)
		}
		return bin, nil
	}
	if bin, err := exec.LookPath(name); err == nil {
		return bin, nil
	}
	var tried []string
	if cached {
		bin, err := toolbin.Cached(name)
		if err != nil {
			return "", fmt.Errorf("%s is not on PATH and the tools cache is unknown: %w", name, err)
		}
		tried = append(tried, bin)
	}
	tried = append(tried, filepath.Join("/usr/bin", name), filepath.Join("/usr/sbin", name))
	for _, bin := range tried {
		if toolbin.Executable(bin) == nil {
			return bin, nil
		}
	}
	return "", fmt.Errorf("%s is not on PATH nor in %s", name, strings.Join(tried, ", "))
}

// missingBinary fails the test when $CI is set, and skips it otherwise.
func missingBinary(t testing.TB, err error) {
	t.Helper()
	if os.Getenv("CI") != "" {
		t.Fatalf("kubetest: %v (CI is set, so this fails instead of skipping); %s", err, installHint)
	}
	t.Skipf("kubetest: %v; %s", err, installHint)
}

// syncBuffer collects a process's output.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// tail returns at most the last n bytes, starting at a line when it can.
func (b *syncBuffer) tail(n int) string {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := b.buf.Bytes()
	if len(out) <= n {
		return string(out)
	}
	out = out[len(out)-n:]
	if i := bytes.IndexByte(out, '\n'); i >= 0 {
		out = out[i+1:]
	}
	return "...\n" + string(out)
}
