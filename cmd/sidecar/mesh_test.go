package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/sidecar-mesh/sidecar/internal/consultest"
	"github.com/sidecar-mesh/sidecar/internal/hostip"
	"github.com/sidecar-mesh/sidecar/internal/toolbin"
)

// meshSidecar is a sidecar in the mesh (in-process `sidecar run --mesh
// consul-connect`) in front of an app of its own.
type meshSidecar struct {
	service                    string
	out, inbound, tls, metrics string
	admin                      string
}

// startMeshSidecar runs service's sidecar in the mesh against agent, in
// front of app (its port); extra flags go last.
func startMeshSidecar(t *testing.T, agent *consultest.Agent, service string, appPort int, extra ...string) meshSidecar {
	t.Helper()
	ms := meshSidecar{service: service, out: freePort(t), inbound: freePort(t), tls: freePort(t), metrics: freePort(t), admin: freePort(t)}
	for i, a := range extra {
		if a == "--inbound-addr" && i+1 < len(extra) {
			ms.inbound = extra[i+1]
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	args := append([]string{"run",
		"--service", service, "--app-port", strconv.Itoa(appPort), "--advertise-addr", "127.0.0.1",
		"--outbound-addr", ms.out, "--inbound-addr", ms.inbound, "--admin-addr", ms.admin, "--metrics-addr", ms.metrics,
		"--health-addr", freePort(t), "--mesh", "consul-connect", "--mesh-inbound-tls", ms.tls,
		"--consul-allow-loopback-endpoints=true", "--drain-window", "1ms", "--log-level", "error"}, extra...)
	go func() {
		_, _, err := cli(t, ctx, map[string]string{"CONSUL_HTTP_ADDR": agent.Addr()}, args...)
		done <- err
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("sidecar run (%s): %v", service, err)
		}
	})
	return ms
}

// app is an app that answers with its name and the path it was asked.
func app(t *testing.T, name string) int {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, name+" "+r.Method+" "+r.URL.Path)
	}))
	t.Cleanup(srv.Close)
	_, port, _ := net.SplitHostPort(strings.TrimPrefix(srv.URL, "http://"))
	n, _ := strconv.Atoi(port)
	return n
}

// call sends method path to service through the sidecar's outbound port.
func (ms meshSidecar) call(c *http.Client, method, service, path string) (int, string, string) {
	req, _ := http.NewRequest(method, "http://"+ms.out+path, nil)
	req.Host = service
	resp, err := c.Do(req)
	if err != nil {
		return 0, err.Error(), ""
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), resp.Header.Get("X-Sidecar-Error")
}

