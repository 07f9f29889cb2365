package sidecar_test

import (
	"context"
	"errors"
	"net"
	"net/http"
	"runtime"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/sidecar-mesh/sidecar/internal/consultest"
	"github.com/sidecar-mesh/sidecar/internal/logtest"
	"github.com/sidecar-mesh/sidecar/pkg/config"
	"github.com/sidecar-mesh/sidecar/pkg/policy"
	"github.com/sidecar-mesh/sidecar/pkg/sidecar"
)

// An agent that stops answering (SIGSTOP: its socket still accepts, nothing
// replies) costs the shutdown nothing: the drain window starts at once, the
// listeners close at its end, and Run returns within the drain window and
// the shutdown timeout. It used to wait for the deregistration for ever,
// before the drain window.
// The same goes for a drain asked for by the admin API, then POST
// /quitquitquit.
func TestShutdownWithAStoppedConsulAgent(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("finds the agent's process through /proc")
	}
	t.Run("SIGTERM", func(t *testing.T) { shutdownWithAStoppedAgent(t, false) })
	t.Run("drain then quitquitquit", func(t *testing.T) { shutdownWithAStoppedAgent(t, true) })
}

// shutdownWithAStoppedAgent stops the agent, then ends Run's context, or,
// with viaAdmin, POSTs /drain and then /quitquitquit.
func shutdownWithAStoppedAgent(t *testing.T, viaAdmin bool) {
	agent := consultest.Start(t)
	consul := consulClient(t, agent.Addr())
	cfg := testConfig(t, serve(t, "app").URL, "127.0.0.1:1")
	cfg.AdvertiseAddr = "10.1.2.3"
	cfg.Discovery.Consul = &config.Consul{Address: agent.Addr()}
	cfg.Lifecycle.DrainWindow = new(policy.Duration(300 * time.Millisecond))
	cfg.Lifecycle.ShutdownTimeout = policy.Duration(time.Second)
	cfg.WithDefaults()
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	log, logs := logtest.New()
	sc, err := sidecar.New(cfg, sidecar.WithLogger(log))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- sc.Run(ctx) }()
	defer func() {
		cancel()
		select {
		case <-done:
		case <-time.After(20 * time.Second): // a failure already reported
		}
	}()
	waitFor(t, "http://"+cfg.Listeners.Health+"/healthz/ready", 200)
	deadline := time.Now().Add(10 * time.Second)
	for {
		entries, _, err := consul.Health().Service("app", "", true, nil)
		if err == nil && len(entries) == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the app in Consul: %d passing instances, %v after 10s; want 1", len(entries), err)
		}
		time.Sleep(20 * time.Millisecond)
	}

	agent.Freeze(t)
	stopped := time.Now()
	if viaAdmin {
		for _, path := range []string{"/drain", "/quitquitquit"} {
			if code, body := get(t, http.MethodPost, "http://"+cfg.Listeners.Admin+path, ""); code != 200 {
				t.Fatalf("POST %s: %d %s, want 200", path, code, body)
			}
		}
	} else {
		cancel()
	}
	// The log is the only witness of when the drain window started.
	for logs.Count(`msg="drain window"`) == 0 {
		if time.Since(stopped) > time.Second {
			t.Fatalf("no drain window 1s after the shutdown began, the agent stopped; log:\n%s", logs)
		}
		time.Sleep(5 * time.Millisecond)
	}
	// drainWindow + shutdownTimeout (the deregistration runs beside them,
	// and gives up within them), + 2s for a loaded machine.
	bound := 300*time.Millisecond + time.Second + 2*time.Second
	select {
	case err := <-done:
		done <- err // for the deferred receive
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
		t.Logf("Run returned %v after the shutdown began, the agent stopped", time.Since(stopped).Round(time.Millisecond))
	case <-time.After(bound):
		t.Fatalf("Run did not return within %v of the shutdown's start with the Consul agent stopped; log:\n%s", bound, logs)
	}
	for name, addr := range map[string]string{"outbound": cfg.Listeners.Outbound, "inbound": cfg.Listeners.Inbound, "admin": cfg.Listeners.Admin} {
		if c, err := net.Dial("tcp", addr); !errors.Is(err, syscall.ECONNREFUSED) {
			if c != nil {
				c.Close()
			}
			t.Errorf("dial %s listener after Run: %v, want connection refused", name, err)
		}
	}
	if logs.Count("deregistering from Consul") != 1 {
		t.Errorf("the failed deregistration was not logged:\n%s", logs)
	}
}

// consulClient is a client of the agent at addr that keeps no connection,
// so that none outlives the test (goleak).
func consulClient(t *testing.T, addr string) *api.Client {
	t.Helper()
	cfg := api.DefaultNonPooledConfig()
	cfg.Address = addr
	c, err := api.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return c
}
