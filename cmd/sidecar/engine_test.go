package main

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// The outbound listener on the event-loop engine (outboundEngine: loops),
// as real clients use it: curl and Python send plain requests the loops
// serve (a GET, a POST with a body, HEAD, keep-alive), and what the loops
// do not serve (a chunked upload, a malformed request, HTTP/1.0, h2c) goes
// to the listener's server and is answered as without the engine.
func TestOutboundOnLoops(t *testing.T) {
	for _, tool := range []string{"curl", "python3"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is needed: %v", tool, err)
		}
	}
	var p http.Protocols
	p.SetHTTP1(true)
	p.SetUnencryptedHTTP2(true)
	up := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		w.Header().Set("Content-Type", "text/plain")
		io.WriteString(w, r.Method+" "+r.URL.Path+" "+string(b)+" via "+r.Header.Get("X-Forwarded-Proto"))
	}))
	up.Config.Protocols = &p
	up.Start()
	defer up.Close()
	rs := runSidecar(t, "outboundEngine: loops\n", "--static", "user-service="+up.Listener.Addr().String())
	curl := func(args ...string) string {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, "curl", append([]string{"-sS", "-x", "http://" + rs.out}, args...)...)
		cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME")} // no proxy settings of the machine's
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("curl %v: %v\n%s", args, err, out)
		}
		return string(out)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"http://user-service/a"}, "GET /a  via http"},
		{[]string{"-d", "hello", "http://user-service/b"}, "POST /b hello via http"},
		{[]string{"-d", "chunked", "-H", "Transfer-Encoding: chunked", "http://user-service/c"}, "POST /c chunked via http"},
		{[]string{"-0", "http://user-service/old"}, "GET /old  via http"},
		{[]string{"-I", "http://user-service/h"}, "HTTP/1.1 200 OK"},
		{[]string{"http://user-service/1", "http://user-service/2"}, "GET /1  via httpGET /2  via http"},
		{[]string{"-o", "/dev/null", "-w", "%{http_code} %header{x-sidecar-error}", "http://nope/"}, "503 unknown_service"},
	} {
		if got := curl(tc.args...); !strings.Contains(got, tc.want) {
			t.Errorf("curl %v: %q, want %q in it", tc.args, got, tc.want)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	py := `
import http.client, sys
c = http.client.HTTPConnection(sys.argv[1])
for i in range(50):
    c.request("POST", "/py/%d" % i, body=b"x" * 1000, headers={"Host": "user-service"})
    r = c.getresponse()
    b = r.read()
    assert r.status == 200 and b.startswith(b"POST /py/%d " % i), (r.status, b[:40])
print("ok")
`
	out, err := exec.CommandContext(ctx, "python3", "-c", py, rs.out).CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "ok" {
		t.Fatalf("python keep-alive POSTs: %v\n%s", err, out)
	}
	// A malformed request: answered 400 by the listener's server, never
	// forwarded.
	c, err := net.Dial("tcp", rs.out)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(c, "GET /x HTTP/1.1\r\nHost: user-service\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab")
	b, _ := io.ReadAll(c)
	if !strings.HasPrefix(string(b), "HTTP/1.1 400 ") || !strings.Contains(string(b), "bad_request") {
		t.Errorf("conflicting Content-Lengths: %.80q, want 400 bad_request", b)
	}
}