// Two sidecars in the mesh call each other over mutual TLS with
// identities from a real Consul agent: web's app reaches api's app
// through both sidecars, api's sidecar registered as api's connect-proxy;
// intentions made and removed with the consul CLI allow and deny within a
// second; a caller without a certificate is refused at the handshake and
// counted; the plaintext inbound port is the pod's only.
func TestMeshTwoSidecars(t *testing.T) {
	agent := consultest.Start(t)
	web := startMeshSidecar(t, agent, "web", app(t, "web"))
	apiSide := startMeshSidecar(t, agent, "api", app(t, "api"))
	c := &http.Client{Timeout: 5 * time.Second}

	cc := api.DefaultConfig()
	cc.Address = agent.Addr()
	client, err := api.NewClient(cc)
	if err != nil {
		t.Fatal(err)
	}
	// api's sidecar registers api and, beside it, api's connect-proxy on
	// its TLS port; once that passes its checks, web calls api over mutual
	// TLS.
	var proxies []*api.ServiceEntry
	for deadline := time.Now().Add(20 * time.Second); len(proxies) == 0 && time.Now().Before(deadline); {
		time.Sleep(100 * time.Millisecond) // waiting for registration and checks, not on a request path
		proxies, _, err = client.Health().Connect("api", "", true, nil)
	}
	if len(proxies) != 1 || proxies[0].Service.Kind != api.ServiceKindConnectProxy ||
		strconv.Itoa(proxies[0].Service.Port) != strings.Split(apiSide.tls, ":")[1] {
		t.Fatalf("api's passing mesh instances %+v (%v), want its sidecar proxy on its TLS port", proxies, err)
	}
	var code int
	var body, reason string
	for deadline := time.Now().Add(10 * time.Second); ; {
		code, body, reason = web.call(c, "GET", "api", "/hello")
		if sample(t, web.metrics, `sidecar_mesh_handshakes_total{direction="outbound",result="ok"}`) >= 1 || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond) // discovery taking the mesh instance, not a request path
	}
	if code != 200 || body != "api GET /hello" {
		t.Fatalf("web -> api through the mesh: %d %q (%s), want api's answer", code, body, reason)
	}

	// web -> api denied, then allowed again, each within a second.
	waitFor := func(what string, want int) {
		t.Helper()
		start := time.Now()
		for time.Since(start) < time.Second {
			if code, _, _ = web.call(c, "GET", "api", "/x"); code == want {
				t.Logf("%s: %d after %v", what, code, time.Since(start).Round(time.Millisecond))
				return
			}
			time.Sleep(10 * time.Millisecond) // the change propagating, not a request path
		}
		t.Fatalf("%s: still %d after 1s, want %d", what, code, want)
	}
	// Under a steady load, every answer is api's or the intention's 403:
	// no request is lost while the intentions change.
	stop := make(chan struct{})
	lost := make(chan []string, 1)
	go func() {
		var bad []string
		for {
			select {
			case <-stop:
				lost <- bad
				return
			default:
			}
			if code, body, reason := web.call(c, "GET", "api", "/load"); code != 200 && (code != 403 || reason != "not_authorized") {
				bad = append(bad, strconv.Itoa(code)+" "+reason+" "+body)
			}
			time.Sleep(2 * time.Millisecond) // a steady load
		}
	}()
	consulCLI(t, agent, "", "intention", "create", "-deny", "web", "api")
	waitFor("deny web -> api", http.StatusForbidden)
	if code, _, reason = web.call(c, "GET", "api", "/x"); code != 403 || reason != "not_authorized" {
		t.Fatalf("denied call: %d %q, want 403 not_authorized", code, reason)
	}
	consulCLI(t, agent, "", "intention", "delete", "web", "api")
	waitFor("intention deleted", http.StatusOK)
	close(stop)
	if bad := <-lost; len(bad) > 0 {
		t.Fatalf("%d requests lost while the intentions changed: %q", len(bad), bad)
	}

	// L7: api speaks HTTP, and web may GET under /public/ but not
	// /public/admin, and not POST.
	consulCLI(t, agent, "Kind = \"service-defaults\"\nName = \"api\"\nProtocol = \"http\"\n", "config", "write", "-")
	consulCLI(t, agent, `Kind = "service-intentions"
Name = "api"
Sources = [{
  Name = "web"
  Permissions = [
    { Action = "deny", HTTP { PathPrefix = "/public/admin" } },
    { Action = "allow", HTTP { PathPrefix = "/public/", Methods = ["GET"] } },
    { Action = "deny", HTTP { Methods = ["POST"] } },
  ]
}]
`, "config", "write", "-")
	for deadline := time.Now().Add(time.Second); ; {
		if code, _, _ = web.call(c, "POST", "api", "/public/form"); code == http.StatusForbidden || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond) // the entry propagating
	}
	if code, body, _ = web.call(c, "GET", "api", "/public/page"); code != 200 || body != "api GET /public/page" {
		t.Fatalf("GET /public/page under the L7 intention: %d %q, want allowed", code, body)
	}
	if code, _, reason = web.call(c, "POST", "api", "/public/form"); code != 403 || reason != "not_authorized" {
		t.Fatalf("POST under the L7 intention: %d %s, want 403 not_authorized", code, reason)
	}
	// The path is judged as the app reads it: written another way (escapes,
	// dot segments) the denied one is still denied, and the app is sent
	// the path the intentions judged.
	for _, path := range []string{"/public/admin", "/public/%61dmin", "/public/./admin", "/public/x/../admin",
		"/public/%2e%2e/public/admin/users", "/public/x/..;/admin", "/public/x/.%2e;jsessionid=1/admin"} {
		if code, body, reason := web.call(c, "GET", "api", path); code != 403 || reason != "not_authorized" {
			t.Errorf("GET %s under a deny of /public/admin: %d %s %q, want 403 not_authorized", path, code, reason, body)
		}
	}
	if code, body, _ = web.call(c, "GET", "api", "/public/x/../page"); code != 200 || body != "api GET /public/page" {
		t.Fatalf("GET /public/x/../page: %d %q, want 200 from the app for /public/page", code, body)
	}

	// A client without a certificate is refused by api's TLS listener.
	tc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	if resp, err := tc.Get("https://" + apiSide.tls + "/"); err == nil {
		resp.Body.Close()
		t.Fatalf("a client without a certificate got %d, want the handshake refused", resp.StatusCode)
	}
	if n := metricValue(t, apiSide.metrics, `sidecar_mesh_handshakes_total{direction="inbound",result="no_certificate"}`); n < 1 {
		t.Fatalf("no_certificate handshakes counted %v, want at least 1", n)
	}
	if n := metricValue(t, apiSide.metrics, `sidecar_mesh_denied_total{caller="web"}`); n < 1 {
		t.Fatalf("denials of web counted %v, want at least 1", n)
	}

	// sidecar status shows it too.
	out, _, err := cli(t, context.Background(), nil, "status", "--admin", apiSide.admin)
	if err != nil || !strings.Contains(out, "MESH\nidentity spiffe://") || !strings.Contains(out, "/svc/api (trust domain ") {
		t.Fatalf("sidecar status: %v\n%s", err, out)
	}
	// /config shows the identity, never its key.
	cfg := fetch(t, "http://"+apiSide.admin+"/config")
	var view struct {
		MeshIdentity struct {
			SPIFFEID    string `json:"spiffeID"`
			TrustDomain string `json:"trustDomain"`
			Ready       bool   `json:"ready"`
		} `json:"meshIdentity"`
	}
	if err := json.Unmarshal([]byte(cfg), &view); err != nil || !view.MeshIdentity.Ready ||
		!strings.HasSuffix(view.MeshIdentity.SPIFFEID, "/svc/api") || strings.Contains(cfg, "PRIVATE KEY") {
		t.Fatalf("/config = %s (%v), want api's identity and no key", cfg, err)
	}
}

