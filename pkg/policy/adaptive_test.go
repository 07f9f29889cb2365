package policy

import (
	"strings"
	"testing"
	"time"
)

// concurrency.adaptive is off by default, set like any field, merged over
// the "*" policy's, and decoded strictly: only true or false.
func TestConcurrencyAdaptive(t *testing.T) {
	if Defaults().Concurrency.IsAdaptive() {
		t.Fatal("concurrency.adaptive is on by default; want off")
	}
	ps, err := Parse([]byte("service: '*'\nconcurrency: {adaptive: true}\n---\nservice: a\nconcurrency: {maxInFlight: 2}\n---\nservice: b\nconcurrency: {adaptive: false}\n"), "p.yaml")
	if err != nil {
		t.Fatal(err)
	}
	by := map[string]Policy{}
	for _, p := range ps {
		by[p.Service] = p
	}
	a, b, c := Effective("a", by), Effective("b", by), Effective("c", by)
	if !a.Concurrency.IsAdaptive() || *a.Concurrency.MaxInFlight != 2 || a.Concurrency.Floor() != 2 {
		t.Errorf("a: adaptive %v, maxInFlight %d, floor %d; want adaptive from *, 2 and 2 (the floor no higher than maxInFlight)",
			a.Concurrency.IsAdaptive(), *a.Concurrency.MaxInFlight, a.Concurrency.Floor())
	}
	if b.Concurrency.IsAdaptive() {
		t.Error("b: adaptive, want off (its own false over *'s true)")
	}
	if !c.Concurrency.IsAdaptive() || c.Concurrency.Floor() != AdaptiveFloor {
		t.Errorf("c: adaptive %v, floor %d; want adaptive from * and floor %d", c.Concurrency.IsAdaptive(), c.Concurrency.Floor(), AdaptiveFloor)
	}

	for doc, want := range map[string]string{
		"service: a\nconcurrency: {adaptive: 1}\n":    "p.yaml:2: concurrency.adaptive: must be true or false, got number 1",
		"service: a\nconcurrency: {adaptiv: true}\n":  `p.yaml:2: unknown key "concurrency.adaptiv" (allowed: adaptive, maxInFlight, maxQueued, queueTimeout)`,
		"service: a\nconcurrency: {adaptive: [on]}\n": "p.yaml:2: concurrency.adaptive: must be true or false, got a list",
	} {
		_, err := Parse([]byte(doc), "p.yaml")
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Parse(%q): %v; want an error with %q", doc, err, want)
		}
	}
}

// policy explain says how an adaptive limit behaves, with the runtime's
// constants.
func TestExplainAdaptive(t *testing.T) {
	e := Explain("users", map[string]Policy{"users": {Service: "users", Concurrency: &Concurrency{MaxInFlight: new(200), Adaptive: new(true)}}})
	w := strings.Join(e.Concurrency, " ")
	for _, want := range []string{"is adaptive", "between 3 and 200", "minRTT+25% (+1ms at least)", "every 100ms", "503 overloaded at once, with Retry-After: 1",
		"measured again, at the floor, when no window confirmed it for 30s", "stayed at the floor for 1s"} {
		if !strings.Contains(w, want) {
			t.Errorf("explanation lacks %q:\n%s", want, w)
		}
	}
	for minRTT, want := range map[time.Duration]time.Duration{100 * time.Microsecond: 1100 * time.Microsecond, 20 * time.Millisecond: 25 * time.Millisecond} {
		if got := AdaptiveTarget(minRTT); got != want {
			t.Errorf("AdaptiveTarget(%v) = %v, want %v", minRTT, got, want)
		}
	}
	if f := fieldOf(e, "concurrency.adaptive"); f.Value != "true" || f.Origin != "users" {
		t.Errorf("field concurrency.adaptive: %+v, want true from users", f)
	}
	if w := warningOf(e, "adaptive-limit-has-no-line"); w != nil {
		t.Errorf("warning %+v with the default line, want none", *w)
	}
	e = Explain("users", map[string]Policy{"*": {Service: "*", Concurrency: &Concurrency{MaxQueued: new(10)}},
		"users": {Service: "users", Concurrency: &Concurrency{Adaptive: new(true)}}})
	if w := warningOf(e, "adaptive-limit-has-no-line"); w == nil || !strings.Contains(w.Message, "so concurrency.maxQueued has no effect") {
		t.Errorf("warnings %+v, want adaptive-limit-has-no-line for concurrency.maxQueued", e.Warnings)
	}
	e = Explain("users", nil)
	if f := fieldOf(e, "concurrency.adaptive"); f.Value != "false" || f.Origin != FromDefault {
		t.Errorf("field concurrency.adaptive: %+v, want false from the defaults", f)
	}
}

func fieldOf(e Explanation, path string) Field {
	for _, f := range e.Fields {
		if f.Path == path {
			return f
		}
	}
	return Field{}
}

func warningOf(e Explanation, code string) *Warning {
	for i := range e.Warnings {
		if e.Warnings[i].Code == code {
			return &e.Warnings[i]
		}
	}
	return nil
}
