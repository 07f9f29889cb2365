package policy

import (
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func mustParse(t *testing.T, doc string) []Policy {
	t.Helper()
	ps, err := Parse([]byte(doc), "inline")
	if err != nil {
		t.Fatal(err)
	}
	return ps
}

func kv(index uint64, service, value string) KVDocument {
	return KVDocument{Key: KVKey(service), Value: []byte(value), ModifyIndex: index}
}

func statusOf(t *testing.T, s *Store, service string) Status {
	t.Helper()
	for _, st := range s.Statuses() {
		if st.Service == service {
			return st
		}
	}
	t.Fatalf("Statuses() has no %q: %+v", service, s.Statuses())
	return Status{}
}

// Per service, Consul KV beats the file, which beats inline; "*" is chosen
// the same way and merged under every service, over Defaults. Documents of
// different sources are not merged field by field.
func TestStorePrecedence(t *testing.T) {
	s := NewStore(StoreOptions{})
	if err := s.SetInline(mustParse(t, `
service: "*"
timeout: 10s
retry: {attempts: 2}
---
service: a
timeout: 1s
concurrency: {maxInFlight: 7}
---
service: b
timeout: 2s
`)); err != nil {
		t.Fatal(err)
	}
	fileDoc := "service: a\ntimeout: 3s\n---\nservice: c\ntimeout: 4s\n"
	if err := s.SetFile("/etc/p.yaml", []byte(fileDoc)); err != nil {
		t.Fatal(err)
	}
	if err := s.SetConsul(map[string]KVDocument{
		"c": kv(42, "c", `{"timeout": "5s"}`),
		"*": kv(43, "*", "retry: {attempts: 4}\n"),
	}); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		service, source, version string
		timeout                  time.Duration
		attempts, maxInFlight    int
	}{
		// "*" from Consul replaces inline's "*" whole: its timeout is gone.
		{"*", "consul:sidecar/policies/*", "43", 15 * time.Second, 4, 1024},
		// a: the file's document replaces inline's (no maxInFlight 7).
		{"a", "file:/etc/p.yaml", ContentVersion([]byte(fileDoc)), 3 * time.Second, 4, 1024},
		{"b", "inline", "", 2 * time.Second, 4, 1024},
		{"c", "consul:sidecar/policies/c", "42", 5 * time.Second, 4, 1024},
		{"d", "default", "", 15 * time.Second, 4, 1024},
	}
	for _, tc := range cases {
		p := s.For(tc.service)
		if p.Service != tc.service || p.Timeout.D() != tc.timeout || *p.Retry.Attempts != tc.attempts || *p.Concurrency.MaxInFlight != tc.maxInFlight {
			t.Errorf("For(%q) = service %q timeout %v attempts %d maxInFlight %d; want %q %v %d %d", tc.service,
				p.Service, p.Timeout, *p.Retry.Attempts, *p.Concurrency.MaxInFlight, tc.service, tc.timeout, tc.attempts, tc.maxInFlight)
		}
		st := statusOf(t, s, tc.service)
		if st.Source != tc.source || st.Version != tc.version || st.Effective.Timeout.D() != tc.timeout || st.LastRejection != nil {
			t.Errorf("status of %q: source %q version %q timeout %v rejection %v; want %q %q %v none",
				tc.service, st.Source, st.Version, st.Effective.Timeout, st.LastRejection, tc.source, tc.version, tc.timeout)
		}
	}
	var names []string
	for _, st := range s.Statuses() {
		names = append(names, st.Service)
	}
	if got := strings.Join(names, ","); got != "*,a,b,c,d" {
		t.Fatalf("Statuses() lists %s; want *,a,b,c,d (\"*\", every document, every service asked for)", got)
	}
	// Deleting the Consul keys falls back to the file and inline documents.
	if err := s.SetConsul(nil); err != nil {
		t.Fatal(err)
	}
	if p := s.For("c"); p.Timeout.D() != 4*time.Second || *p.Retry.Attempts != 2 {
		t.Fatalf("after the KV keys were deleted, c has timeout %v attempts %d; want the file's 4s and inline *'s 2", p.Timeout, *p.Retry.Attempts)
	}
	want := []SourceStats{{SourceInline, 1, 0}, {SourceFile, 1, 0}, {SourceConsul, 4, 0}}
	if got := s.Stats(); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("Stats() = %v, want %v", got, want)
	}
}

