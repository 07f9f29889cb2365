package outbound_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/websocket"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"

	"github.com/sidecar-mesh/sidecar/internal/toolbin"
	"github.com/sidecar-mesh/sidecar/pkg/forward"
)

// hopSeen is a gRPC health server that records whether the calls it gets
// went through the sidecar's chain (they carry its hop marker).
type hopSeen struct {
	healthpb.HealthServer
	calls, marked atomic.Int64
}

func (h *hopSeen) Check(ctx context.Context, in *healthpb.HealthCheckRequest) (*healthpb.HealthCheckResponse, error) {
	h.calls.Add(1)
	if md, _ := metadata.FromIncomingContext(ctx); len(md.Get(strings.ToLower(forward.HopHeader))) > 0 {
		h.marked.Add(1)
	}
	return h.HealthServer.Check(ctx, in)
}

func grpcHealthUpstream(t *testing.T) (string, *hopSeen) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	h := &hopSeen{HealthServer: health.NewServer()}
	healthpb.RegisterHealthServer(srv, h)
	go srv.Serve(ln)
	t.Cleanup(srv.Stop)
	return ln.Addr().String(), h
}

// connectDial opens a CONNECT tunnel to target through the sidecar at
// proxy, as gRPC's proxy support does.
func connectDial(ctx context.Context, proxy, target string) (net.Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", proxy)
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", target, target)
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil {
		c.Close()
		return nil, err
	}
	if resp.StatusCode != 200 {
		c.Close()
		return nil, fmt.Errorf("CONNECT %s: %s", target, resp.Status)
	}
	return c, nil
}

// grpc-go through a CONNECT tunnel to a service discovery knows: the
// tunnel is served as a connection to the outbound port, each call through
// the chain.
func TestConnectGRPCGo(t *testing.T) {
	addr, h := grpcHealthUpstream(t)
	sc := startSidecar(t, options{static: map[string][]string{"echo": {addr}}})
	cc, err := grpc.NewClient("passthrough:///echo:80", grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, target string) (net.Conn, error) { return connectDial(ctx, sc.addr, target) }))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	for range 5 {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		resp, err := healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{})
		cancel()
		if err != nil || resp.Status != healthpb.HealthCheckResponse_SERVING {
			t.Fatalf("health check through CONNECT echo:80: %v %v", resp, err)
		}
	}
	if h.calls.Load() != 5 || h.marked.Load() != 5 {
		t.Fatalf("the upstream got %d calls, %d through the chain; want 5 and 5", h.calls.Load(), h.marked.Load())
	}
}

// CONNECT to an IP literal or a name discovery does not know stays
// refused, with a hint that fits.
func TestConnectRefusals(t *testing.T) {
	sc := startSidecar(t, options{static: map[string][]string{"echo": {"127.0.0.1:1"}}})
	for _, tc := range []struct {
		target string
		status int
		reason string
	}{
		{"127.0.0.1:80", 403, forward.ReasonNotAllowed},
		{"nosuch:80", 503, forward.ReasonUnknownService},
	} {
		resp, body := sc.raw(t, "CONNECT "+tc.target+" HTTP/1.1\r\nHost: "+tc.target+"\r\n\r\n")
		if resp.StatusCode != tc.status || resp.Header.Get(forward.ErrorHeader) != tc.reason {
			t.Errorf("CONNECT %s: got %d %q %s, want %d %s", tc.target, resp.StatusCode, resp.Header.Get(forward.ErrorHeader), body, tc.status, tc.reason)
		}
		if tc.reason == forward.ReasonUnknownService && strings.Contains(body, "add it to allowHosts") {
			t.Errorf("CONNECT %s: the hint sends a known-service user to allowHosts: %s", tc.target, body)
		}
	}
}