// sample is one sample of a sidecar's /metrics, 0 while it is absent.
func sample(t *testing.T, metrics, name string) float64 {
	t.Helper()
	for _, l := range strings.Split(fetch(t, "http://"+metrics+"/metrics"), "\n") {
		if v, ok := strings.CutPrefix(l, name+" "); ok {
			f, _ := strconv.ParseFloat(v, 64)
			return f
		}
	}
	return 0
}

// consulProxy runs Consul's built-in mTLS proxy (`consul connect proxy`)
// against agent until the test ends.
func consulProxy(t *testing.T, agent *consultest.Agent, args ...string) {
	t.Helper()
	cmd := exec.Command(toolbin.Path(t, "consul"), append([]string{"connect", "proxy", "-log-level", "warn"}, args...)...)
	cmd.Env = append(cmd.Environ(), "CONSUL_HTTP_ADDR=http://"+agent.Addr())
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(os.Interrupt)
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			t.Logf("consul connect proxy %s:\n%s", strings.Join(args, " "), out.String())
		}
	})
}

// The sidecar and Consul's own mesh proxy call each other, both ways:
// our sidecar -> `consul connect proxy` (registered as legacy's proxy) ->
// legacy's app; and `consul connect proxy` with api as its upstream ->
// api's sidecar -> api's app. Each side verifies the other's certificate
// from the same CA, and the intentions hold on both: denied, the built-in
// proxy's calls are refused by our sidecar and ours by it.
func TestMeshInteropWithConsulProxy(t *testing.T) {
	agent := consultest.Start(t)
	web := startMeshSidecar(t, agent, "web", app(t, "web"))
	apiSide := startMeshSidecar(t, agent, "api", app(t, "api"))
	c := &http.Client{Timeout: 5 * time.Second}

	// Our sidecar -> the built-in proxy in front of legacy's app, which is
	// registered as well, as an app in the mesh is.
	legacyApp := app(t, "legacy")
	cc := api.DefaultConfig()
	cc.Address = agent.Addr()
	client, err := api.NewClient(cc)
	if err != nil {
		t.Fatal(err)
	}
	if err := client.Agent().ServiceRegister(&api.AgentServiceRegistration{Name: "legacy", Address: "127.0.0.1", Port: legacyApp}); err != nil {
		t.Fatal(err)
	}
	listen := freePort(t)
	consulProxy(t, agent, "-service", "legacy", "-service-addr", "127.0.0.1:"+strconv.Itoa(legacyApp), "-listen", listen, "-register")
	var code int
	var body, reason string
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); {
		if code, body, reason = web.call(c, "GET", "legacy", "/old"); code == 200 {
			break
		}
		time.Sleep(100 * time.Millisecond) // the proxy registering, its certificate, discovery: not a request path
	}
	if code != 200 || body != "legacy GET /old" {
		t.Fatalf("web's sidecar -> consul connect proxy -> legacy: %d %q (%s)", code, body, reason)
	}

	// The built-in proxy, as a caller, -> api's sidecar -> api's app.
	up := freePort(t)
	consulProxy(t, agent, "-service", "caller", "-upstream", "api:"+strings.Split(up, ":")[1])
	var resp *http.Response
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); {
		if resp, err = c.Get("http://" + up + "/from-consul"); err == nil && resp.StatusCode == 200 {
			break
		}
		if err == nil {
			resp.Body.Close()
		}
		time.Sleep(100 * time.Millisecond) // the proxy's certificate and its upstream's instances: not a request path
	}
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("consul connect proxy -> api's sidecar: %v %v", resp, err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(b) != "api GET /from-consul" {
		t.Fatalf("consul connect proxy -> api's sidecar: %q", b)
	}

	// Denied by intentions: our sidecar refuses the built-in proxy's
	// caller, and the built-in proxy refuses our web.
	consulCLI(t, agent, "", "intention", "create", "-deny", "caller", "api")
	consulCLI(t, agent, "", "intention", "create", "-deny", "web", "legacy")
	deadline := time.Now().Add(5 * time.Second)
	for {
		r, err := c.Get("http://" + up + "/from-consul")
		denied := err == nil && r.StatusCode == http.StatusForbidden
		if err == nil {
			r.Body.Close()
		}
		if denied {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("caller -> api after a deny intention: %v %v, want 403", r, err)
		}
		time.Sleep(20 * time.Millisecond) // the intention propagating
	}
	for {
		code, _, reason = web.call(c, "GET", "legacy", "/old")
		if code != 200 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("web -> legacy still answered after a deny intention")
		}
		time.Sleep(20 * time.Millisecond) // the intention propagating
	}
	t.Logf("web -> legacy denied by Consul's proxy: %d %s", code, reason)
	if n := sample(t, apiSide.metrics, `sidecar_mesh_denied_total{caller="caller"}`); n < 1 {
		t.Fatalf("api's sidecar counted %v denials of caller", n)
	}
}

