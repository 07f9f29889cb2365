package main

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/sidecar-mesh/sidecar/internal/netnstest"
)

// The test's two namespaces: "pod" (the app, the sidecar and the rules) and
// "net" (the upstreams), linked by a veth pair. These addresses exist only
// inside them.
const (
	tpPodV4  = "198.18.0.1"
	tpNetV4a = "198.18.0.2" // users instance that always answers 503, raw echo, banner server
	tpNetV4b = "198.18.0.3" // users instance that answers
	tpPodV6  = "fd00:5c::1"
	tpNetV6  = "fd00:5c::2" // users instance that answers, raw echo

	appUID     = 1000 // the app: its connections are redirected
	sidecarUID = 1337 // the sidecar: exempt
)

const helperEnv = "SIDECAR_TRANSPARENT_HELPER"

// TestTransparentInterception runs the real sidecar binary and `sidecar
// iptables` in a network namespace, as a pod would: an app with no proxy
// settings (curl, and raw TCP clients) calls upstreams by their addresses
// in another namespace, and the rules send its connections through the
// sidecar.
func TestTransparentInterception(t *testing.T) {
	netnstest.Require(t, "iptables", "ip6tables", "iptables-save", "ip6tables-save", "curl", "setpriv")
	bin := publicCopy(t, sidecarBinary(t))
	self := publicCopy(t, os.Args[0])

	pod, remote := netnstest.New(t, "tp"), netnstest.New(t, "tpn")
	netnstest.Veth(t, pod, []string{tpPodV4 + "/24", tpPodV6 + "/64"},
		remote, []string{tpNetV4a + "/24", tpNetV4b + "/24", tpNetV6 + "/64"})

	upstreams := remote.Start([]string{helperEnv + "=upstreams"}, nil, self, "-test.run=^TestTransparentHelper$")
	waitOutput(t, upstreams, "READY")

	before := pod.Save()
	out := pod.Run(bin, "iptables", "--exclude-ports", "22", "--ipv6", "true")
	t.Logf("sidecar iptables: %s", strings.TrimSpace(out))

	sc := pod.Start(nil, &syscall.Credential{Uid: sidecarUID, Gid: sidecarUID}, bin, "run", "--transparent=true",
		"--static", "users="+tpNetV4a+":8080,"+tpNetV4b+":8080,["+tpNetV6+"]:8080",
		"--transparent-sniff-timeout", "300ms", "--log-level", "debug", "--log-format", "text",
		"--tracing-endpoint", "127.0.0.1:4317", "--tracing-sampler", "always_on")
	waitReady(t, pod, sc)

	app := &syscall.Credential{Uid: appUID, Gid: appUID}
	t.Run("http-by-address-v4", func(t *testing.T) {
		for i := 0; i < 6; i++ {
			status, hdr, body := curl(t, pod, "http://"+tpNetV4a+":8080/users/1")
			checkRouted(t, status, hdr, body, tpNetV4a+":8080")
		}
		if n := strings.Count(upstreams.Output(), "hit failing"); n == 0 {
			t.Error("the failing instance (the one the app dialed) was never tried: the calls were not load balanced")
		}
	})
	t.Run("http-by-address-v6", func(t *testing.T) {
		status, hdr, body := curl(t, pod, "http://["+tpNetV6+"]:8080/users/6")
		checkRouted(t, status, hdr, body, "["+tpNetV6+"]:8080")
	})
	t.Run("http-to-an-unknown-address-is-refused", func(t *testing.T) {
		status, hdr, body := curl(t, pod, "http://"+tpNetV4b+":9999/")
		if status != 403 || hdr.Get("x-sidecar-error") != "not_allowed" {
			t.Errorf("GET to an address no service has: %d %q %s, want 403 not_allowed", status, hdr.Get("x-sidecar-error"), body)
		}
	})
	t.Run("raw-tcp-v4-byte-exact", func(t *testing.T) {
		out := pod.Start([]string{helperEnv + "=echo-client", "ADDR=" + tpNetV4a + ":7000"}, app, self, "-test.run=^TestTransparentHelper$")
		waitOutput(t, out, "ECHO OK")
	})
	t.Run("raw-tcp-v6-byte-exact", func(t *testing.T) {
		out := pod.Start([]string{helperEnv + "=echo-client", "ADDR=[" + tpNetV6 + "]:7000"}, app, self, "-test.run=^TestTransparentHelper$")
		waitOutput(t, out, "ECHO OK")
	})
	t.Run("server-speaks-first", func(t *testing.T) {
		out := pod.Start([]string{helperEnv + "=banner-client", "ADDR=" + tpNetV4a + ":2525"}, app, self, "-test.run=^TestTransparentHelper$")
		waitOutput(t, out, "BANNER OK")
	})
	t.Run("metrics", func(t *testing.T) {
		m := pod.Run("curl", "-sS", "http://127.0.0.1:15090/metrics")
		for _, want := range []*regexp.Regexp{
			regexp.MustCompile(`sidecar_intercepted_connections_total\{protocol="http"\} (\d+)`),
			regexp.MustCompile(`sidecar_intercepted_connections_total\{protocol="tcp"\} [3-9]`),
			regexp.MustCompile(`sidecar_tcp_passthrough_bytes_total\{direction="sent"\} (2\.09\d*e\+06|[3-9])`),
			regexp.MustCompile(`sidecar_tcp_passthrough_bytes_total\{direction="received"\} `),
			regexp.MustCompile(`sidecar_tcp_passthrough_connections_total [3-9]`),
		} {
			if !want.MatchString(m) {
				t.Errorf("metrics lack %s:\n%s", want, tpGrep(m, "intercepted|passthrough"))
			}
		}
		// One HTTP connection per curl: the sidecar's own upstream calls
		// were not captured again (that would count more, or refuse them
		// as a loop).
		if got := regexp.MustCompile(`sidecar_intercepted_connections_total\{protocol="http"\} (\d+)`).FindStringSubmatch(m); got != nil && got[1] != "8" {
			t.Errorf("%s redirected HTTP connections, want 8 (one per curl)", got[1])
		}
		if strings.Contains(m, `sidecar_intercepted_refused_total{reason="loop"}`) {
			t.Errorf("the sidecar refused a loop:\n%s", tpGrep(m, "refused"))
		}
	})

	// Cleanup removes exactly what was installed; afterwards the app's
	// calls go straight to the instance it dialed.
	pod.Run(bin, "iptables", "--cleanup", "--ipv6", "true")
	if after := pod.Save(); after != before {
		t.Errorf("sidecar iptables --cleanup left the tables different\n--- after\n%s--- before\n%s", after, before)
	}
	status, hdr, _ := curl(t, pod, "http://"+tpNetV4a+":8080/users/1")
	if status != 503 || hdr.Get("x-sidecar-error") != "" {
		t.Errorf("after cleanup: %d (x-sidecar-error %q), want the failing instance's own 503", status, hdr.Get("x-sidecar-error"))
	}
	if t.Failed() {
		t.Logf("sidecar log:\n%s", sc.Output())
	}
}