// A bad policy file is rejected whole, with its field path; the file's
// previous documents stay in force. A later good file clears the rejection.
func TestStoreFileRejected(t *testing.T) {
	now := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	s := NewStore(StoreOptions{Now: func() time.Time { return now }})
	good := "service: a\ntimeout: 1s\n---\nservice: b\ntimeout: 2s\n"
	if err := s.SetFile("p.yaml", []byte(good)); err != nil {
		t.Fatal(err)
	}
	gen := s.Generation()
	old := s.For("a")
	bad := "service: a\ntimeout: 9s\n---\nservice: b\nretry: {attempts: 0}\n---\nservice: c\ntimeout: 3s\n"
	err := s.SetFile("p.yaml", []byte(bad))
	if err == nil || !strings.Contains(err.Error(), "p.yaml:4: document 2: retry.attempts: 0 is not allowed (allowed: 1 to 10)") {
		t.Fatalf("SetFile(bad) = %v, want the field path and range of retry.attempts", err)
	}
	if s.Generation() != gen || s.For("a") != old || s.For("a").Timeout.D() != time.Second || s.For("c").Timeout.D() != 15*time.Second {
		t.Fatalf("a rejected file changed the policies in force (generation %d -> %d, a timeout %v, c timeout %v)",
			gen, s.Generation(), s.For("a").Timeout, s.For("c").Timeout)
	}
	for _, service := range []string{"a", "b", "c"} {
		r := statusOf(t, s, service).LastRejection
		if r == nil || r.Source != "file:p.yaml" || r.Version != ContentVersion([]byte(bad)) || !r.At.Equal(now) ||
			!strings.Contains(r.Error, "retry.attempts: 0 is not allowed") {
			t.Fatalf("rejection shown on %s: %+v; want file:p.yaml, the bad content's version, the time and the error", service, r)
		}
	}
	if st := statusOf(t, s, "a"); st.Source != "file:p.yaml" || st.Version != ContentVersion([]byte(good)) {
		t.Fatalf("a: source %q version %q; want the good file's", st.Source, st.Version)
	}
	// The same bad content again is not judged (or counted) twice.
	_ = s.SetFile("p.yaml", []byte(bad))
	if got := s.Stats()[1]; got.Reloads != 1 || got.Rejections != 1 {
		t.Fatalf("file stats %+v, want 1 reload and 1 rejection", got)
	}
	// Unparseable YAML names no service: the rejection goes on the file's
	// current services.
	if err := s.SetFile("p.yaml", []byte("service: [")); err == nil {
		t.Fatal("SetFile accepted broken YAML")
	}
	if r := statusOf(t, s, "b").LastRejection; r == nil || !strings.Contains(r.Error, "p.yaml") || r.Version != ContentVersion([]byte("service: [")) {
		t.Fatalf("rejection of broken YAML on b: %+v", r)
	}
	fixed := "service: a\ntimeout: 2s\n"
	if err := s.SetFile("p.yaml", []byte(fixed)); err != nil {
		t.Fatal(err)
	}
	if s.For("a").Timeout.D() != 2*time.Second || s.For("b").Timeout.D() != 15*time.Second {
		t.Fatalf("after a good file: a %v, b %v; want 2s and the default", s.For("a").Timeout, s.For("b").Timeout)
	}
	for _, st := range s.Statuses() {
		if st.LastRejection != nil {
			t.Fatalf("%s still shows a rejection after a good file: %+v", st.Service, st.LastRejection)
		}
	}
	if old.Timeout.D() != time.Second {
		t.Fatalf("a policy handed out before the reload changed: timeout %v, want 1s", old.Timeout)
	}
}