// A CA rotation under load fails no request: while web calls api without
// pause, the agent's CA is replaced (a new root, cross-signed by the old);
// both sidecars take the new roots and their new certificates without
// dropping a connection, and a sidecar started after the rotation, whose
// certificate only the new root signs, is served by api at once.
func TestMeshCARotationUnderLoad(t *testing.T) {
	agent := consultest.Start(t)
	web := startMeshSidecar(t, agent, "web", app(t, "web"))
	apiSide := startMeshSidecar(t, agent, "api", app(t, "api"))
	c := &http.Client{Timeout: 5 * time.Second}
	waitMesh(t, web, "api")
	rootOf := func(ms meshSidecar) string {
		var view struct {
			MeshIdentity struct {
				ActiveRootID string `json:"activeRootID"`
				Serial       string `json:"serial"`
			} `json:"meshIdentity"`
		}
		_ = json.Unmarshal([]byte(fetch(t, "http://"+ms.admin+"/config")), &view)
		return view.MeshIdentity.ActiveRootID + " " + view.MeshIdentity.Serial
	}
	before := rootOf(web)

	stop := make(chan struct{})
	type tally struct{ ok, failed int }
	results := make(chan tally, 1)
	go func() {
		var n tally
		for {
			select {
			case <-stop:
				results <- n
				return
			default:
			}
			if code, body, reason := web.call(c, "GET", "api", "/load"); code == 200 {
				n.ok++
			} else {
				n.failed++
				t.Logf("failed during the rotation: %d %q %s", code, body, reason)
			}
			time.Sleep(5 * time.Millisecond) // a steady load of about 150 requests a second
		}
	}()
	var once sync.Once
	var n tally
	finish := func() { once.Do(func() { close(stop); n = <-results }) }
	defer finish()
	time.Sleep(500 * time.Millisecond) // load before the rotation
	cc := api.DefaultConfig()
	cc.Address = agent.Addr()
	client, err := api.NewClient(cc)
	if err != nil {
		t.Fatal(err)
	}
	// A new key type makes the built-in CA generate a new root, signed
	// across by the old one.
	if _, err := client.Connect().CASetConfig(&api.CAConfig{Provider: "consul",
		Config: map[string]any{"LeafCertTTL": "72h", "PrivateKeyType": "ec", "PrivateKeyBits": 384}}, nil); err != nil {
		t.Fatalf("rotating the CA: %v", err)
	}
	for deadline := time.Now().Add(20 * time.Second); rootOf(web) == before || strings.Split(rootOf(apiSide), " ")[0] != strings.Split(rootOf(web), " ")[0]; {
		if time.Now().After(deadline) {
			t.Fatalf("web's identity still %q, api's %q 20s after the rotation", rootOf(web), rootOf(apiSide))
		}
		time.Sleep(100 * time.Millisecond) // the new root and leaves propagating
	}
	time.Sleep(500 * time.Millisecond) // load after the rotation
	finish()
	t.Logf("%d requests during the rotation, %d failed; web's identity %q -> %q", n.ok+n.failed, n.failed, before, rootOf(web))
	if n.failed != 0 || n.ok < 50 {
		t.Fatalf("%d of %d requests failed during the CA rotation, want 0 (and a steady load)", n.failed, n.ok+n.failed)
	}

	// A sidecar whose certificate the new root signs is served at once.
	late := startMeshSidecar(t, agent, "late", app(t, "late"))
	waitMesh(t, late, "api")
	if code, body, reason := late.call(c, "GET", "api", "/new"); code != 200 {
		t.Fatalf("a caller with a certificate of the new root: %d %q %s", code, body, reason)
	}
}