// checkRouted checks that a call by address went through the sidecar to a
// healthy instance of users.
func checkRouted(t *testing.T, status int, hdr http.Header, body []byte, host string) {
	t.Helper()
	if status != 200 {
		t.Fatalf("GET http://%s/: %d %s (x-sidecar-error %q), want 200 from a healthy instance after retries",
			host, status, body, hdr.Get("x-sidecar-error"))
	}
	var seen struct {
		Instance string
		Remote   string
		Header   http.Header
	}
	if err := json.Unmarshal(body, &seen); err != nil {
		t.Fatalf("body %q: %v", body, err)
	}
	if xff := seen.Header.Get("X-Forwarded-For"); xff == "" || strings.Contains(xff, ",") {
		t.Errorf("upstream saw X-Forwarded-For %q, want the one hop the sidecar adds (no loop)", xff)
	}
	if seen.Header.Get("X-Forwarded-Proto") != "http" || seen.Header.Get("X-Forwarded-Host") != host {
		t.Errorf("upstream saw X-Forwarded-Proto %q, X-Forwarded-Host %q; want http, %s",
			seen.Header.Get("X-Forwarded-Proto"), seen.Header.Get("X-Forwarded-Host"), host)
	}
	if seen.Header.Get("Traceparent") == "" {
		t.Errorf("upstream saw no traceparent: the sidecar's span did not propagate (headers %v)", seen.Header)
	}
	if ip, _, _ := net.SplitHostPort(seen.Remote); ip != tpPodV4 && ip != tpPodV6 {
		t.Errorf("upstream saw the connection from %s, want the pod's address", seen.Remote)
	}
}

