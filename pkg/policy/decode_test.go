package policy

import (
	"errors"
	"fmt"
	"reflect"
	"runtime"
	"strings"
	"testing"
	"time"
)

// aliasBomb is 22 KB at n = 600: a backoff with n keys, a retry holding n
// aliases of it, and n aliases of that retry. Each alias stands for a
// copy of what it names: 216 million nodes at n = 600.
func aliasBomb(n int) string {
	return "retry: &r\n  backoff: &b\n" + strings.Repeat("    base: 1s\n", n) +
		strings.Repeat("  backoff: *b\n", n) + strings.Repeat("retry: *r\n", n)
}

// within runs f and fails the test if it takes longer than limit. f keeps
// running when it does: the test fails, and the leak is reported too.
func within(t *testing.T, limit time.Duration, what string, f func()) {
	t.Helper()
	done := make(chan struct{})
	start := time.Now()
	go func() {
		defer close(done)
		f()
	}()
	timer := time.NewTimer(limit)
	defer timer.Stop()
	select {
	case <-done:
	case <-timer.C:
		t.Fatalf("%s still running after %v, want it done within %v", what, time.Since(start).Round(time.Millisecond), limit)
	}
}

// A document of aliases of aliases is refused at once, as a file and as a
// Consul KV value, whatever size the aliases would expand to: 22 KB of them
// held every policy consumer for minutes, and a 500 KB value (Consul's
// limit) for far longer.
func TestAliasBombRefusedFast(t *testing.T) {
	for _, n := range []int{600, 13800} {
		doc := []byte(aliasBomb(n))
		name := fmt.Sprintf("%d KB of aliases", len(doc)>>10)
		want := fmt.Sprintf("aliases expand to more than %d nodes (allowed: at most %d)", MaxAliasNodes, MaxAliasNodes)
		for via, parse := range map[string]func() error{
			"ParseDocument": func() error { _, err := ParseDocument(doc, "kv", "svc"); return err },
			"Parse":         func() error { _, err := Parse(doc, "p.yaml"); return err },
			"SetConsul": func() error {
				s := NewStore(StoreOptions{})
				return s.SetConsul(map[string]KVDocument{"svc": {Key: KVKey("svc"), Value: doc, ModifyIndex: 1}})
			},
		} {
			var err error
			within(t, raceSlowdown*time.Second, via+" of "+name, func() { err = parse() })
			if err == nil || !strings.Contains(err.Error(), want) {
				t.Errorf("%s of %s: %v; want an error with %q", via, name, err, want)
			}
		}
	}
}

// The cap counts the nodes aliases add: up to MaxAliasNodes is a document
// like any other, one more is refused. An alias inside the node it names
// is refused too, not followed.
func TestAliasCap(t *testing.T) {
	aliases := func(n int) string {
		return "service: a\nretry: {on: [&s 503" + strings.Repeat(", *s", n) + "]}\n"
	}
	ps, err := Parse([]byte(aliases(MaxAliasNodes)), "p.yaml")
	if err != nil || len(ps[0].Retry.On) != MaxAliasNodes+1 {
		t.Fatalf("Parse of a document whose aliases add %d nodes: %v; want it accepted", MaxAliasNodes, err)
	}
	if _, err := Parse([]byte(aliases(MaxAliasNodes+1)), "p.yaml"); err == nil || !strings.Contains(err.Error(), "p.yaml:2: aliases expand to more than") {
		t.Fatalf("Parse of a document whose aliases add %d nodes: %v; want it refused", MaxAliasNodes+1, err)
	}
	// Aliases used as they are meant to be: one value, said once.
	ps, err = Parse([]byte("service: a\ntimeout: &t 2s\nretry: {perTryTimeout: *t, backoff: &b {base: 10ms, max: 20ms}}\n"), "p.yaml")
	if err != nil || ps[0].Retry.PerTryTimeout.D() != 2*time.Second || ps[0].Retry.Backoff.Max.D() != 20*time.Millisecond {
		t.Fatalf("Parse with aliases: %+v, %v; want perTryTimeout 2s from the alias", ps, err)
	}
	// A node used as two types is checked as each.
	if _, err := Parse([]byte("service: a\nretry: &r {attempts: 2}\ncircuitBreaker: *r\n"), "p.yaml"); err == nil ||
		!strings.Contains(err.Error(), `p.yaml:2: unknown key "circuitBreaker.attempts"`) {
		t.Fatalf("retry's mapping as a circuitBreaker: %v; want attempts refused there", err)
	}
	for _, doc := range []string{"retry: &a {backoff: *a}\n", "retry: &a\n  backoff: {base: *a}\n"} {
		if _, err := ParseDocument([]byte(doc), "kv", "a"); err == nil || !strings.Contains(err.Error(), `alias "*a" is inside the node it names`) {
			t.Errorf("ParseDocument(%q): %v; want the alias refused", doc, err)
		}
	}
}