// waitMesh waits until ms calls service over mutual TLS.
func waitMesh(t *testing.T, ms meshSidecar, service string) {
	t.Helper()
	c := &http.Client{Timeout: 5 * time.Second}
	for deadline := time.Now().Add(20 * time.Second); ; {
		// Any answer of the app's (not one the sidecar made itself), once
		// a mesh handshake was made.
		code, _, reason := ms.call(c, "GET", service, "/")
		if code != 0 && reason == "" && sample(t, ms.metrics, `sidecar_mesh_handshakes_total{direction="outbound",result="ok"}`) >= 1 {
			return
		}
		if time.Now().After(deadline) {
			var mesh []string
			for _, l := range strings.Split(fetch(t, "http://"+ms.metrics+"/metrics"), "\n") {
				if strings.HasPrefix(l, "sidecar_mesh") || strings.HasPrefix(l, "sidecar_discovery") {
					mesh = append(mesh, l)
				}
			}
			t.Fatalf("%s does not call %s over the mesh after 20s (last %d %s); /endpoints: %s\n%s", ms.service, service, code, reason,
				fetch(t, "http://"+ms.admin+"/endpoints"), strings.Join(mesh, "\n"))
		}
		time.Sleep(100 * time.Millisecond) // registration, checks, certificates: not a request path
	}
}

