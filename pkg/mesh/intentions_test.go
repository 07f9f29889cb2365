package mesh_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/sidecar-mesh/sidecar/internal/consultest"
	"github.com/sidecar-mesh/sidecar/internal/logtest"
	"github.com/sidecar-mesh/sidecar/internal/toolbin"
	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/mesh"
)

// client reads the mesh's parts from a through a pooled client of its HTTP
// API, as a sidecar does; its idle connections are closed when t ends.
func client(t *testing.T, a *consultest.Agent) *discovery.MeshAgent {
	t.Helper()
	cfg := api.DefaultConfig()
	cfg.Address = a.Addr()
	tr := cfg.Transport
	c, err := api.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(tr.CloseIdleConnections)
	return discovery.NewMeshAgent(c)
}

// consul runs the consul CLI against a with stdin, and returns its output
// and exit code; an exit code other than 0 or those in ok fails t.
func consul(t *testing.T, a *consultest.Agent, stdin string, ok []int, args ...string) (string, int) {
	t.Helper()
	cmd := exec.Command(toolbin.Path(t, "consul"), args...)
	cmd.Env = append(os.Environ(), "CONSUL_HTTP_ADDR=http://"+a.Addr(), "CONSUL_HTTP_TOKEN=")
	cmd.Stdin = strings.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	code := 0
	var exit *exec.ExitError
	switch {
	case errors.As(err, &exit):
		code = exit.ExitCode()
	case err != nil:
		t.Fatalf("consul %s: %v", strings.Join(args, " "), err)
	}
	if code != 0 && !contains(ok, code) {
		t.Fatalf("consul %s: exit code %d, want 0 or %v; output:\n%s", strings.Join(args, " "), code, ok, out)
	}
	return string(out), code
}

func contains(s []int, v int) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

// run runs an Authorizer of destination on a until t ends, and waits
// until it is ready.
func run(t *testing.T, a *consultest.Agent, destination string) (*mesh.Authorizer, *logtest.Buffer) {
	t.Helper()
	auth, logs := runAuthorizer(t, client(t, a), destination)
	if !eventually(10*time.Second, auth.Ready) {
		t.Fatalf("Authorizer(%s).Ready(): still false after 10s; log:\n%s", destination, logs)
	}
	return auth, logs
}

// runAuthorizer runs an Authorizer of destination on agent until t ends.
func runAuthorizer(t *testing.T, agent mesh.IntentionsAgent, destination string) (*mesh.Authorizer, *logtest.Buffer) {
	t.Helper()
	log, logs := logtest.New()
	auth := mesh.NewAuthorizer(agent, destination, log)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		auth.Run(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	return auth, logs
}

// eventually polls cond every 5ms until it holds (true) or within passes
// (false).
func eventually(within time.Duration, cond func() bool) bool {
	deadline := time.NewTimer(within)
	defer deadline.Stop()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-deadline.C:
			return cond()
		case <-tick.C:
		}
	}
	return true
}

// request is "METHOD TARGET" as a server receives it, or nil for "" (an
// L4 question).
func request(s string) *http.Request {
	if s == "" {
		return nil
	}
	method, target, _ := strings.Cut(s, " ")
	return httptest.NewRequest(method, target, nil)
}

// decidesWithin waits up to within for Authorize(source, request(r)) to be
// decided by want (Decision.By), and returns the decision and how long it
// took.
func decidesWithin(t *testing.T, auth *mesh.Authorizer, within time.Duration, source, r, want string) (mesh.Decision, time.Duration) {
	t.Helper()
	start := time.Now()
	req := request(r)
	var got mesh.Decision
	if !eventually(within, func() bool { got = auth.Authorize(source, req); return got.By == want }) {
		t.Fatalf("Authorize(%s, %q): got %+v after %s, want By %q", source, r, got, within, want)
	}
	return got, time.Since(start)
}

func TestAuthorizerNotReadyDenies(t *testing.T) {
	a := mesh.NewAuthorizer(nil, "api", nil)
	if a.Ready() {
		t.Fatal("Ready() of an Authorizer never run: got true, want false")
	}
	if got := a.Authorize("web", nil); got.Allowed {
		t.Fatalf("Authorize before Ready: got %+v, want a denial", got)
	}
}