// nodeScript runs a Node.js script with the clients scripts/tools.sh
// installs (grpc-js, undici) and the environment given; it returns stdout.
func nodeScript(t *testing.T, script string, env ...string) string {
	t.Helper()
	node := toolbin.Path(t, "node")
	modules := filepath.Join(toolbin.Dir(t, "node-clients"), "node_modules")
	file := filepath.Join(t.TempDir(), "client.js")
	if err := os.WriteFile(file, []byte(script), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, node, file)
	cmd.Env = append(os.Environ(), append([]string{"NODE_PATH=" + modules}, env...)...)
	out, err := cmd.Output()
	if err != nil {
		stderr := ""
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = string(ee.Stderr)
		}
		t.Fatalf("node: %v\nstdout: %s\nstderr: %s", err, out, stderr)
	}
	return string(out)
}

// grpc-js with http_proxy set (as `sidecar inject --http-proxy` sets it)
// sends CONNECT echo:80 even for a plaintext target.
func TestConnectGRPCJS(t *testing.T) {
	addr, h := grpcHealthUpstream(t)
	sc := startSidecar(t, options{static: map[string][]string{"echo": {addr}}})
	out := nodeScript(t, `
const grpc = require('@grpc/grpc-js');
const client = new grpc.Client('echo:80', grpc.credentials.createInsecure());
let left = 3;
function call() {
  client.makeUnaryRequest('/grpc.health.v1.Health/Check', x => x, x => x, Buffer.alloc(0), (err, res) => {
    if (err) { console.log('error ' + err.code + ' ' + err.details); process.exitCode = 1; client.close(); return; }
    console.log('status ' + res.toString('hex'));
    if (--left > 0) call(); else client.close();
  });
}
call();
`, "http_proxy=http://"+sc.addr, "grpc_proxy=", "no_proxy=", "NO_PROXY=")
	if got := strings.Count(out, "status 0801"); got != 3 { // field 1 = SERVING
		t.Fatalf("grpc-js through http_proxy: %q, want 3 SERVING answers", out)
	}
	if h.marked.Load() != 3 {
		t.Fatalf("the upstream got %d calls through the chain, want 3", h.marked.Load())
	}
}

// undici's ProxyAgent tunnels http:// requests with CONNECT; so does a
// websocket client through a proxy.
func TestConnectUndiciAndWebSocket(t *testing.T) {
	var marked atomic.Int64
	mux := http.NewServeMux()
	mux.HandleFunc("/hello", func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get(forward.HopHeader) != "" {
			marked.Add(1)
		}
		io.WriteString(w, "hello "+r.Host)
	})
	// websocket.Server, not websocket.Handler: a client outside a browser
	// sends no Origin, which Handler refuses.
	mux.Handle("/ws", websocket.Server{Handler: func(ws *websocket.Conn) { io.Copy(ws, ws) }})
	up := httptest.NewServer(mux)
	defer up.Close()
	sc := startSidecar(t, options{static: map[string][]string{"web": {strings.TrimPrefix(up.URL, "http://")}}})
	out := nodeScript(t, `
const { ProxyAgent, request, WebSocket } = require('undici');
const dispatcher = new ProxyAgent({ uri: 'http://`+sc.addr+`' });
(async () => {
  for (let i = 0; i < 3; i++) {
    const { statusCode, body } = await request('http://web/hello', { dispatcher });
    console.log('http ' + statusCode + ' ' + await body.text());
  }
  console.log('done http');
  const ws = new WebSocket('ws://web/ws', { dispatcher });
  ws.onopen = () => ws.send('ping');
  let echoed = false;
  ws.onmessage = (m) => { echoed = true; console.log('ws ' + m.data); ws.close(); };
  // x/net/websocket's server ends the connection without a close frame of
  // its own, which undici reports as an error once the echo is in.
  ws.onerror = (e) => { if (!echoed) { console.log('ws error ' + e.message); process.exitCode = 1; } };
  ws.onclose = () => dispatcher.close();
})().catch((e) => { console.log('error ' + e + ' ' + (e.cause || '')); process.exitCode = 1; dispatcher.close(); });
`)
	if got := strings.Count(out, "http 200 hello web"); got != 3 {
		t.Fatalf("undici ProxyAgent: %q, want 3 answers from web", out)
	}
	if !strings.Contains(out, "ws ping") {
		t.Fatalf("websocket through the proxy: %q, want the echo", out)
	}
	if marked.Load() != 3 {
		t.Fatalf("%d of the requests went through the chain, want 3", marked.Load())
	}
}

