package mesh_test

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/sidecar-mesh/sidecar/internal/consultest"
	"github.com/sidecar-mesh/sidecar/internal/freeport"
	"github.com/sidecar-mesh/sidecar/internal/toolbin"
	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/mesh"
)

// TestConsulProxyCallsUs: Consul's built-in proxy, as the upstream side of
// service frontend, finds api through our proxy registration and calls
// our ServerTLS: each side verifies the other.
func TestConsulProxyCallsUs(t *testing.T) {
	a, c := meshAgent(t)
	apiID := startIdentity(t, c, "api")
	srv := serveTLS(t, apiID.ServerTLS())
	_, portStr, _ := net.SplitHostPort(srv.addr)
	port, _ := strconv.Atoi(portStr)

	reg, err := discovery.Register(discovery.RegistrationConfig{Client: c, Service: "api", ID: "api-1", Address: "127.0.0.1", Port: 15006,
		SidecarProxy: &discovery.SidecarProxy{Port: port, AppPort: 8080}})
	if err != nil {
		t.Fatalf("register api and its sidecar proxy: %v", err)
	}
	t.Cleanup(func() { _ = reg.Deregister(context.Background()) })
	waitFor(t, 5*time.Second, "api's sidecar proxy passing", func() bool {
		entries, _, err := c.Health().Connect("api", "", true, nil)
		return err == nil && len(entries) == 1
	})

	upstream := freePort(t)
	consulProxy(t, a, "-service", "frontend", "-upstream", "api:"+strconv.Itoa(upstream))
	conn := dialWhenUp(t, net.JoinHostPort("127.0.0.1", strconv.Itoa(upstream)))
	if err := echoes(conn); err != nil {
		t.Fatalf("through Consul's proxy to api: %v", err)
	}
	h := srv.accepted(t)
	if h.caller.Service != "frontend" {
		t.Errorf("api's caller through Consul's proxy = %v, want service frontend", h.caller)
	}
	// Consul's proxy takes no part in ALPN (connect/proxy configures no
	// protocols, for its client side as for its server side): the inbound
	// side gets the app's protocol with nothing negotiated.
	if h.state.NegotiatedProtocol != "" {
		t.Errorf("ALPN with Consul's proxy: %q negotiated, want none", h.state.NegotiatedProtocol)
	}
}

// TestWeCallConsulProxy: our ClientTLS dials the public listener of
// Consul's built-in proxy for service db, which verifies our certificate
// and forwards to db.
func TestWeCallConsulProxy(t *testing.T) {
	a, c := meshAgent(t)
	web := startIdentity(t, c, "web")
	app := echoApp(t)
	public := net.JoinHostPort("127.0.0.1", strconv.Itoa(freePort(t)))
	consulProxy(t, a, "-service", "db", "-listen", public, "-service-addr", app)
	dialWhenUp(t, public).Close()

	for _, protos := range [][]string{nil, {"http/1.1"}} {
		cfg := web.ClientTLS("db")
		cfg.NextProtos = protos
		conn, err := dialTLS(t, public, cfg)
		if err != nil {
			t.Fatalf("web dials db's Consul proxy offering ALPN %q: %v", protos, err)
		}
		cs := conn.ConnectionState()
		if got := cs.PeerCertificates[0].URIs[0].String(); got != "spiffe://"+web.Status().TrustDomain+"/ns/default/dc/dc1/svc/db" {
			t.Errorf("db's Consul proxy presented %s, want db's SPIFFE ID", got)
		}
		if cs.NegotiatedProtocol != "" {
			t.Errorf("ALPN with db's Consul proxy offering %q: %q negotiated, want none", protos, cs.NegotiatedProtocol)
		}
	}
	_, err := dialTLS(t, public, web.ClientTLS("payments"))
	var pe *mesh.PeerError
	if !errors.As(err, &pe) || pe.Reason != mesh.ReasonWrongService {
		t.Errorf("web dials db's Consul proxy as payments: %v, want a *mesh.PeerError of reason %s", err, mesh.ReasonWrongService)
	}
}

// consulProxy runs `consul connect proxy` with args against a until t
// ends; its output is shown if t fails.
func consulProxy(t *testing.T, a *consultest.Agent, args ...string) {
	t.Helper()
	logPath := filepath.Join(t.TempDir(), "proxy.log")
	out, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	args = append([]string{"connect", "proxy", "-http-addr", "http://" + a.Addr(), "-log-level", "info"}, args...)
	cmd := exec.Command(toolbin.Path(t, "consul"), args...)
	cmd.Env = append(os.Environ(), "CONSUL_HTTP_TOKEN=")
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatalf("consul %v: %v", args, err)
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(done)
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		out.Close()
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			t.Logf("consul %v:\n%s", args, b)
		}
	})
}

// dialWhenUp dials addr until it accepts, for a listener another process
// opens; the connection is closed when t ends.
func dialWhenUp(t *testing.T, addr string) net.Conn {
	t.Helper()
	var conn net.Conn
	waitFor(t, 10*time.Second, "a listener on "+addr, func() bool {
		var err error
		conn, err = net.DialTimeout("tcp", addr, time.Second)
		return err == nil
	})
	t.Cleanup(func() { conn.Close() })
	_ = conn.SetDeadline(time.Now().Add(time.Minute))
	return conn
}

// echoes writes a line to conn and reads it back.
func echoes(conn net.Conn) error {
	const msg = "ping\n"
	if _, err := io.WriteString(conn, msg); err != nil {
		return err
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(conn, buf); err != nil {
		return err
	}
	if string(buf) != msg {
		return errors.New("echo: read " + strconv.Quote(string(buf)) + ", want " + strconv.Quote(msg))
	}
	return nil
}

// echoApp is a plain TCP echo server on loopback, standing for an app, until
// t ends; it returns its address.
func echoApp(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				_ = conn.SetDeadline(time.Now().Add(time.Minute))
				_, _ = io.Copy(conn, conn)
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
	})
	return ln.Addr().String()
}

// freePort is a port free on 127.0.0.1 for another process to bind.
func freePort(t *testing.T) int {
	t.Helper()
	ports, err := freeport.Stable(1, false)
	if err != nil {
		t.Fatal(err)
	}
	return ports[0]
}

// accepted is the outcome of the next handshake that succeeded, skipping
// failed ones (the agent's TCP check connects and closes).
func (s *tlsServer) accepted(t *testing.T) handshake {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		select {
		case h := <-s.handshakes:
			if h.err == nil {
				return h
			}
		case <-deadline:
			t.Fatalf("no successful handshake on %s within 10s", s.addr)
			return handshake{}
		}
	}
}
