package main

import (
	"bytes"
	"context"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/sidecar-mesh/sidecar/internal/faultserver"
	"github.com/sidecar-mesh/sidecar/pkg/policy"
)

// Every call the CLI makes to Consul or to a sidecar's admin API ends at
// --timeout when nobody answers.
func TestPolicyCommandsTimeOut(t *testing.T) {
	// A server that reads each request and never answers.
	silent := faultserver.New(t, faultserver.Faults{Latency: time.Hour}).Addr()
	file := writeFile(t, "p.yaml", "service: users\ntimeout: 2s\n")
	env := map[string]string{"CONSUL_HTTP_ADDR": silent}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"policy", "list"}, "listing sidecar/policies/ in Consul KV at " + silent + ": no answer within 300ms (--timeout)"},
		{[]string{"policy", "get", "users"}, "no answer within 300ms (--timeout)"},
		{[]string{"policy", "apply", "-f", file}, "no answer within 300ms (--timeout)"},
		{[]string{"policy", "apply", "-f", file, "--cas"}, "no answer within 300ms (--timeout)"},
		{[]string{"policy", "diff", "-f", file}, "no answer within 300ms (--timeout)"},
		{[]string{"policy", "delete", "users"}, "reading sidecar/policies/users in Consul KV at " + silent + ": no answer within 300ms"},
		{[]string{"policy", "explain", "users"}, "no answer within 300ms (--timeout)"},
		{[]string{"policy", "list", "--admin", silent}, "Timeout exceeded"},
		{[]string{"status", "--admin", silent}, "Timeout exceeded"},
	} {
		start := time.Now()
		_, _, err := cliIn(t, env, "", append(tc.args, "--timeout", "300ms")...)
		// An upper bound, far below cliIn's own 30 s deadline.
		if took := time.Since(start); took > 10*time.Second {
			t.Errorf("%v took %v against a server that never answers, want the 300ms --timeout", tc.args, took)
		}
		if err == nil || !strings.Contains(err.Error(), tc.want) || exitStatus(t, err) < 1 {
			t.Errorf("%v against a server that never answers: %v; want an error containing %q", tc.args, err, tc.want)
		}
	}

	cmd := newRootCommand(strings.NewReader(""), io.Discard, io.Discard, func(string) string { return "" })
	for _, path := range [][]string{{"policy", "list"}, {"status"}} {
		c, _, err := cmd.Find(path)
		if err != nil {
			t.Fatal(err)
		}
		if f := c.Flag("timeout"); f == nil || f.DefValue != "10s" {
			t.Errorf("sidecar %s --timeout: %v, want a flag defaulting to 10s", strings.Join(path, " "), f)
		}
	}
	for _, bad := range []string{"0s", "-1s"} {
		if _, _, err := cliIn(t, env, "", "policy", "list", "--timeout", bad); err == nil || !strings.Contains(err.Error(), "--timeout "+bad+": want a positive duration") {
			t.Errorf("policy list --timeout %s: %v, want it refused", bad, err)
		}
	}
}

// A Consul address with credentials is refused without echoing them: the
// Consul client would take them for part of the host name and print them
// in its errors.
func TestPolicyConsulAddrCredentials(t *testing.T) {
	for _, tc := range []struct {
		env  map[string]string
		args []string
	}{
		{nil, []string{"policy", "list", "--consul-addr", "http://user:s3cret@127.0.0.1:1"}},
		{map[string]string{"CONSUL_HTTP_ADDR": "https://s3cret@consul.example:8501"}, []string{"policy", "get", "users"}},
	} {
		_, _, err := cliIn(t, tc.env, "", tc.args...)
		if err == nil || strings.Contains(err.Error(), "s3cret") || !strings.Contains(err.Error(), "[redacted]@") ||
			!strings.Contains(err.Error(), "CONSUL_HTTP_TOKEN") {
			t.Errorf("%v with %v: %v; want the address refused, its credentials redacted", tc.args, tc.env, err)
		}
	}
}

