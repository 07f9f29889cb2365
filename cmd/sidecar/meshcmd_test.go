package main

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/sidecar-mesh/sidecar/internal/consultest"
	"github.com/sidecar-mesh/sidecar/internal/toolbin"
)

// consulCLI runs the consul CLI against agent with stdin, failing t unless
// it succeeds.
func consulCLI(t *testing.T, agent *consultest.Agent, stdin string, args ...string) {
	t.Helper()
	cmd := exec.Command(toolbin.Path(t, "consul"), args...)
	cmd.Env = append(os.Environ(), "CONSUL_HTTP_ADDR=http://"+agent.Addr(), "CONSUL_HTTP_TOKEN=")
	cmd.Stdin = strings.NewReader(stdin)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("consul %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// `sidecar mesh check` against a real agent: allow and deny by an L4
// intention created with the consul CLI, then by the L7 permissions of a
// service-intentions entry written with consul config write, each with
// its exit code (0 allow, 1 deny) and what decided.
func TestMeshCheck(t *testing.T) {
	agent := consultest.Start(t)
	env := map[string]string{"CONSUL_HTTP_ADDR": agent.Addr()}
	check := func(wantCode int, want string, args ...string) (stdout, stderr string) {
		t.Helper()
		stdout, stderr, err := cli(t, context.Background(), env, append([]string{"mesh", "check"}, args...)...)
		if code := exitStatus(t, err); code != wantCode || !strings.Contains(stdout, want) {
			t.Fatalf("sidecar mesh check %s: exit %d (%v), stdout:\n%s\nstderr:\n%s\nwant exit %d and %q",
				strings.Join(args, " "), code, err, stdout, stderr, wantCode, want)
		}
		return stdout, stderr
	}

	out, _ := check(0, "default (ACLs off: allow)", "web", "api")
	if lines := strings.Split(strings.TrimSpace(out), "\n"); len(lines) != 2 ||
		strings.Join(strings.Fields(lines[0]), " ") != "SOURCE DESTINATION REQUEST DECISION BY" ||
		strings.Join(strings.Fields(lines[1]), " ") != "web api (L4) allow default (ACLs off: allow)" {
		t.Fatalf("sidecar mesh check web api: got\n%s\nwant a header and one row: web api (L4) allow default (ACLs off: allow)", out)
	}

	consulCLI(t, agent, "", "intention", "create", "-deny", "web", "api")
	check(1, "intention web -> api (deny)", "web", "api")
	check(0, "default (ACLs off: allow)", "admin", "api")

	consulCLI(t, agent, "", "intention", "delete", "web", "api")
	consulCLI(t, agent, "Kind = \"service-defaults\"\nName = \"api\"\nProtocol = \"http\"\n", "config", "write", "-")
	consulCLI(t, agent, `Kind = "service-intentions"
Name = "api"
Sources = [{
  Name = "web"
  Permissions = [
    { Action = "allow", HTTP { PathPrefix = "/public/", Methods = ["GET"] } },
    { Action = "deny", HTTP { Methods = ["POST"] } },
    { Action = "deny", HTTP { Header = [{ Name = "X-Env", Exact = "prod" }] } },
  ]
}]
`, "config", "write", "-")

	check(0, "intention web -> api, permission 1 (allow: GET path prefix /public/)", "web", "api", "--path", "/public/index.html")
	check(1, "intention web -> api, permission 2 (deny: POST)", "web", "api", "--method", "post", "--path", "/public/form")
	check(1, `intention web -> api, permission 3 (deny: header X-Env = "prod")`, "web", "api", "--path", "/private", "--header", "X-Env=prod")
	check(0, "intention web -> api, no permission matches: default (ACLs off: allow)", "web", "api", "--path", "/private")
	_, stderr := check(1, "has L7 permissions, which decide per request", "web", "api")
	if !strings.Contains(stderr, "Intention web -> api has L7 permissions: ask about a request with --method, --path and --header.") {
		t.Fatalf("sidecar mesh check web api (L4) with an L7 intention: stderr %q, want a note on asking about a request", stderr)
	}

	out, _ = check(1, `"permission": 2`, "web", "api", "--method", "POST", "--path", "/public/form?x=1", "-o", "json")
	var got meshCheckResult
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("sidecar mesh check -o json: %v\n%s", err, out)
	}
	if got.Source != "web" || got.Destination != "api" || got.Request != "POST /public/form?x=1" || got.Allowed ||
		got.Intention != "web -> api" || got.Permission != 2 || got.Default {
		t.Fatalf("sidecar mesh check web api --method POST --path /public/form?x=1 -o json: got %+v, want denied by permission 2 of web -> api", got)
	}
	out, _ = check(0, "allowed: true", "web", "api", "--path", "/public/", "-o", "yaml")
	for _, want := range []string{"source: web", "destination: api", "request: GET /public/", "intention: web -> api", "permission: 1"} {
		if !strings.Contains(out, want) {
			t.Fatalf("sidecar mesh check web api --path /public/ -o yaml: got\n%s\nwant a line %q", out, want)
		}
	}
}

// Trouble exits 2, never 1, which would read as deny: bad arguments and
// flags, and a Consul that cannot be reached.
func TestMeshCheckTrouble(t *testing.T) {
	unreachable := map[string]string{"CONSUL_HTTP_ADDR": freePort(t)}
	tests := []struct {
		args []string
		want string // in the error
	}{
		{[]string{"web"}, "want SOURCE and DESTINATION"},
		{[]string{"web", "*"}, "not a wildcard"},
		{[]string{"web", "api", "--bogus"}, "unknown flag: --bogus"},
		{[]string{"web", "api", "--header", "X-Env"}, `--header "X-Env": want NAME=VALUE`},
		{[]string{"web", "api", "--header", ":path=/x"}, "pseudo-headers"},
		{[]string{"web", "api", "--path", "public"}, "want a path starting with /"},
		{[]string{"web", "api", "--timeout", "0s"}, "--timeout 0s"},
		{[]string{"web", "api", "-o", "xml"}, `--output "xml"`},
		{[]string{"web", "api", "--consul-addr", "http://user:secret@127.0.0.1:8500"}, "credentials in the address are not supported"},
		{[]string{"web", "api"}, "set --consul-addr or CONSUL_HTTP_ADDR"},
	}
	for _, tt := range tests {
		stdout, _, err := cli(t, context.Background(), unreachable, append([]string{"mesh", "check"}, tt.args...)...)
		if code := exitStatus(t, err); code != 2 || !strings.Contains(err.Error(), tt.want) || stdout != "" {
			t.Errorf("sidecar mesh check %s: exit %d, error %v, stdout %q; want exit 2, an error with %q, nothing printed",
				strings.Join(tt.args, " "), code, err, stdout, tt.want)
		}
		if err != nil && strings.Contains(err.Error(), "secret") {
			t.Errorf("sidecar mesh check %s: error %q shows the password", strings.Join(tt.args, " "), err)
		}
	}
}