// Bytes a client sends right after its CONNECT, before the tunnel's 200,
// are the tunnel's: they reach the destination as sent, whatever they
// look like, and are never judged or served as HTTP requests. (The
// framing check took them for requests: a block that looked like bad HTTP
// was replaced by its placeholder request, and the destination got a
// request the client never sent.)
func TestConnectPipelinedBytesAreTheTunnels(t *testing.T) {
	got := make(chan string, 1)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
				b, _ := io.ReadAll(c) // until the client half-closes or the deadline
				got <- string(b)
			}()
		}
	}()
	dest := ln.Addr().String()
	sc := startSidecar(t, options{allowHosts: []string{dest}, static: map[string][]string{"svc": {"127.0.0.1:1"}}})
	for _, tail := range []string{
		"GET /a HTTP/1.1\r\nHost: x\r\nX: 1\r\n folded\r\n\r\nTAIL-BYTES",
		"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
		"\x16\x03\x01\x00\x05hello",
		"GET /b HTTP/1.1\r\nHost: svc\r\n\r\n",
	} {
		c, err := net.Dial("tcp", sc.addr)
		if err != nil {
			t.Fatal(err)
		}
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(c, "CONNECT "+dest+" HTTP/1.1\r\nHost: "+dest+"\r\n\r\n"+tail)
		br := bufio.NewReader(c)
		resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
		if err != nil || resp.StatusCode != 200 {
			c.Close()
			t.Fatalf("CONNECT %s with %q after it: %v %v", dest, tail, resp, err)
		}
		_ = c.(*net.TCPConn).CloseWrite()
		if dst := <-got; dst != tail {
			t.Errorf("sent %q after the CONNECT; the destination got %q", tail, dst)
		}
		c.Close()
	}
}

// A refused CONNECT ends its connection: what the client sent after it was
// meant for the tunnel and is never served as a request (it was: the
// pipelined GET went to the service its Host named).
func TestRefusedConnectEndsTheConnection(t *testing.T) {
	var seen atomic.Int64
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { seen.Add(1) }))
	t.Cleanup(up.Close)
	sc := startSidecar(t, options{static: map[string][]string{"svc": {up.Listener.Addr().String()}}})
	for _, connect := range []string{"nosuch:80", "127.0.0.1:1"} {
		c, err := net.Dial("tcp", sc.addr)
		if err != nil {
			t.Fatal(err)
		}
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(c, "CONNECT "+connect+" HTTP/1.1\r\nHost: "+connect+"\r\n\r\nGET /a HTTP/1.1\r\nHost: svc\r\n\r\n")
		all, _ := io.ReadAll(c)
		c.Close()
		if n := strings.Count(string(all), "HTTP/1.1 "); n != 1 || !strings.Contains(string(all), "Connection: close") {
			t.Errorf("CONNECT %s refused, then a pipelined GET: %d answers, want 1 with Connection: close\n%s", connect, n, all)
		}
	}
	if n := seen.Load(); n != 0 {
		t.Errorf("the service got %d request(s) meant for a refused tunnel", n)
	}
	// A CONNECT has no content (RFC 9110, 9.3.6): one with a body is refused.
	resp, body := sc.raw(t, "CONNECT svc:80 HTTP/1.1\r\nHost: svc:80\r\nContent-Length: 31\r\n\r\nGET /hidden HTTP/1.1\r\nHost: svc\r\n\r\n")
	if resp.StatusCode != http.StatusBadRequest || seen.Load() != 0 {
		t.Errorf("CONNECT with content: %d %s, service saw %d; want 400 and nothing", resp.StatusCode, body, seen.Load())
	}
}
