package main

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/sidecar-mesh/sidecar/internal/consultest"
	"github.com/sidecar-mesh/sidecar/internal/logtest"
	"github.com/sidecar-mesh/sidecar/internal/toolbin"
)

// repoRoot is where the pages' relative paths start.
const repoRoot = "../.."

// docPages are the pages whose shell examples TestDocsCommands checks.
// docs/clients.md is run whole by TestClientGuide.
func docPages(t *testing.T) []string {
	pages, err := filepath.Glob(filepath.Join(repoRoot, "docs", "*.md"))
	if err != nil {
		t.Fatal(err)
	}
	pages = append(pages, filepath.Join(repoRoot, "README.md"), filepath.Join(repoRoot, "k8s", "README.md"))
	var out []string
	for _, p := range pages {
		if filepath.Base(p) != "clients.md" {
			out = append(out, p)
		}
	}
	return out
}

// docBlock is one fenced code block of a page: its info string's language
// and tag ("```sh quickstart"), and its lines.
type docBlock struct {
	page      string
	line      int // of the opening fence
	lang, tag string
	lines     []string
}

func docBlocks(t *testing.T, page string) []docBlock {
	t.Helper()
	data, err := os.ReadFile(page)
	if err != nil {
		t.Fatal(err)
	}
	var blocks []docBlock
	var cur *docBlock
	for i, l := range strings.Split(string(data), "\n") {
		switch {
		case cur == nil && strings.HasPrefix(l, "```"):
			lang, tag, _ := strings.Cut(strings.TrimPrefix(l, "```"), " ")
			blocks = append(blocks, docBlock{page: page, line: i + 1, lang: lang, tag: tag})
			cur = &blocks[len(blocks)-1]
		case cur != nil && l == "```":
			cur = nil
		case cur != nil:
			cur.lines = append(cur.lines, l)
		}
	}
	return blocks
}

// taggedBlock is the one block of page with the tag.
func taggedBlock(t *testing.T, page, tag string) docBlock {
	t.Helper()
	for _, b := range docBlocks(t, page) {
		if b.tag == tag {
			return b
		}
	}
	t.Fatalf("%s has no block tagged %q", page, tag)
	return docBlock{}
}