// Intentions created, replaced and deleted with the consul CLI take effect
// within a second each (allow -> deny -> allow), and a restarted agent
// (a dev agent forgets everything) is followed too, its lower index
// included; meanwhile the last intentions read stay in force.
func TestAuthorizerFollowsIntentions(t *testing.T) {
	agent := consultest.Start(t)
	auth, logs := run(t, agent, "api")
	const within = time.Second

	if got := auth.Authorize("web", nil); !got.Allowed || got.By != "default (ACLs off: allow)" || !got.Default {
		t.Fatalf("Authorize(web, L4) without intentions, ACLs off: got %+v, want allowed by the default", got)
	}
	steps := []struct {
		args    []string
		allowed bool
		by      string
	}{
		{[]string{"intention", "create", "-deny", "web", "api"}, false, "intention web -> api (deny)"},
		{[]string{"intention", "create", "-replace", "-allow", "web", "api"}, true, "intention web -> api (allow)"},
		{[]string{"intention", "create", "-replace", "-deny", "web", "api"}, false, "intention web -> api (deny)"},
		{[]string{"intention", "delete", "web", "api"}, true, "default (ACLs off: allow)"},
	}
	for _, s := range steps {
		start := time.Now()
		consul(t, agent, "", nil, s.args...)
		ran := time.Since(start)
		got, after := decidesWithin(t, auth, within, "web", "", s.by)
		if got.Allowed != s.allowed {
			t.Fatalf("after consul %s: Authorize(web, L4) = %+v, want allowed=%v", strings.Join(s.args, " "), got, s.allowed)
		}
		t.Logf("consul %s: ran %s, in force %s after it returned", strings.Join(s.args, " "),
			ran.Round(time.Millisecond), after.Round(time.Microsecond))
	}

	// Consul down: the last intentions read stay in force.
	consul(t, agent, "", nil, "intention", "create", "-deny", "web", "api")
	decidesWithin(t, auth, within, "web", "", "intention web -> api (deny)")
	agent.Stop()
	if !eventually(10*time.Second, func() bool { return logs.Count("failed") > 0 }) {
		t.Fatalf("no failure logged within 10s of stopping the agent; log:\n%s", logs)
	}
	if got := auth.Authorize("web", nil); got.Allowed || got.By != "intention web -> api (deny)" {
		t.Fatalf("Authorize(web, L4) with the agent down: got %+v, want the last intention read (deny)", got)
	}
	// A restarted dev agent starts empty, at a lower index.
	agent.Restart(t)
	decidesWithin(t, auth, 15*time.Second, "web", "", "default (ACLs off: allow)")
	consul(t, agent, "", nil, "intention", "create", "-deny", "web", "api")
	decidesWithin(t, auth, within, "web", "", "intention web -> api (deny)")
}

// Precedence as Consul has it, checked against `consul intention check`
// for L4: an exact destination before an exact source, an exact source
// before a wildcard one.
func TestPrecedenceAgreesWithConsul(t *testing.T) {
	agent := consultest.Start(t)
	c := client(t, agent)
	pairs := [][2]string{{"web", "api"}, {"admin", "api"}, {"web", "db"}, {"admin", "db"}}
	steps := []struct {
		args []string
		want map[[2]string]string // Decision.By of the pairs that change
	}{
		{[]string{"-allow", "web", "*"}, map[[2]string]string{
			{"web", "api"}: "intention web -> * (allow)", {"web", "db"}: "intention web -> * (allow)"}},
		{[]string{"-deny", "*", "*"}, map[[2]string]string{
			{"admin", "api"}: "intention * -> * (deny)", {"admin", "db"}: "intention * -> * (deny)"}},
		{[]string{"-deny", "*", "api"}, map[[2]string]string{ // * -> api (8) beats web -> * (6)
			{"web", "api"}: "intention * -> api (deny)", {"admin", "api"}: "intention * -> api (deny)"}},
		{[]string{"-allow", "web", "api"}, map[[2]string]string{
			{"web", "api"}: "intention web -> api (allow)"}},
		{[]string{"-allow", "admin", "db"}, map[[2]string]string{
			{"admin", "db"}: "intention admin -> db (allow)"}},
	}
	want := map[[2]string]string{}
	for _, p := range pairs {
		want[p] = "default (ACLs off: allow)"
	}
	for _, s := range steps {
		consul(t, agent, "", nil, append([]string{"intention", "create"}, s.args...)...)
		for p, by := range s.want {
			want[p] = by
		}
		for _, p := range pairs {
			got, err := mesh.Check(context.Background(), c, p[0], p[1], nil)
			if err != nil {
				t.Fatalf("after intention create %s: Check(%s -> %s): %v", strings.Join(s.args, " "), p[0], p[1], err)
			}
			if got.By != want[p] {
				t.Errorf("after intention create %s: Check(%s -> %s) = %+v, want By %q", strings.Join(s.args, " "), p[0], p[1], got, want[p])
			}
			out, code := consul(t, agent, "", []int{1}, "intention", "check", p[0], p[1])
			if consulAllowed := code == 0; got.Allowed != consulAllowed {
				t.Errorf("after intention create %s: Check(%s -> %s) allowed=%v (%s), consul intention check says %s",
					strings.Join(s.args, " "), p[0], p[1], got.Allowed, got.By, strings.TrimSpace(out))
			}
		}
	}
}