// curl runs curl as the app, with no proxy settings, and returns the
// status, headers and body.
func curl(t *testing.T, pod *netnstest.NS, url string) (int, http.Header, []byte) {
	t.Helper()
	out, err := pod.Try(append(setprivApp(t), "env", "-i", "PATH=/usr/bin:/bin",
		"curl", "-sS", "-i", "--noproxy", "*", "--max-time", "10", url)...)
	if err != nil {
		t.Fatalf("curl %s: %v\n%s", url, err, out)
	}
	resp, err := http.ReadResponse(bufio.NewReader(strings.NewReader(out)), nil)
	if err != nil {
		t.Fatalf("curl %s: %v\n%s", url, err, out)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header, body
}

func setprivApp(t *testing.T) []string {
	return []string{netnstest.Cmd(t, "setpriv"), "--reuid", strconv.Itoa(appUID), "--regid", strconv.Itoa(appUID), "--clear-groups", "--"}
}

func waitReady(t *testing.T, pod *netnstest.NS, sc *netnstest.Proc) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		out, err := pod.Try("curl", "-sf", "http://127.0.0.1:15020/healthz/ready")
		if err == nil {
			return
		}
		select {
		case <-sc.Exited():
			t.Fatalf("the sidecar exited:\n%s", sc.Output())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("the sidecar is not ready after 20 s (%s):\n%s", out, sc.Output())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func waitOutput(t *testing.T, p *netnstest.Proc, want string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(p.Output(), want) {
		select {
		case <-p.Exited():
			if strings.Contains(p.Output(), want) {
				return
			}
			t.Fatalf("helper exited without %q:\n%s", want, p.Output())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %q from the helper after 20 s:\n%s", want, p.Output())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// publicCopy copies a binary to a directory every user can read, for the
// processes that run as the app's and the sidecar's users.
func publicCopy(t *testing.T, path string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "sidecar-tp-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(dir, filepath.Base(path))
	if err := os.WriteFile(dst, b, 0o755); err != nil {
		t.Fatal(err)
	}
	return dst
}

func tpGrep(s, pattern string) string {
	re := regexp.MustCompile(pattern)
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if re.MatchString(l) && !strings.HasPrefix(l, "#") {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// TestTransparentHelper is not a test: TestTransparentInterception runs
// the test binary with it, in a namespace, as the upstreams or as a raw TCP
// client of the app.
func TestTransparentHelper(t *testing.T) {
	switch os.Getenv(helperEnv) {
	case "":
		t.Skip("a helper process of TestTransparentInterception")
	case "upstreams":
		helperUpstreams(t)
	case "echo-client":
		helperEchoClient(t, os.Getenv("ADDR"))
	case "banner-client":
		helperBannerClient(t, os.Getenv("ADDR"))
	}
}

func helperUpstreams(t *testing.T) {
	var failing atomic.Int64
	serve := func(addr string, h http.HandlerFunc) {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		go func() { _ = http.Serve(ln, h) }()
	}
	serve(tpNetV4a+":8080", func(w http.ResponseWriter, r *http.Request) {
		fmt.Printf("hit failing %d\n", failing.Add(1))
		w.WriteHeader(http.StatusServiceUnavailable)
	})
	answer := func(name string) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			_ = json.NewEncoder(w).Encode(map[string]any{"instance": name, "remote": r.RemoteAddr, "header": r.Header})
		}
	}
	serve(tpNetV4b+":8080", answer("v4"))
	serve("["+tpNetV6+"]:8080", answer("v6"))
	echo := func(addr, banner string) {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go func() {
					defer c.Close()
					if banner != "" {
						_, _ = io.WriteString(c, banner)
					}
					_, _ = io.Copy(c, c)
					_ = c.(*net.TCPConn).CloseWrite()
				}()
			}
		}()
	}
	echo(tpNetV4a+":7000", "")
	echo("["+tpNetV6+"]:7000", "")
	echo(tpNetV4a+":2525", "220 banner ESMTP\r\n")
	fmt.Println("READY")
	select {} // until the test kills the process
}

func helperEchoClient(t *testing.T, addr string) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	payload := make([]byte, 1<<20)
	_, _ = rand.Read(payload)
	payload[0] = 0x16 // not HTTP from the first byte on
	go func() {
		_, _ = c.Write(payload)
		_ = c.(*net.TCPConn).CloseWrite()
	}()
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, payload) {
		t.Fatalf("echo of %d bytes: got %d bytes, sha256 %x, want %x", len(payload), len(got), sha256.Sum256(got), sha256.Sum256(payload))
	}
	fmt.Printf("ECHO OK %d bytes\n", len(got))
}

func helperBannerClient(t *testing.T, addr string) {
	start := time.Now()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	r := bufio.NewReader(c)
	line, err := r.ReadString('\n')
	if err != nil || line != "220 banner ESMTP\r\n" {
		t.Fatalf("banner %q, %v", line, err)
	}
	waited := time.Since(start)
	if _, err := io.WriteString(c, "QUIT\r\n"); err != nil {
		t.Fatal(err)
	}
	if echo, err := r.ReadString('\n'); err != nil || echo != "QUIT\r\n" {
		t.Fatalf("echo %q, %v", echo, err)
	}
	fmt.Printf("BANNER OK after %v\n", waited.Round(time.Millisecond))
}

func TestIptablesCommand(t *testing.T) {
	ctx := t.Context()
	out, _, err := cli(t, ctx, nil, "iptables", "--dry-run", "--ipv6=false", "--exclude-ports", "22", "--exclude-cidrs", "169.254.169.254", "--inbound-ports", "8080")
	if err != nil {
		t.Fatal(err)
	}
	want := `# rules of an earlier run are removed first (sidecar iptables --cleanup)
iptables -t nat -N SIDECAR_OUTPUT
iptables -t nat -A SIDECAR_OUTPUT -m owner --uid-owner 1337 -j RETURN
iptables -t nat -A SIDECAR_OUTPUT -o lo -j RETURN
iptables -t nat -A SIDECAR_OUTPUT -p tcp -m multiport --dports 22 -j RETURN
iptables -t nat -A SIDECAR_OUTPUT -d 169.254.169.254/32 -j RETURN
iptables -t nat -A SIDECAR_OUTPUT -p tcp -j REDIRECT --to-ports 15001
iptables -t nat -N SIDECAR_INBOUND
iptables -t nat -A SIDECAR_INBOUND -p tcp -m multiport --dports 15000,15001,15006,15020,15090 -j RETURN
iptables -t nat -A SIDECAR_INBOUND -p tcp -m multiport --dports 8080 -j REDIRECT --to-ports 15006
iptables -t nat -A PREROUTING -p tcp -j SIDECAR_INBOUND
iptables -t nat -A OUTPUT -p tcp -j SIDECAR_OUTPUT
`
	if out != want {
		t.Errorf("sidecar iptables --dry-run printed\n%s\nwant\n%s", out, want)
	}
	out, _, err = cli(t, ctx, nil, "iptables", "--dry-run", "--ipv6=false", "--proxy-uid", "4294967294", "--proxy-gid", "0")
	if err != nil || !strings.Contains(out, "--uid-owner 4294967294 -j RETURN\n") || !strings.Contains(out, "--gid-owner 0 -j RETURN\n") {
		t.Errorf("--proxy-uid 4294967294 --proxy-gid 0: %v\n%s", err, out)
	}
	out, _, err = cli(t, ctx, nil, "iptables", "--cleanup", "--dry-run", "--ipv4=false", "--ipv6=true")
	if err != nil || !strings.Contains(out, "ip6tables -t nat -X SIDECAR_OUTPUT\n") || strings.Contains(out, "\niptables ") {
		t.Errorf("--cleanup --dry-run (IPv6 only): %v\n%s", err, out)
	}
	for _, bad := range []struct {
		args []string
		want string
	}{
		{[]string{"--proxy-port", "0"}, "--proxy-port: 0 is not a port"},
		{[]string{"--proxy-port", "65536"}, "--proxy-port: 65536 is not a port"},
		{[]string{"--inbound-port", "-1"}, "--inbound-port: -1 is not a port"},
		// 4294967296 would wrap to uid 0: root's connections never redirected.
		{[]string{"--proxy-uid", "4294967296"}, "--proxy-uid: 4294967296 is not a user id (allowed: 0 to 4294967294)"},
		{[]string{"--proxy-uid", "4294967295"}, "--proxy-uid: 4294967295 is not a user id"},
		{[]string{"--proxy-uid", "-1"}, "--proxy-uid: -1 is not a user id"},
		{[]string{"--proxy-gid", "4294967295"}, `--proxy-gid: "4294967295" is not a group id (allowed: 0 to 4294967294)`},
		{[]string{"--proxy-gid", "18446744073709551616"}, "--proxy-gid"},
		{[]string{"--proxy-gid", "-5"}, "--proxy-gid"},
		{[]string{"--own-ports", "15000,65536"}, "--own-ports"},
		{[]string{"--exclude-cidrs", "10.0.0.0/40"}, "--exclude-cidrs"},
		{[]string{"--exclude-ports", "*"}, "--exclude-ports"},
		{[]string{"--inbound-ports", "15020"}, "one of the sidecar's own ports"},
		{[]string{"--ipv6", "maybe"}, "--ipv6"},
		{[]string{"--ipv4=false", "--ipv6=false"}, "no IP family"},
	} {
		_, _, err := cli(t, ctx, nil, append([]string{"iptables", "--dry-run"}, bad.args...)...)
		if err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("sidecar iptables %v = %v, want an error containing %q", bad.args, err, bad.want)
		}
	}
}