// In the mesh the plaintext inbound port serves the pod only: a caller on
// another host is refused with 403 not_authorized and told to come through
// the mesh, while the pod's own loopback callers (probes, the app itself)
// are served. An endpoint that answers for the wrong service is refused
// at the handshake: 502 upstream_tls_failure.
func TestMeshPlaintextAndWrongService(t *testing.T) {
	ip := hostip.NonLoopback(t)
	agent := consultest.Start(t)
	_, port, _ := net.SplitHostPort(freePort(t))
	apiSide := startMeshSidecar(t, agent, "api", app(t, "api"), "--inbound-addr", net.JoinHostPort(ip, port))
	web := startMeshSidecar(t, agent, "web", app(t, "web"))
	waitMesh(t, web, "api")

	code, body := hostip.Call(t, apiSide.inbound, "GET", "/x", "", nil)
	if code != http.StatusForbidden || !strings.Contains(body, "not_authorized") || !strings.Contains(body, "through the mesh") {
		t.Fatalf("a caller on another host at the plaintext inbound port: %d %s, want 403 not_authorized", code, body)
	}

	// A catalog entry that says api's TLS port is an instance of "fake":
	// api's certificate does not prove that.
	cc := api.DefaultConfig()
	cc.Address = agent.Addr()
	client, err := api.NewClient(cc)
	if err != nil {
		t.Fatal(err)
	}
	_, tlsPort, _ := net.SplitHostPort(apiSide.tls)
	p, _ := strconv.Atoi(tlsPort)
	if err := client.Agent().ServiceRegister(&api.AgentServiceRegistration{Name: "fake", Address: "127.0.0.1", Port: app(t, "fake")}); err != nil {
		t.Fatal(err)
	}
	if err := client.Agent().ServiceRegister(&api.AgentServiceRegistration{Kind: api.ServiceKindConnectProxy, Name: "fake-sidecar-proxy",
		Address: "127.0.0.1", Port: p, Proxy: &api.AgentServiceConnectProxyConfig{DestinationServiceName: "fake"}}); err != nil {
		t.Fatal(err)
	}
	c := &http.Client{Timeout: 5 * time.Second}
	var reason string
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); {
		if code, _, reason = web.call(c, "GET", "fake", "/"); reason == "upstream_tls_failure" {
			break
		}
		time.Sleep(100 * time.Millisecond) // discovery taking the entry: not a request path
	}
	if code != http.StatusBadGateway || reason != "upstream_tls_failure" {
		t.Fatalf("web -> fake (api's TLS port): %d %s, want 502 upstream_tls_failure", code, reason)
	}
	if n := sample(t, web.metrics, `sidecar_mesh_handshakes_total{direction="outbound",result="wrong_service"}`); n < 1 {
		t.Fatalf("wrong_service handshakes counted %v, want at least 1", n)
	}
}

// gRPC crosses the mesh: a grpc-go client calls api's gRPC server through
// web's sidecar, which calls api's sidecar over mutual TLS with HTTP/2
// (ALPN h2), trailers and all.
func TestMeshGRPC(t *testing.T) {
	agent := consultest.Start(t)
	up := startGuideUpstream(t)
	_, p, _ := net.SplitHostPort(up.addr)
	upPort, _ := strconv.Atoi(p)
	startMeshSidecar(t, agent, "api", upPort)
	web := startMeshSidecar(t, agent, "web", app(t, "web"))
	waitMesh(t, web, "api")

	handshakes := sample(t, web.metrics, `sidecar_mesh_handshakes_total{direction="outbound",result="ok"}`)
	conn, err := grpc.NewClient(web.out, grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithAuthority("api"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("gRPC through the mesh: %v %v, want SERVING", resp, err)
	}
	if n := up.grpc.Load() + up.direct.Load(); n != 1 {
		t.Fatalf("api's gRPC server saw %d calls, want 1", n)
	}
	// HTTP/2 requests have a pooled transport of their own: the call made
	// a new mesh connection, negotiated h2.
	if n := sample(t, web.metrics, `sidecar_mesh_handshakes_total{direction="outbound",result="ok"}`); n != handshakes+1 {
		t.Fatalf("web's mesh handshakes went from %v to %v for the gRPC call, want one more", handshakes, n)
	}
}