// Consul keys are judged one by one: a bad key keeps its last good
// document and does not hold up the others. A document's service must
// match its key; without one it takes the key's.
func TestStoreConsulKeys(t *testing.T) {
	s := NewStore(StoreOptions{})
	if err := s.SetConsul(map[string]KVDocument{
		"a": kv(10, "a", "timeout: 1s\n"),
		"b": kv(11, "b", `{"service": "b", "timeout": "2s"}`),
	}); err != nil {
		t.Fatal(err)
	}
	err := s.SetConsul(map[string]KVDocument{
		"a": kv(12, "a", "timeout: 1s\nretry: {attempts: 11}\n"),
		"b": kv(13, "b", `{"timeout": "3s"}`),
		"c": kv(14, "c", "service: d\ntimeout: 4s\n"),
		"e": kv(15, "e", "timeout: 5s\nbogus: 1\n"),
		"f": kv(16, "f", ""),
	})
	for _, want := range []string{
		"consul:sidecar/policies/a:1: retry.attempts: 11 is not allowed (allowed: 1 to 10)",
		`consul:sidecar/policies/c:1: service: "d" does not match the key (allowed: "c" or no service field)`,
		`consul:sidecar/policies/e:2: unknown key "bogus"`,
		"consul:sidecar/policies/f: empty value",
	} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("SetConsul error %v; want it to contain %q", err, want)
		}
	}
	if a, b := s.For("a"), s.For("b"); a.Timeout.D() != time.Second || *a.Retry.Attempts != 3 || b.Timeout.D() != 3*time.Second {
		t.Fatalf("a: timeout %v attempts %d, b: timeout %v; want a's last good (1s, 3) and b's update (3s)", a.Timeout, *a.Retry.Attempts, b.Timeout)
	}
	if st := statusOf(t, s, "a"); st.Version != "10" || st.LastRejection == nil || st.LastRejection.Version != "12" {
		t.Fatalf("a: version %q rejection %+v; want version 10 in force and 12 rejected", st.Version, st.LastRejection)
	}
	if st := statusOf(t, s, "c"); st.Source != "default" || st.LastRejection == nil || st.LastRejection.Source != "consul:sidecar/policies/c" {
		t.Fatalf("c: %+v; want the default in force and the rejection shown", st)
	}
	if got := s.Stats()[2]; got.Reloads != 3 || got.Rejections != 4 {
		t.Fatalf("consul stats %+v, want 3 reloads (a, b, b) and 4 rejections", got)
	}
	// Unchanged keys are skipped: the rejections are not counted again.
	gen := s.Generation()
	_ = s.SetConsul(map[string]KVDocument{
		"a": kv(12, "a", "timeout: 1s\nretry: {attempts: 11}\n"),
		"b": kv(13, "b", `{"timeout": "3s"}`),
		"c": kv(14, "c", "service: d\ntimeout: 4s\n"),
		"e": kv(15, "e", "timeout: 5s\nbogus: 1\n"),
		"f": kv(17, "f", "timeout: 6s"),
	})
	if got := s.Stats()[2]; got.Reloads != 4 || got.Rejections != 4 || s.Generation() != gen+1 {
		t.Fatalf("consul stats %+v generation +%d, want 4 reloads, 4 rejections, +1", got, s.Generation()-gen)
	}
	if st := statusOf(t, s, "f"); st.LastRejection != nil || st.Version != "17" {
		t.Fatalf("f after a good value: %+v, want version 17 and no rejection", st)
	}
}

// For is safe under concurrent updates, and allocation-free for a service
// asked for before.
func TestStoreConcurrentForAndUpdates(t *testing.T) {
	s := NewStore(StoreOptions{})
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			service := fmt.Sprintf("svc-%d", w)
			for {
				select {
				case <-stop:
					return
				default:
				}
				if p := s.For(service); p.Service != service || p.Timeout == nil {
					t.Errorf("For(%s) = %+v", service, p)
					return
				}
				_ = s.Statuses()
			}
		}()
	}
	for i := range 200 {
		_ = s.SetConsul(map[string]KVDocument{"svc-1": kv(uint64(i+1), "svc-1", fmt.Sprintf("timeout: %dms\n", 100+i))})
		_ = s.SetFile("p.yaml", []byte(fmt.Sprintf("service: svc-2\ntimeout: %dms\n", 100+i)))
	}
	close(stop)
	wg.Wait()
	if p := s.For("svc-1"); p.Timeout.D() != 299*time.Millisecond {
		t.Fatalf("svc-1 timeout %v after the last update, want 299ms", p.Timeout)
	}
	if n := testing.AllocsPerRun(1000, func() { _ = s.For("svc-3") }); n != 0 {
		t.Fatalf("For allocates %v times per call, want 0", n)
	}
	s.For("new-service")
	if n := testing.AllocsPerRun(1000, func() { _ = s.For("new-service") }); n != 0 {
		t.Fatalf("For of a service first asked for after the last update allocates %v times per call, want 0", n)
	}
}