// A key given twice is reported once per repetition, with its path, in
// time linear in the keys: the decoder compares every key with every
// other and formats a message for each pair (2 million for 2,000 keys).
func TestDuplicateKeys(t *testing.T) {
	if _, err := Parse([]byte("service: a\nretry:\n  attempts: 2\n  attempts: 3\n"), "p.yaml"); err == nil ||
		!strings.Contains(err.Error(), `p.yaml:4: key "retry.attempts" given twice (first on line 3)`) {
		t.Fatalf("Parse of a key given twice: %v; want it reported with its path and both lines", err)
	}
	doc := "service: a\nretry:\n  backoff:\n" + strings.Repeat("    base: 1s\n", 2000)
	var err error
	within(t, raceSlowdown*time.Second, "Parse of 2,000 repeated keys", func() { _, err = Parse([]byte(doc), "p.yaml") })
	var ps *Problems
	if !errors.As(err, &ps) || ps.Len() != 1999 || len(ps.Errs) != MaxProblems {
		t.Fatalf("Parse of one key given 2,000 times: %T with %d problems; want 1999, %d listed", err, ps.Len(), MaxProblems)
	}
	if got := ps.Errs[0].Error(); got != `p.yaml:5: key "retry.backoff.base" given twice (first on line 4)` {
		t.Errorf("first problem %q", got)
	}
}

// Every value of the wrong type is reported, each with its key path, what
// the field takes and what it got; so is every duration that is not one,
// with the durations its field allows.
func TestDecodeErrorsNameTheField(t *testing.T) {
	s := NewStore(StoreOptions{})
	err := s.SetConsul(map[string]KVDocument{"x": {Key: KVKey("x"), ModifyIndex: 4,
		Value: []byte(`{"timeout":"2s","connectTimeout":"9999999h","retry":{"attempts":"3"}}`)}})
	for _, want := range []string{
		`consul:sidecar/policies/x:1: connectTimeout: invalid duration "9999999h" (allowed: 1ms to 1m0s, written as 250ms, 5s or 1m)`,
		`consul:sidecar/policies/x:1: retry.attempts: must be an integer, got string "3"`,
	} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("SetConsul: %v\nwant it to contain %q", err, want)
		}
	}

	doc := `service: a
timeout: 5
streamIdleTimeout: -1s
retry:
  attempts: 2.5
  perTryTimeout: [1s]
  on: reset
  methods: [GET, {a: 1}]
  budget: {ratio: high, minPerSecond: -1e300}
  backoff: 1s
circuitBreaker: {failureRatio: true, minRequests: 1e3}
concurrency: {adaptive: 1, maxQueued: 9223372036854775808}
hedge: {delay: soon}
loadBalancer: {policy: [round-robin], slowStart: 1h}
bogus: 1
outlierDetection: {bogus: 2}
`
	_, err = Parse([]byte(doc), "p.yaml")
	var ps *Problems
	if !errors.As(err, &ps) {
		t.Fatalf("Parse: %v, want a *Problems", err)
	}
	want := []string{
		`p.yaml:2: timeout: invalid duration "5" (allowed: 1ms to 1h0m0s, written as 250ms, 5s or 1m)`,
		`p.yaml:3: streamIdleTimeout: negative duration "-1s" (allowed: 1ms to 24h0m0s)`,
		`p.yaml:5: retry.attempts: must be an integer, got number 2.5`,
		`p.yaml:6: retry.perTryTimeout: must be a duration, got a list (allowed: 1ms to 1h0m0s, or 0 for none, written as 250ms, 5s or 1m)`,
		`p.yaml:7: retry.on: must be a list, got string "reset"`,
		`p.yaml:8: retry.methods[1]: must be a string, got a mapping`,
		`p.yaml:9: retry.budget.ratio: must be a number, got string "high"`,
		`p.yaml:9: retry.budget.minPerSecond: must be an integer, got number -1e300`,
		`p.yaml:10: retry.backoff: must be a mapping, got string "1s"`,
		`p.yaml:11: circuitBreaker.failureRatio: must be a number, got boolean true`,
		`p.yaml:12: concurrency.adaptive: must be true or false, got number 1`,
		`p.yaml:12: concurrency.maxQueued: must be an integer, got number 9223372036854775808`,
		`p.yaml:13: hedge.delay: invalid duration "soon" (allowed: 1ms to 1m0s, or 0 for none, written as 250ms, 5s or 1m)`,
		`p.yaml:14: loadBalancer.policy: must be a string, got a list`,
		`p.yaml:15: unknown key "bogus" (allowed: apiVersion, `,
		`p.yaml:16: unknown key "outlierDetection.bogus" (allowed: consecutiveFailures, ejectionTime, maxEjectionPercent)`,
	}
	if len(ps.Errs) != len(want) {
		t.Errorf("Parse found %d problems, want %d:\n%v", len(ps.Errs), len(want), err)
	}
	for i, w := range want {
		if i < len(ps.Errs) && !strings.HasPrefix(ps.Errs[i].Error(), w) {
			t.Errorf("problem %d: %q\nwant %q", i, ps.Errs[i], w)
		}
	}
	// What the decoder takes whole is taken: 1e3 requests, "on" for true.
	ps2, err := Parse([]byte("service: a\ncircuitBreaker: {minRequests: 1e3}\nconcurrency: {adaptive: on}\n"), "p.yaml")
	if err != nil || *ps2[0].CircuitBreaker.MinRequests != 1000 || !*ps2[0].Concurrency.Adaptive {
		t.Fatalf("Parse: %+v, %v; want minRequests 1000 and adaptive on", ps2, err)
	}
}

