package main

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/policy"
	"github.com/sidecar-mesh/sidecar/pkg/requestlog"
)

func TestTermSafe(t *testing.T) {
	for in, want := range map[string]string{
		"user-service/users/42":          "user-service/users/42",
		"née ✓":                          "née ✓",
		"\x1b]0;PWNED\x07\x1b[2J":        `\x1b]0;PWNED\x07\x1b[2J`,
		"a\r\nb\tc":                      `a\x0d\x0ab\x09c`,
		"bad \xff byte":                  `bad \xff byte`,
		"rtl \u202e override \u200b":     `rtl \u202e override \u200b`,
		"c1 \u009b control":              `c1 \u009b control`,
		"x" + string(rune(0x7f)) + "del": `x\x7fdel`,
	} {
		if got := termSafe(in); got != want {
			t.Errorf("termSafe(%q) = %q, want %q", in, got, want)
		}
	}
}

// What an app, a peer or a Consul writer chose (a path, a service name from
// a KV key, an endpoint, an upstream's words) is printed inert: no escape
// sequence reaches the terminal, no line is forged.
func TestTerminalOutputIsInert(t *testing.T) {
	evil := "\x1b]0;PWNED\x07\x1b[2J\r\n17:00:00.000 GET fake -> 200"
	r := requestlog.Request{Time: time.Unix(0, 0), Method: "GET", Service: "users", Path: "/a" + evil, Status: 503,
		Detail: "detail" + evil, Stop: "stop" + evil,
		Attempts: []requestlog.Attempt{{Endpoint: "10.0.0.1:80" + evil, Outcome: "503" + evil}}}
	var table bytes.Buffer
	if err := writeTable(&table, []string{"SERVICE", "SOURCE"}, [][]string{{"svc" + evil, "consul:sidecar/policies/" + evil}}); err != nil {
		t.Fatal(err)
	}
	note := rejectionNote("svc"+evil, &policy.Rejection{Source: "consul:k" + evil, Error: "bad" + evil + "\nsecond line", At: time.Unix(0, 0)})
	for name, out := range map[string]string{"tap": tapLine(r) + "\n", "why": explain(r, ""), "table": table.String(), "rejection": note + "\n"} {
		if strings.ContainsAny(out, "\x1b\x07\r") {
			t.Errorf("%s: control bytes reach the terminal: %q", name, out)
		}
		if strings.Contains(out, "\n17:00:00.000 GET fake") {
			t.Errorf("%s: a forged line: %q", name, out)
		}
	}
	if lines := strings.Count(tapLine(r), "\n"); lines != 0 {
		t.Errorf("tap: one request printed on %d lines", lines+1)
	}
	if !strings.Contains(note, "\n  second line") {
		t.Errorf("rejection: the error's own lines are gone: %q", note)
	}
}
