package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/sidecar-mesh/sidecar/internal/consultest"
)

// BenchmarkConsulPropagation measures how long a change in Consul takes to
// reach a running sidecar (a new instance of a service in use, seen in the
// admin API), with 10,000 services registered of which 10 are used, and the
// sidecar's resident memory there. Run: make bench-go.
func BenchmarkConsulPropagation(b *testing.B) {
	agent := consultest.Start(b)
	cc := api.DefaultConfig()
	cc.Address = agent.Addr()
	consul, err := api.NewClient(cc)
	if err != nil {
		b.Fatal(err)
	}
	const registered, used = 10000, 10
	var wg sync.WaitGroup
	for w := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < registered; i += 16 {
				name := fmt.Sprintf("svc-%05d", i)
				if err := consul.Agent().ServiceRegister(&api.AgentServiceRegistration{ID: name, Name: name, Address: "127.0.0.1", Port: 1}); err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()

	bin := filepath.Join(b.TempDir(), "sidecar")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		b.Fatalf("go build: %v\n%s", err, out)
	}
	out, adm, metrics := freePort(b), freePort(b), freePort(b)
	cmd := exec.Command(bin, "run", "--consul-addr", agent.Addr(), "--outbound-addr", out, "--admin-addr", adm,
		"--metrics-addr", metrics, "--health-addr", freePort(b), "--drain-window", "1ms", "--log-level", "error",
		"--consul-allow-loopback-endpoints=true") // the used services' instances are on 127.0.0.1
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() {
		_ = cmd.Process.Signal(os.Interrupt)
		_ = cmd.Wait()
	}()
	client := &http.Client{Timeout: 5 * time.Second}
	for i := range used {
		svc := fmt.Sprintf("svc-%05d", i*(registered/used))
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
			req, _ := http.NewRequest("GET", "http://"+out+"/", nil)
			req.Host = svc
			resp, err := client.Do(req)
			if err == nil {
				resp.Body.Close()
				// 502: the instance's port 1 refuses, which proves routing.
				if resp.Header.Get("X-Sidecar-Error") == "upstream_connect_failure" {
					break
				}
			}
			if time.Now().After(deadline) {
				b.Fatalf("calling %s through the sidecar: %v", svc, err)
			}
		}
	}

	var lat []time.Duration
	b.ResetTimer()
	for i := range b.N {
		svc := fmt.Sprintf("svc-%05d", (i%used)*(registered/used))
		addr := "10.9." + strconv.Itoa(i/250%250) + "." + strconv.Itoa(i%250+1)
		start := time.Now()
		if err := consul.Agent().ServiceRegister(&api.AgentServiceRegistration{ID: fmt.Sprintf("gen-%d", i), Name: svc, Address: addr, Port: 80}); err != nil {
			b.Fatal(err)
		}
		for !adminHas(b, client, adm, svc, addr+":80") {
			if time.Since(start) > 10*time.Second {
				b.Fatalf("%s:80 never reached the sidecar", addr)
			}
		}
		lat = append(lat, time.Since(start))
	}
	b.StopTimer()
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-ms")
	b.ReportMetric(float64(rssBytes(b, cmd.Process.Pid))/(1<<20), "sidecar-RSS-MiB")
}

func adminHas(b *testing.B, client *http.Client, adm, svc, addr string) bool {
	resp, err := client.Get("http://" + adm + "/endpoints")
	if err != nil {
		b.Fatal(err)
	}
	defer resp.Body.Close()
	var eps struct {
		Services []struct {
			Service   string
			Endpoints []struct{ Addr string }
		}
	}
	if err := json.NewDecoder(resp.Body).Decode(&eps); err != nil {
		b.Fatal(err)
	}
	for _, s := range eps.Services {
		if s.Service == svc {
			for _, e := range s.Endpoints {
				if e.Addr == addr {
					return true
				}
			}
		}
	}
	return false
}

func rssBytes(b *testing.B, pid int) int64 {
	status, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		b.Fatal(err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb << 10
		}
	}
	b.Fatal("no VmRSS")
	return 0
}