// Other documents (the config file, scenarios) have every bad duration
// reported too, not only the first.
func TestDecodeStrictReportsEveryDuration(t *testing.T) {
	var v struct {
		A Duration `yaml:"a"`
		B Duration `yaml:"b"`
		N int      `yaml:"n"`
	}
	err := DecodeStrict([]byte("a: soon\nb: later\nn: x\n"), "c.yaml", &v)
	for _, want := range []string{`c.yaml:1: invalid duration "soon"`, `c.yaml:2: invalid duration "later"`, "c.yaml:3: cannot unmarshal !!str `x` into int"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("DecodeStrict: %v\nwant it to contain %q", err, want)
		}
	}
}

// Every duration field has its range, which Validate checks and decoding
// names.
func TestEveryDurationHasARange(t *testing.T) {
	var paths []string
	var walk func(t reflect.Type, path string)
	walk = func(t reflect.Type, path string) {
		for t.Kind() == reflect.Pointer {
			t = t.Elem()
		}
		if t == durationType {
			paths = append(paths, path)
			return
		}
		if t.Kind() == reflect.Struct {
			for key, ft := range yamlFields(t) {
				walk(ft, join(path, key))
			}
		}
	}
	walk(reflect.TypeFor[Policy](), "")
	for _, p := range paths {
		if _, ok := durationRanges[p]; !ok {
			t.Errorf("duration field %s has no range in durationRanges", p)
		}
	}
	if len(paths) != len(durationRanges) {
		t.Errorf("%d duration fields, %d ranges; want one range per field", len(paths), len(durationRanges))
	}
}

// A policy file or Consul KV value over 1 MiB is refused before it is
// parsed, with the limit named: parsing YAML costs a hundred times its size
// in memory. Up to 1 MiB is a document like any other.
func TestDocumentSizeCap(t *testing.T) {
	doc := "service: a\ntimeout: 2s\n#"
	at := doc + strings.Repeat("x", MaxDocumentBytes-len(doc))
	if ps, err := Parse([]byte(at), "p.yaml"); err != nil || len(ps) != 1 {
		t.Fatalf("Parse of exactly %d bytes: %v; want the policy", MaxDocumentBytes, err)
	}
	if _, err := ParseDocument([]byte(at), "kv", "a"); err != nil {
		t.Fatalf("ParseDocument of exactly %d bytes: %v; want the policy", MaxDocumentBytes, err)
	}
	over := []byte(at + "x")
	want := fmt.Sprintf("%d bytes is too large (allowed: at most %d, 1 MiB)", MaxDocumentBytes+1, MaxDocumentBytes)
	if _, err := Parse(over, "p.yaml"); err == nil || err.Error() != "p.yaml: "+want {
		t.Errorf("Parse of %d bytes: %v; want %q", len(over), err, "p.yaml: "+want)
	}
	if _, err := ParseDocument(over, "kv", "a"); err == nil || err.Error() != "kv: "+want {
		t.Errorf("ParseDocument of %d bytes: %v; want %q", len(over), err, "kv: "+want)
	}

	// 4 MiB of list items cost the store next to nothing: the file's
	// policies stay, and the rejection is shown on them.
	s := NewStore(StoreOptions{})
	if err := s.SetFile("p.yaml", []byte("service: a\ntimeout: 2s\n")); err != nil {
		t.Fatal(err)
	}
	big := []byte("service: a\nretry: {on: [" + strings.Repeat("a,", 2<<20) + "a]}\n")
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	err := s.SetFile("p.yaml", big)
	runtime.ReadMemStats(&after)
	if err == nil || !strings.Contains(err.Error(), "too large (allowed: at most 1048576, 1 MiB)") {
		t.Fatalf("SetFile of %d bytes: %.300v; want it refused as too large", len(big), err)
	}
	if grew := after.TotalAlloc - before.TotalAlloc; grew > 1<<20 {
		t.Errorf("refusing a %d MiB file allocated %d KB, want at most 1 MB", len(big)>>20, grew>>10)
	}
	if st := statusOf(t, s, "a"); st.Effective.Timeout.D() != 2*time.Second || st.LastRejection == nil {
		t.Errorf("a after the refused file: %+v; want the last good timeout (2s) and the rejection shown", st)
	}
}