const serviceDefaultsHTTP = `Kind = "service-defaults"
Name = "api"
Protocol = "http"
`

const l7Intentions = `Kind = "service-intentions"
Name = "api"
Sources = [
  {
    Name = "web"
    Permissions = [
      {
        Action = "allow"
        HTTP { PathPrefix = "/public/", Methods = ["GET"] }
      },
      {
        Action = "deny"
        HTTP { Methods = ["POST"] }
      }
    ]
  },
  {
    Name = "*"
    Action = "deny"
  }
]
`

// An L7 intention written with consul config write (the destination made
// http by its service-defaults first, as Consul requires): GET under
// /public/ allowed, POST denied, anything else to the default, and an L4
// question denied as `consul intention check` denies it.
func TestAuthorizerL7(t *testing.T) {
	agent := consultest.Start(t)
	auth, _ := run(t, agent, "api")
	consul(t, agent, serviceDefaultsHTTP, nil, "config", "write", "-")
	consul(t, agent, l7Intentions, nil, "config", "write", "-")

	const within = time.Second
	tests := []struct {
		source, request string
		allowed         bool
		by              string
	}{
		{"web", "GET /public/index.html", true, "intention web -> api, permission 1 (allow: GET path prefix /public/)"},
		{"web", "POST /public/form", false, "intention web -> api, permission 2 (deny: POST)"},
		{"web", "GET /private", true, "intention web -> api, no permission matches: default (ACLs off: allow)"},
		{"web", "", false, "intention web -> api has L7 permissions, which decide per request (an L4 check is denied, as consul intention check answers)"},
		{"admin", "GET /public/index.html", false, "intention * -> api (deny)"},
	}
	for _, tt := range tests {
		got, _ := decidesWithin(t, auth, within, tt.source, tt.request, tt.by)
		if got.Allowed != tt.allowed {
			t.Errorf("Authorize(%s, %q) = %+v, want allowed=%v", tt.source, tt.request, got, tt.allowed)
		}
		one, err := mesh.Check(context.Background(), client(t, agent), tt.source, "api", request(tt.request))
		if err != nil || one != got {
			t.Errorf("Check(%s -> api, %q) = %+v, %v; want what Authorize answers, %+v", tt.source, tt.request, one, err, got)
		}
	}
	if got := auth.Authorize("web", nil); !got.PerRequest {
		t.Errorf("Authorize(web, L4) with an L7 intention: got %+v, want PerRequest set", got)
	}
	out, code := consul(t, agent, "", []int{1}, "intention", "check", "web", "api")
	if code != 1 {
		t.Errorf("consul intention check web api with an L7 intention: %q (exit %d), want Denied as Authorize answers an L4 question", out, code)
	}

	// Deleting the entry takes effect too.
	consul(t, agent, "", nil, "config", "delete", "-kind", "service-intentions", "-name", "api")
	decidesWithin(t, auth, within, "web", "POST /public/form", "default (ACLs off: allow)")
}

// Against a real agent: the mesh config entry is followed, listed so that
// its absence is an answer too; an agent older than the request
// normalization (Consul 1.20) keeps an entry without it, which is Consul's
// default normalization.
func TestAuthorizerReadsTheMeshConfigEntry(t *testing.T) {
	agent := consultest.Start(t)
	c := client(t, agent)
	n, index, err := c.Normalization(context.Background(), mesh.Query{})
	if err != nil || n != (mesh.Normalization{}) || index == 0 {
		t.Fatalf("no mesh config entry: Normalization() = %s, index %d, %v; want the default and an index", n, index, err)
	}
	auth, logs := run(t, agent, "api")
	consul(t, agent, `Kind = "mesh"
HTTP {
  SanitizeXForwardedClientCert = true
}
`, nil, "config", "write", "-")
	n, after, err := c.Normalization(context.Background(), mesh.Query{})
	if err != nil || n != (mesh.Normalization{}) || after <= index {
		t.Fatalf("a mesh config entry without request normalization: Normalization() = %s, index %d (before: %d), %v", n, after, index, err)
	}
	if !eventually(5*time.Second, func() bool { return strings.Count(logs.String(), "request normalization read") >= 1 }) {
		t.Errorf("no log of the normalization read; log:\n%s", logs)
	}
	if got := auth.Normalization(); got != (mesh.Normalization{}) {
		t.Errorf("Authorizer.Normalization() = %s, want the default", got)
	}
}
