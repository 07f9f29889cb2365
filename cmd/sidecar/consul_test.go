package main

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/sidecar-mesh/sidecar/internal/consultest"
)

// A real sidecar with a real Consul: routes to instances registered there,
// registers its app, keeps routing through a Consul outage, and
// deregisters on shutdown.
func TestSidecarWithConsul(t *testing.T) {
	agent := consultest.Start(t)
	cc := api.DefaultConfig()
	cc.Address = agent.Addr()
	consul, err := api.NewClient(cc)
	if err != nil {
		t.Fatal(err)
	}
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "users") }))
	defer up.Close()
	host, portStr, _ := net.SplitHostPort(strings.TrimPrefix(up.URL, "http://"))
	port, _ := strconv.Atoi(portStr)
	if err := consul.Agent().ServiceRegister(&api.AgentServiceRegistration{ID: "users-1", Name: "users", Address: host, Port: port}); err != nil {
		t.Fatal(err)
	}

	out, adm, in := freePort(t), freePort(t), freePort(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, _, err := cli(t, ctx, map[string]string{"CONSUL_HTTP_ADDR": agent.Addr(), "POD_IP": "10.1.2.3"},
			"run", "--outbound-addr", out, "--admin-addr", adm, "--inbound-addr", in,
			"--service", "orders", "--app-port", "8080", "--log-level", "error")
		done <- err
	}()
	stopped := false
	stop := func() {
		if !stopped {
			stopped = true
			cancel()
			if err := <-done; err != nil {
				t.Errorf("sidecar run: %v", err)
			}
		}
	}
	defer stop()

	client := &http.Client{Timeout: 5 * time.Second}
	call := func() (int, string) {
		req, _ := http.NewRequest("GET", "http://"+out+"/", nil)
		req.Host = "users"
		resp, err := client.Do(req)
		if err != nil {
			return 0, err.Error()
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		code, body := call()
		if code == 200 && body == "users" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("GET users through the sidecar: %d %q", code, body)
		}
		time.Sleep(50 * time.Millisecond)
	}

	_, inPort, _ := net.SplitHostPort(in)
	var instance *api.AgentService
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		svcs, _ := consul.Agent().Services()
		for _, s := range svcs {
			if s.Service == "orders" {
				instance = s
			}
		}
		if instance != nil {
			break
		}
	}
	if instance == nil || instance.Address != "10.1.2.3" || strconv.Itoa(instance.Port) != inPort {
		t.Fatalf("app registration %+v, want orders at 10.1.2.3:%s", instance, inPort)
	}

	// Consul down: every call still succeeds on the last known endpoints.
	agent.Stop()
	lost := 0
	for range 200 {
		if code, _ := call(); code != 200 {
			lost++
		}
	}
	if lost != 0 {
		t.Fatalf("%d of 200 calls failed while Consul was down, want 0", lost)
	}

	agent.Restart(t)
	// The restarted -dev agent forgot everything; the sidecar registers
	// the app again, and deregisters it on shutdown.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if s, _, err := consul.Agent().Service(instance.ID, nil); err == nil && s != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the app was not registered again after the agent restart")
		}
	}
	stop()
	if s, _, err := consul.Agent().Service(instance.ID, nil); err == nil && s != nil {
		t.Fatalf("app still registered after shutdown: %+v", s)
	}
}