// A negative --cas-index is refused, not taken for "no check".
func TestPolicyNegativeCASIndex(t *testing.T) {
	file := writeFile(t, "p.yaml", "service: users\ntimeout: 2s\n")
	// Nothing listens there: the flag is refused before Consul is called.
	env := map[string]string{"CONSUL_HTTP_ADDR": freePort(t)}
	for _, args := range [][]string{
		{"policy", "apply", "-f", file, "--cas-index", "-5"},
		{"policy", "apply", "-f", file, "--cas-index=-1"},
		{"policy", "delete", "users", "--cas-index", "-5"},
	} {
		_, _, err := cliIn(t, env, "", args...)
		if err == nil || !strings.Contains(err.Error(), "--cas-index") || !strings.Contains(err.Error(), "a ModifyIndex is 0 or more") {
			t.Errorf("%v: %v, want --cas-index refused", args, err)
		}
	}
	if _, _, err := cliIn(t, env, "", "policy", "delete", "users", "--cas-index", "0"); err == nil || !strings.Contains(err.Error(), "--cas-index 0 means create only") {
		t.Errorf("delete --cas-index 0: %v, want it refused", err)
	}
}

// The policy commands read a file or standard input up to the input cap of
// sidecar inject (64 MiB), then stop with an error that names it.
func TestPolicyInputIsCapped(t *testing.T) {
	for _, args := range [][]string{
		{"policy", "validate", "-f", "/dev/zero"},
		{"policy", "apply", "-f", "/dev/zero"},
		{"policy", "diff", "-f", "/dev/zero"},
		{"policy", "explain", "users", "-f", "/dev/zero"},
		{"inject", "-f", "/dev/zero"},
	} {
		_, _, err := cliIn(t, map[string]string{"CONSUL_HTTP_ADDR": freePort(t)}, "", args...)
		if err == nil || !strings.HasPrefix(err.Error(), "/dev/zero") || !strings.HasSuffix(err.Error(), "is larger than 64 MiB, the most sidecar reads of a file or standard input") {
			t.Errorf("%v: %v, want the 64 MiB cap named", args, err)
		}
	}
	var out, errb bytes.Buffer
	cmd := newRootCommand(zeros{}, &out, &errb, func(string) string { return "" })
	cmd.SetArgs([]string{"policy", "validate", "-f", "-"})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := cmd.ExecuteContext(ctx); err == nil || err.Error() != "stdin is larger than 64 MiB, the most sidecar reads of a file or standard input" {
		t.Errorf("policy validate -f - of an endless stdin: %v, want the cap named", err)
	}
}

// validate lists the first 100 problems of a file and says how many more
// there were.
func TestPolicyValidateListsAtMost100Problems(t *testing.T) {
	// 300,000 invalid retry conditions: a 600 KB file.
	file := writeFile(t, "p.yaml", "service: users\nretry: {on: ["+strings.Repeat("a,", 299999)+"a]}\n")
	_, _, err := cliIn(t, nil, "", "policy", "validate", "-f", file)
	if err == nil {
		t.Fatal("validate passed a file of 300,000 bad values")
	}
	msg := err.Error()
	if !strings.HasPrefix(msg, file+" is not valid: 300000 problems:\n") ||
		strings.Count(msg, "\n  "+file+":") != policy.MaxProblems ||
		!strings.HasSuffix(msg, "\n  … and 299900 more problems (only the first 100 are listed)") || len(msg) > 100<<10 {
		t.Errorf("validate's error (%d bytes) begins %.200q and ends %q; want 300000 problems counted, 100 listed, and the rest counted",
			len(msg), msg, msg[max(0, len(msg)-200):])
	}
	if strings.Contains(msg, "retry.on[100]:") {
		t.Errorf("validate listed the 101st problem, retry.on[100]")
	}
}

// zeros is an endless standard input of zero bytes.
type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}