func BenchmarkStoreFor(b *testing.B) {
	s := NewStore(StoreOptions{})
	_ = s.SetInline([]Policy{{Service: "svc", Timeout: ptr(Duration(time.Second))}})
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			_ = s.For("svc")
		}
	})
}

func TestParseDocument(t *testing.T) {
	p, err := ParseDocument([]byte("timeout: 2s\n"), "kv", "users")
	if err != nil || p.Service != "users" || p.Timeout.D() != 2*time.Second {
		t.Fatalf("ParseDocument = %+v, %v; want service users with timeout 2s", p, err)
	}
	for doc, want := range map[string]string{
		"timeout: 2s\n---\ntimeout: 3s\n": "kv:2: more than one document",
		"[1, 2]":                          "kv:1: the document must be a mapping, got a list",
		"timeout: -1s":                    `kv:1: timeout: negative duration "-1s" (allowed: 1ms to 1h0m0s)`,
		"   \n":                           "kv: empty value",
	} {
		if _, err := ParseDocument([]byte(doc), "kv", "users"); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("ParseDocument(%q) error %v, want %q", doc, err, want)
		}
	}
}

// An update is parsed without holding up the store's readers or the other
// sources: while one is being parsed, Statuses, Status, Stats, For and an
// update of another source answer. Updates of one source are applied in
// the order they began.
func TestStoreParsesOutsideItsLock(t *testing.T) {
	t.Cleanup(func() { testHookParse = nil })
	for _, slow := range []string{SourceFile, SourceConsul} {
		t.Run(slow, func(t *testing.T) {
			s := NewStore(StoreOptions{})
			var held atomic.Bool
			parsing, release := make(chan struct{}), make(chan struct{})
			testHookParse = func() {
				if held.CompareAndSwap(false, true) {
					close(parsing)
					<-release
				}
			}
			update := func(source string, index uint64, timeout string) error {
				if source == SourceFile {
					return s.SetFile("p.yaml", []byte("service: a\ntimeout: "+timeout+"\n"))
				}
				return s.SetConsul(map[string]KVDocument{"b": kv(index, "b", "timeout: "+timeout+"\n")})
			}
			other, service := SourceConsul, "a"
			if slow == SourceConsul {
				other, service = SourceFile, "b"
			}

			first, second := make(chan error, 1), make(chan error, 1)
			go func() { first <- update(slow, 1, "2s") }()
			<-parsing
			go func() { second <- update(slow, 2, "30s") }()
			answered := make(chan struct{})
			go func() {
				defer close(answered)
				_ = s.Statuses()
				_, _ = s.Status(service)
				_ = s.Stats()
				_ = s.For(service)
				_ = update(other, 3, "7s")
			}()
			timer := time.NewTimer(10 * time.Second)
			select {
			case <-answered:
			case <-timer.C:
				t.Errorf("Statuses, Status, Stats, For or a %s update still waiting after 10s for a %s update being parsed", other, slow)
			}
			timer.Stop()
			close(release)
			<-answered
			if err := <-first; err != nil {
				t.Fatal(err)
			}
			if err := <-second; err != nil {
				t.Fatal(err)
			}
			if got := s.For(service).Timeout.D(); got != 30*time.Second {
				t.Errorf("%s's timeout after two %s updates: %v, want the later one's 30s", service, slow, got)
			}
		})
	}
}