// shellCommands splits a shell block into commands: continuation lines
// joined, comments dropped, pipelines split, each command as words with
// quotes removed and redirections taken off.
func shellCommands(lines []string) ([][]string, error) {
	var joined []string
	var acc string
	for _, l := range lines {
		if strings.HasSuffix(l, `\`) {
			acc += strings.TrimSuffix(l, `\`) + " "
			continue
		}
		joined = append(joined, acc+l)
		acc = ""
	}
	var cmds [][]string
	for _, l := range joined {
		var words []string
		var word strings.Builder
		inWord, quote := false, rune(0)
		flush := func() {
			if inWord {
				words = append(words, word.String())
			}
			word.Reset()
			inWord = false
		}
		endCommand := func() {
			flush()
			if len(words) > 0 {
				cmds = append(cmds, words)
			}
			words = nil
		}
		rs := []rune(l)
	scan:
		for i := 0; i < len(rs); i++ {
			r := rs[i]
			switch {
			case quote != 0 && r == quote:
				quote = 0
			case quote != 0:
				word.WriteRune(r)
			case r == '\'' || r == '"':
				quote, inWord = r, true
			case r == '#' && !inWord:
				break scan
			case r == ' ' || r == '\t':
				flush()
			case r == '|' || r == '&' || r == ';':
				endCommand()
			case r == '<' || r == '>':
				flush()
				words = append(words, string(r)) // the next word is its target
			default:
				word.WriteRune(r)
				inWord = true
			}
		}
		if quote != 0 {
			return nil, fmt.Errorf("unclosed quote in %q", l)
		}
		endCommand()
	}
	for i, c := range cmds { // redirections off
		var kept []string
		for j := 0; j < len(c); j++ {
			if c[j] == "<" || c[j] == ">" {
				j++
				continue
			}
			kept = append(kept, c[j])
		}
		cmds[i] = kept
	}
	return cmds, nil
}

// Every shell example of the README and the docs pages is a command that
// exists as written: a sidecar command with its flags and arguments as
// the CLI parses them (a placeholder "..." aside), a make target of the
// Makefile, a kubectl command whose files of this repository exist. The
// examples that run against a real sidecar, Consul or client are run by
// TestReadmeQuickStart, TestPolicyGuide and TestClientGuide.
func TestDocsCommands(t *testing.T) {
	makefile, err := os.ReadFile(filepath.Join(repoRoot, "Makefile"))
	if err != nil {
		t.Fatal(err)
	}
	checked := 0
	for _, page := range docPages(t) {
		for _, b := range docBlocks(t, page) {
			if b.lang != "sh" {
				continue
			}
			cmds, err := shellCommands(b.lines)
			if err != nil {
				t.Errorf("%s:%d: %v", page, b.line, err)
				continue
			}
			for _, c := range cmds {
				where := fmt.Sprintf("%s:%d: %s", page, b.line, strings.Join(c, " "))
				checked++
				switch c[0] {
				case "sidecar":
					if err := checkSidecarCommand(c[1:]); err != nil {
						t.Errorf("%s: %v", where, err)
					}
				case "make":
					for _, w := range c[1:] {
						if strings.Contains(w, "=") {
							continue // a variable
						}
						if !regexp.MustCompile(`(?m)^([\w-]+ )*` + regexp.QuoteMeta(w) + `( [\w-]+)*:`).Match(makefile) {
							t.Errorf("%s: the Makefile has no target %s", where, w)
						}
					}
				case "kubectl":
					for i, w := range c {
						if i > 0 && c[i-1] == "-f" && strings.Contains(w, "/") {
							if _, err := os.Stat(filepath.Join(repoRoot, w)); err != nil {
								t.Errorf("%s: %v", where, err)
							}
						}
					}
				case "curl", "docker":
					// the README's are run by TestReadmeQuickStart; the
					// others address a cluster or a registry.
				default:
					t.Errorf("%s: %s is a program this test does not know how to check", where, c[0])
				}
			}
		}
	}
	if checked < 30 {
		t.Fatalf("checked %d commands; the pages have more", checked)
	}
}

// checkSidecarCommand parses args as `sidecar` does, without running it.
func checkSidecarCommand(args []string) error {
	if n := len(args); n > 0 && args[n-1] == "..." {
		args = args[:n-1]
	}
	root := newRootCommand(strings.NewReader(""), nil, nil, func(string) string { return "" })
	cmd, rest, err := root.Find(args)
	if err != nil {
		return err
	}
	if cmd == root || !cmd.Runnable() {
		return fmt.Errorf("%q is no sidecar command", strings.Join(args, " "))
	}
	if err := cmd.ParseFlags(rest); err != nil {
		return err
	}
	return cmd.ValidateArgs(cmd.Flags().Args())
}

// The README's quick start works as written: `sidecar demo` (what `make
// run` runs) and then each of its commands print what the README says they
// do: the curl commands run by curl, the sidecar commands by the CLI (in
// process, told the test sidecar's admin address as $SIDECAR_ADMIN_ADDR).
// The README's 15001 and 15000 are the test sidecar's ports. The demo's
// third instance fails half its calls: the POSTs that meet it fail and
// `sidecar why` explains them; `sidecar tap` prints the requests the test
// sends while it watches.
func TestReadmeQuickStart(t *testing.T) {
	curl := toolbin.Path(t, "curl")
	out, adm, metrics := freePort(t), freePort(t), freePort(t)
	runInProcess(t, &logtest.Buffer{}, &logtest.Buffer{}, "demo", "--outbound-addr", out, "--admin-addr", adm,
		"--metrics-addr", metrics, "--health-addr", freePort(t), "--drain-window", "1ms")
	waitServing(t, "http://"+adm+"/version")

	b := taggedBlock(t, filepath.Join(repoRoot, "README.md"), "quickstart")
	want := []*regexp.Regexp{
		regexp.MustCompile(`"instance":"user-service-[123]".*"path":"/users/1"`),
		regexp.MustCompile(`"instance":"user-service-[123]".*"path":"/users/1"`),
		regexp.MustCompile(`(?s)user-service-[123]: event 1\n.*event 5\n`),
		regexp.MustCompile(`(?si)^HTTP/1.1 503 .*x-sidecar-error: unknown_service`),
		regexp.MustCompile(`(?s)"user-service".*127\.0\.0\.1:900[123]`),
		regexp.MustCompile(`^((200|503) ){30}$`),
		regexp.MustCompile(`(?m)^\d\d:\d\d:\d\d\.\d{3} POST user-service/users -> 503 after 1 attempt in [\d.]+ ms\n` +
			`  1\) 127\.0\.0\.1:9003 503 \([\d.]+ ms\)\n` +
			`  stopped: POST is not retried \(retry\.methods; an Idempotency-Key header allows it\)\n`),
		regexp.MustCompile(`^(\d\d:\d\d:\d\d\.\d{3} GET user-service/users/2 -> 200 in [\d.]+ ms \[.+\]\n){5}$`),
	}
	if len(b.lines) != len(want) {
		t.Fatalf("README's quick start has %d commands, this test knows %d", len(b.lines), len(want))
	}
	for i, line := range b.lines {
		if strings.HasPrefix(line, "sidecar ") {
			got, err := quickStartCLI(t, line, out, adm)
			if err != nil || !want[i].MatchString(got) {
				t.Errorf("%s\n  error: %v\n  printed: %s\n  want match: %s", line, err, got, want[i])
			}
			continue
		}
		line = strings.ReplaceAll(line, "127.0.0.1:15001", out)
		line = strings.ReplaceAll(line, "127.0.0.1:15000", adm)
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		cmd := exec.CommandContext(ctx, "bash", "-c", line)
		cmd.Env = append(os.Environ(), "PATH="+filepath.Dir(curl)+":"+os.Getenv("PATH"), "http_proxy=", "HTTP_PROXY=", "no_proxy=", "NO_PROXY=")
		got, err := cmd.Output()
		cancel()
		if err != nil || !want[i].Match(got) {
			t.Errorf("%s\n  exit: %v\n  printed: %s\n  want match: %s", line, err, got, want[i])
		}
	}
}

// quickStartCLI runs a sidecar command of the quick start in process
// against the sidecar at adm; for `sidecar tap` it sends GET
// user-service/users/2 through out while the tap watches.
func quickStartCLI(t *testing.T, line, out, adm string) (string, error) {
	cmds, err := shellCommands([]string{line})
	if err != nil || len(cmds) != 1 {
		t.Fatalf("%s: not one command: %v", line, err)
	}
	env := map[string]string{"SIDECAR_ADMIN_ADDR": adm}
	if cmds[0][1] != "tap" {
		stdout, _, err := cliIn(t, env, "", cmds[0][1:]...)
		return stdout, err
	}
	type result struct {
		out string
		err error
	}
	tapped := make(chan result, 1)
	go func() {
		stdout, _, err := cliIn(t, env, "", cmds[0][1:]...)
		tapped <- result{stdout, err}
	}()
	c := &http.Client{Timeout: 10 * time.Second}
	for sent := 0; ; sent++ {
		select {
		case r := <-tapped:
			return r.out, r.err
		case <-time.After(20 * time.Millisecond): // the pace of the requests, not a wait for an outcome
			if sent > 500 {
				t.Fatalf("%s printed no 5 requests of 500 sent", line)
			}
			req, _ := http.NewRequest(http.MethodGet, "http://"+out+"/users/2", nil)
			req.Host = "user-service"
			if resp, err := c.Do(req); err == nil {
				resp.Body.Close()
			}
		}
	}
}

// waitServing polls url until it answers.
func waitServing(t *testing.T, url string) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; {
		resp, err := http.Get(url)
		if err == nil {
			resp.Body.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not serving after 10s: %v", url, err)
		}
		time.Sleep(20 * time.Millisecond) // polling for startup, not on a request path
	}
}

// docs/policies.md's commands run in the page's order against a real
// Consul agent and a real sidecar watching it, with the page's
// policies.yaml: each succeeds (diff finds the file and Consul equal), and
// the sidecar puts the applied policy in force.
func TestPolicyGuide(t *testing.T) {
	page := filepath.Join(repoRoot, "docs", "policies.md")
	agent := consultest.Start(t)
	dir := t.TempDir()
	yaml := taggedBlock(t, page, "policies.yaml")
	if err := os.WriteFile(filepath.Join(dir, "policies.yaml"), []byte(strings.Join(yaml.lines, "\n")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	rs := runSidecar(t, "", "--consul-addr", agent.Addr(), "--static", "user-service=127.0.0.1:9")
	env := map[string]string{"CONSUL_HTTP_ADDR": agent.Addr(), "SIDECAR_ADMIN_ADDR": rs.admin}

	block := taggedBlock(t, page, "policy-guide")
	cmds, err := shellCommands(block.lines)
	if err != nil {
		t.Fatal(err)
	}
	ran := map[string]string{}
	for i, c := range cmds {
		if c[0] != "sidecar" {
			t.Fatalf("command %d of the guide is not sidecar's: %q", i+1, c)
		}
		stdin := ""
		if strings.Contains(block.lines[i], "< policies.yaml") {
			stdin = strings.Join(yaml.lines, "\n") + "\n"
		}
		args := c[1:]
		for j, a := range args {
			if a == "policies.yaml" {
				args[j] = filepath.Join(dir, a)
			}
		}
		stdout, stderr, err := cliIn(t, env, stdin, args...)
		if err != nil {
			t.Fatalf("%s: %v\n%s%s", block.lines[i], err, stdout, stderr)
		}
		name := c[1]
		if name == "policy" {
			name += " " + c[2]
		}
		ran[name] = stdout
		if name == "policy explain" {
			// The sidecar has the applied policy in force by now.
			for deadline := time.Now().Add(10 * time.Second); ; {
				got, _, err := cliIn(t, env, "", "policy", "get", "user-service", "--admin", rs.admin, "-o", "json")
				if err == nil && strings.Contains(got, `"timeout": "2s"`) {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("the sidecar did not put the applied policy in force: %v\n%s", err, got)
				}
				time.Sleep(50 * time.Millisecond) // waiting for the KV watch, not on a request path
			}
		}
	}
	for cmd, want := range map[string]string{
		"policy list":    "user-service",
		"policy get":     `"timeout": "2s"`,
		"policy explain": "user-service",
		"status":         "user-service",
	} {
		if !strings.Contains(ran[cmd], want) {
			t.Errorf("%s printed no %q:\n%s", cmd, want, ran[cmd])
		}
	}
}
