package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/sidecar-mesh/sidecar/internal/consultest"
	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/policy"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/ with the output of this run")

// cliIn runs the sidecar command in-process with stdin and env.
func cliIn(t *testing.T, env map[string]string, stdin string, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	var out, errb bytes.Buffer
	cmd := newRootCommand(strings.NewReader(stdin), &out, &errb, func(k string) string { return env[k] })
	cmd.SetArgs(args)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err = cmd.ExecuteContext(ctx)
	return out.String(), errb.String(), err
}

// golden compares got with testdata/NAME.golden; with -update it writes
// the file instead.
func golden(t *testing.T, name, got string) {
	t.Helper()
	file := filepath.Join("testdata", name+".golden")
	if *update {
		if err := os.MkdirAll("testdata", 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(file, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(file)
	if err != nil {
		t.Fatalf("%v (run go test -run %s -update to create it)", err, t.Name())
	}
	if got != string(want) {
		var d bytes.Buffer
		_ = unifiedDiff(&d, file, "got", lines(want), lines([]byte(got)))
		t.Errorf("output differs from %s (go test -update rewrites it):\n%s", file, d.String())
	}
}

var (
	indexRE       = regexp.MustCompile(`index \d+( -> \d+)?`)
	versionJSONRE = regexp.MustCompile(`"version": "\d+"`)
	versionYAMLRE = regexp.MustCompile(`version: "\d+"`)
	lastNumberRE  = regexp.MustCompile(`(?m)   \d+$`)
)

// scrub replaces what changes from run to run: the addresses given and
// Consul's indexes (in tables, the last column's number).
func scrub(s string, addrs ...string) string {
	for _, a := range addrs {
		s = strings.ReplaceAll(s, a, "ADDR")
	}
	s = indexRE.ReplaceAllStringFunc(s, func(m string) string {
		if strings.Contains(m, "->") {
			return "index N -> M"
		}
		return "index N"
	})
	s = versionJSONRE.ReplaceAllString(s, `"version": "N"`)
	s = versionYAMLRE.ReplaceAllString(s, `version: "N"`)
	return lastNumberRE.ReplaceAllString(s, "   N")
}

// exitStatus is what main would exit with for err.
func exitStatus(t *testing.T, err error) int {
	t.Helper()
	devnull, derr := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	if derr != nil {
		t.Fatal(derr)
	}
	defer devnull.Close()
	return exitCode(err, devnull)
}

func writeFile(t *testing.T, name, content string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// fleetPolicies has a YAML default, a YAML service document with a
// duration to normalize, and a JSON one.
const fleetPolicies = `# the fleet's policies
service: "*"
timeout: 10s
retry: {attempts: 2}
---
apiVersion: sidecar/v1
kind: Policy
service: users
timeout: 5000ms
retry:
  perTryTimeout: 1s
  on: [connect-failure, timeout, 503]
---
{"service": "orders", "retry": {"methods": ["GET", "POST"]}, "circuitBreaker": {"consecutiveFailures": 2}}
`

func kvIndex(t *testing.T, c *api.Client, service string) uint64 {
	t.Helper()
	pair, _, err := c.KV().Get(policy.KVKey(service), nil)
	if err != nil {
		t.Fatal(err)
	}
	if pair == nil {
		return 0
	}
	return pair.ModifyIndex
}

func consulClientFor(t *testing.T, addr string) *api.Client {
	t.Helper()
	cc := api.DefaultNonPooledConfig()
	cc.Address = addr
	c, err := api.NewClient(cc)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// apply, list, get, diff, explain and delete against a real Consul agent,
// with the output of each -o format held to a golden file.
func TestPolicyConsulRoundTrip(t *testing.T) {
	agent := consultest.Start(t)
	addr := agent.Addr()
	c := consulClientFor(t, addr)
	env := map[string]string{"CONSUL_HTTP_ADDR": addr}
	run := func(stdin string, args ...string) (string, string, error) {
		t.Helper()
		return cliIn(t, env, stdin, args...)
	}
	dir := t.TempDir()
	file := filepath.Join(dir, "policies.yaml")
	if err := os.WriteFile(file, []byte(fleetPolicies), 0o600); err != nil {
		t.Fatal(err)
	}
	sc := func(s string) string { return scrub(strings.ReplaceAll(s, dir+"/", ""), addr) }

	// Nothing yet: an empty table says so on stderr; JSON is an empty list.
	out, errOut, err := run("", "policy", "list")
	if err != nil || out != "" || !strings.Contains(errOut, "No policies in Consul KV at "+addr) {
		t.Fatalf("policy list on an empty KV: stdout %q, stderr %q, err %v", out, errOut, err)
	}
	if out, _, err := run("", "policy", "list", "-o", "json"); err != nil || out != "[]\n" {
		t.Fatalf("policy list -o json on an empty KV = %q, %v; want []", out, err)
	}

	// --dry-run prints the diffs and writes nothing.
	out, _, err = run("", "policy", "apply", "-f", file, "--dry-run")
	if err != nil {
		t.Fatal(err)
	}
	golden(t, "apply-dry-run", sc(out))
	if n := kvIndex(t, c, "users"); n != 0 {
		t.Fatalf("apply --dry-run wrote sidecar/policies/users (index %d)", n)
	}

	out, _, err = run("", "policy", "apply", "-f", file)
	if err != nil {
		t.Fatal(err)
	}
	golden(t, "apply", sc(out))
	pair, _, err := c.KV().Get(policy.KVKey("users"), nil)
	if err != nil || pair == nil {
		t.Fatalf("sidecar/policies/users after apply: %v, %v", pair, err)
	}
	if want := "apiVersion: sidecar/v1\nkind: Policy\nservice: users\ntimeout: 5s\n"; !strings.HasPrefix(string(pair.Value), want) {
		t.Fatalf("stored value %q; want the normalized document starting %q", pair.Value, want)
	}
	indexes := map[string]uint64{}
	for _, s := range []string{"*", "users", "orders"} {
		if indexes[s] = kvIndex(t, c, s); indexes[s] == 0 {
			t.Fatalf("apply did not write %s", policy.KVKey(s))
		}
	}
	if !strings.Contains(out, "policy/users created (sidecar/policies/users, index "+strconv.FormatUint(indexes["users"], 10)+")") {
		t.Fatalf("apply output %q does not name the index written (%d)", out, indexes["users"])
	}

	// Applying the same documents changes nothing, not even an index.
	out, _, err = run("", "policy", "apply", "-f", file)
	if err != nil || strings.Count(out, " unchanged ") != 3 {
		t.Fatalf("second apply: %q, %v; want 3 unchanged", out, err)
	}
	for s, i := range indexes {
		if n := kvIndex(t, c, s); n != i {
			t.Errorf("second apply rewrote %s: index %d -> %d", policy.KVKey(s), i, n)
		}
	}

	for _, format := range outputFormats {
		out, _, err := run("", "policy", "list", "-o", format)
		if err != nil {
			t.Fatal(err)
		}
		if format != "table" && !strings.Contains(out, strconv.FormatUint(indexes["orders"], 10)) {
			t.Errorf("list -o %s does not carry the version (ModifyIndex %d):\n%s", format, indexes["orders"], out)
		}
		golden(t, "list."+format, sc(out))
		out, _, err = run("", "policy", "get", "users", "-o", format)
		if err != nil {
			t.Fatal(err)
		}
		golden(t, "get."+format, sc(out))
	}

	// get's document applies as is: nothing changes.
	doc, _, err := run("", "policy", "get", "users")
	if err != nil {
		t.Fatal(err)
	}
	if out, _, err := run(doc, "policy", "apply", "-f", "-"); err != nil || !strings.Contains(out, "policy/users unchanged") {
		t.Fatalf("get users | apply -f -: %q, %v; want unchanged", out, err)
	}
	if out, _, err := run("", "policy", "get", "*"); err != nil || !strings.Contains(out, "service: '*'\ntimeout: 10s\n") {
		t.Fatalf("get '*' = %q, %v", out, err)
	}

	// diff: 0 equal, 1 different (with the diff), 2 trouble.
	if out, _, err := run("", "policy", "diff", "-f", file); err != nil || out != "" {
		t.Fatalf("diff of the applied file: %q, %v; want no output, exit 0", out, err)
	}
	changed := strings.Replace(fleetPolicies, "timeout: 5000ms", "timeout: 4s", 1) + "---\nservice: billing\nconcurrency: {maxInFlight: 64}\n"
	out, _, err = run(changed, "policy", "diff", "-f", "-")
	if code := exitStatus(t, err); code != 1 {
		t.Fatalf("diff of a changed file: exit %d (%v); want 1", code, err)
	}
	golden(t, "diff", sc(out))
	for name, args := range map[string][]string{
		"invalid file":       {"policy", "diff", "-f", writeFile(t, "bad.yaml", "service: users\nretry: {attempts: 0}\n")},
		"missing file":       {"policy", "diff", "-f", filepath.Join(dir, "nope.yaml")},
		"unknown flag":       {"policy", "diff", "-f", file, "--bogus"},
		"argument":           {"policy", "diff", "users"},
		"Consul unreachable": {"policy", "diff", "-f", file, "--consul-addr", freePort(t)},
	} {
		if _, _, err := run("", args...); exitStatus(t, err) != 2 {
			t.Errorf("diff with %s: exit %d (%v); want 2", name, exitStatus(t, err), err)
		}
	}

	out, _, err = run("", "policy", "explain", "users")
	if err != nil {
		t.Fatal(err)
	}
	golden(t, "explain-kv", sc(out))

	// An invalid value put there by hand shows as invalid, with why.
	if _, err := c.KV().Put(&api.KVPair{Key: policy.KVKey("bad"), Value: []byte("service: bad\nretry: {attempts: 0}\n")}, nil); err != nil {
		t.Fatal(err)
	}
	out, errOut, err = run("", "policy", "list")
	if err != nil || !regexp.MustCompile(`(?m)^bad +- +- +- +- +- +invalid +consul +\d+$`).MatchString(out) ||
		!strings.Contains(errOut, "consul:sidecar/policies/bad:1: retry.attempts: 0 is not allowed (allowed: 1 to 10)") {
		t.Fatalf("list with an invalid value: stdout %q, stderr %q, %v", out, errOut, err)
	}
	if _, _, err := run("", "policy", "get", "bad"); err == nil || !strings.Contains(err.Error(), "is not a valid policy") {
		t.Fatalf("get of an invalid value: %v", err)
	}

	out, _, err = run("", "policy", "delete", "orders")
	if err != nil || out != "policy/orders deleted (sidecar/policies/orders, was at index "+strconv.FormatUint(indexes["orders"], 10)+")\n" {
		t.Fatalf("delete orders: %q, %v", out, err)
	}
	if kvIndex(t, c, "orders") != 0 {
		t.Fatal("delete left sidecar/policies/orders")
	}
	for _, args := range [][]string{{"policy", "get", "orders"}, {"policy", "delete", "orders"}} {
		if _, _, err := run("", args...); err == nil || !strings.Contains(err.Error(), `no policy for "orders"`) {
			t.Errorf("%v after delete: %v; want not found", args, err)
		}
	}
	out, _, _ = run("", "policy", "list", "-o", "json")
	var left []policyEntry
	if err := json.Unmarshal([]byte(out), &left); err != nil || len(left) != 3 || left[0].Service != "*" || left[1].Service != "bad" ||
		left[1].Invalid == "" || left[2].Service != "users" {
		t.Fatalf("list -o json after delete: %v; want *, bad (invalid) and users:\n%s", err, out)
	}

	// Writes need Consul: --admin is read-only.
	for _, args := range [][]string{
		{"policy", "apply", "-f", file, "--admin", "127.0.0.1:15000"},
		{"policy", "delete", "users", "--admin", "127.0.0.1:15000"},
	} {
		if _, _, err := run("", args...); err == nil || !strings.Contains(err.Error(), "read-only") {
			t.Errorf("%v: %v; want a read-only error", args, err)
		}
	}
}

// Check-and-set: two operators who read the same version can't both
// write; the second gets a conflict naming the key and the indexes, and
// a transaction with a stale key writes none of its keys.
func TestPolicyCheckAndSet(t *testing.T) {
	agent := consultest.Start(t)
	addr := agent.Addr()
	c := consulClientFor(t, addr)
	env := map[string]string{"CONSUL_HTTP_ADDR": addr}
	doc := func(timeout string) string { return "service: users\ntimeout: " + timeout + "\n" }
	if _, _, err := cliIn(t, env, doc("5s"), "policy", "apply", "-f", "-"); err != nil {
		t.Fatal(err)
	}
	read := kvIndex(t, c, "users") // both operators read this version

	out, _, err := cliIn(t, env, doc("3s"), "policy", "apply", "-f", "-", "--cas-index", strconv.FormatUint(read, 10))
	if err != nil {
		t.Fatalf("first writer: %v", err)
	}
	now := kvIndex(t, c, "users")
	if !strings.Contains(out, "configured") || now == read {
		t.Fatalf("first writer: %q; index %d -> %d", out, read, now)
	}
	_, _, err = cliIn(t, env, doc("7s"), "policy", "apply", "-f", "-", "--cas-index", strconv.FormatUint(read, 10))
	var conflict *casConflictError
	if !errors.As(err, &conflict) || exitStatus(t, err) != 1 {
		t.Fatalf("second writer: %v; want a check-and-set conflict, exit 1", err)
	}
	for _, want := range []string{"sidecar/policies/users", "expected index " + strconv.FormatUint(read, 10), "at index " + strconv.FormatUint(now, 10), "nothing was written"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("conflict %q lacks %q", err, want)
		}
	}
	if got, _, _ := cliIn(t, env, "", "policy", "get", "users"); !strings.Contains(got, "timeout: 3s") {
		t.Fatalf("after the conflict: %q; want the first writer's 3s", got)
	}

	// --cas-index 0 creates only.
	if _, _, err := cliIn(t, env, doc("1s"), "policy", "apply", "-f", "-", "--cas-index", "0"); !errors.As(err, &conflict) ||
		!strings.Contains(err.Error(), "expected no key") {
		t.Fatalf("--cas-index 0 on an existing key: %v; want a conflict", err)
	}
	if out, _, err := cliIn(t, env, "service: fresh\n", "policy", "apply", "-f", "-", "--cas-index", "0"); err != nil || !strings.Contains(out, "policy/fresh created") {
		t.Fatalf("--cas-index 0 on a new key: %q, %v", out, err)
	}
	// --cas reads each key's index and writes against it.
	if out, _, err := cliIn(t, env, doc("4s")+"---\nservice: other\n", "policy", "apply", "-f", "-", "--cas"); err != nil ||
		!strings.Contains(out, "policy/users configured") || !strings.Contains(out, "policy/other created") {
		t.Fatalf("apply --cas: %q, %v", out, err)
	}

	// Someone writes between our read and our write: the transaction
	// fails as a whole.
	kv, err := newKVStore(addr, "", defaultRequestTimeout)
	if err != nil {
		t.Fatal(err)
	}
	stale := kvIndex(t, c, "users")
	if _, err := c.KV().Put(&api.KVPair{Key: policy.KVKey("users"), Value: []byte(doc("9s"))}, nil); err != nil {
		t.Fatal(err)
	}
	_, err = kv.write(context.Background(), []discovery.PolicyWrite{
		{Key: policy.KVKey("third"), Value: []byte("service: third\n"), CAS: true, Index: 0},
		{Key: policy.KVKey("users"), Value: []byte(doc("2s")), CAS: true, Index: stale},
	})
	if !errors.As(err, &conflict) || conflict.key != "sidecar/policies/users" || conflict.expected != stale || conflict.current != kvIndex(t, c, "users") {
		t.Fatalf("transaction with a stale index: %v; want a conflict on sidecar/policies/users, expected %d", err, stale)
	}
	if kvIndex(t, c, "third") != 0 {
		t.Fatal("a failed transaction wrote sidecar/policies/third: not all-or-nothing")
	}

	// delete: --cas-index checks, --cas deletes what was read.
	if _, _, err := cliIn(t, env, "", "policy", "delete", "users", "--cas-index", strconv.FormatUint(stale, 10)); !errors.As(err, &conflict) ||
		!strings.Contains(err.Error(), "nothing was deleted") {
		t.Fatalf("delete --cas-index stale: %v; want a conflict", err)
	}
	if out, _, err := cliIn(t, env, "", "policy", "delete", "users", "--cas", "--dry-run"); err != nil || !strings.Contains(out, "(dry run") || kvIndex(t, c, "users") == 0 {
		t.Fatalf("delete --dry-run: %q, %v", out, err)
	}
	if out, _, err := cliIn(t, env, "", "policy", "delete", "users", "--cas"); err != nil || !strings.Contains(out, "policy/users deleted") || kvIndex(t, c, "users") != 0 {
		t.Fatalf("delete --cas: %q, %v", out, err)
	}
	if err := kv.delete(context.Background(), policy.KVKey("fresh"), true, 1); !errors.As(err, &conflict) || kvIndex(t, c, "fresh") == 0 {
		t.Fatalf("delete at a stale index: %v; want a conflict and the key kept", err)
	}
}

// validate is offline: every problem of every document, each with file,
// line, document, field path, value and allowed range; warnings do not
// fail it.
func TestPolicyValidate(t *testing.T) {
	bad := writeFile(t, "bad.yaml", `service: users
timeout: 0s
retry:
  attempts: 11
  on: [reset, 302]
---
service: Orders
circuitBreaker: {failureRatio: 1.5}
---
service: billing
retry: {atempts: 2}
`)
	_, _, err := cliIn(t, nil, "", "policy", "validate", "-f", bad)
	if err == nil || exitStatus(t, err) != 1 {
		t.Fatalf("validate of an invalid file: %v; want exit 1", err)
	}
	msg := err.Error()
	for _, want := range []string{
		bad + " is not valid: 6 problems:",
		bad + ":1: document 1: timeout: 0s is not allowed (allowed: 1ms to 1h0m0s)",
		bad + ":1: document 1: retry.attempts: 11 is not allowed (allowed: 1 to 10)",
		bad + `:1: document 1: retry.on[1]: "302" is not allowed`,
		bad + `:7: document 2: service: "Orders" is not allowed`,
		bad + ":7: document 2: circuitBreaker.failureRatio: 1.5 is not allowed (allowed: more than 0, at most 1)",
		bad + `:11: unknown key "retry.atempts" (allowed: attempts, backoff, budget, methods, on, perTryTimeout)`,
	} {
		if !strings.Contains(msg, want) {
			t.Errorf("validate error lacks %q:\n%s", want, msg)
		}
	}
	if n := strings.Count(msg, "\n  "+bad+":"); n != 6 {
		t.Errorf("validate listed %d problems, want 6:\n%s", n, msg)
	}

	good := "service: '*'\ntimeout: 10s\n---\nservice: users\nretry: {perTryTimeout: 4s, on: [timeout]}\n---\nservice: orders\nretry: {methods: [GET, POST]}\n"
	out, errOut, err := cliIn(t, nil, good, "policy", "validate", "-f", "-")
	if err != nil || out != "stdin: 3 policies valid: *, users, orders\n" {
		t.Fatalf("validate -f - of a valid file: %q, %v", out, err)
	}
	// Warnings name the document whose values cause them; the "*" one
	// causes none here (its timeout is fine on its own).
	if !strings.Contains(errOut, "Warning: orders: retry.methods includes POST") || strings.Contains(errOut, "Warning: *:") ||
		strings.Count(errOut, "Warning: ") != 2 || !strings.Contains(errOut, "Warning: users: retry.perTryTimeout × retry.attempts does not fit") {
		t.Fatalf("validate warnings:\n%s", errOut)
	}
	if _, _, err := cliIn(t, nil, "", "policy", "validate"); err == nil || !strings.Contains(err.Error(), "-f FILE is required") {
		t.Fatalf("validate without -f: %v", err)
	}
	if _, _, err := cliIn(t, nil, "# nothing\n", "policy", "validate", "-f", "-"); err == nil || !strings.Contains(err.Error(), "no Policy documents") {
		t.Fatalf("validate of an empty input: %v", err)
	}
}

// explain's report for a few policies, offline from files: origins, worst
// cases and warnings.
func TestPolicyExplainGoldens(t *testing.T) {
	design, err := os.ReadFile(filepath.Join("testdata", "design-policy.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	risky := `service: "*"
timeout: 5s
retry: {attempts: 4, perTryTimeout: 2s, on: [connect-failure, reset, timeout, 503]}
---
service: payments
retry:
  methods: [GET, POST]
  on: [reset, 429, 503]
  backoff: {base: 100ms, max: 2s}
circuitBreaker: {consecutiveFailures: 3}
outlierDetection: {maxEjectionPercent: 100}
concurrency: {maxInFlight: 3}
`
	cases := []struct {
		name, file, service string
		args                []string
	}{
		{"explain-defaults", "service: user-service\n", "user-service", nil},
		{"explain-design", string(design), "user-service", nil},
		{"explain-risky", risky, "payments", nil},
		{"explain-star", risky, "*", nil},
		{"explain-no-retries", "service: '*'\nretry: {budget: {ratio: 0, minPerSecond: 0}}\n", "search", nil},
		{"explain-design.json", string(design), "user-service", []string{"-o", "json"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			file := writeFile(t, "policies.yaml", tc.file)
			out, _, err := cliIn(t, nil, "", append([]string{"policy", "explain", tc.service, "-f", file}, tc.args...)...)
			if err != nil {
				t.Fatal(err)
			}
			golden(t, tc.name, strings.ReplaceAll(out, file, "policies.yaml"))
		})
	}
}
