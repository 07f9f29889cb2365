package policy

import (
	"errors"
	"runtime"
	"strings"
	"testing"
)

func TestQuote(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"", `""`},
		{"302", `"302"`},
		{strings.Repeat("a", MaxQuoted), `"` + strings.Repeat("a", MaxQuoted) + `"`},
		{strings.Repeat("a", MaxQuoted+1), `"` + strings.Repeat("a", MaxQuoted) + `"… (201 bytes)`},
		// Cut at a character boundary: é is 2 bytes, the 200th byte is the
		// first half of the 100th é.
		{"x" + strings.Repeat("é", 150), `"x` + strings.Repeat("é", 99) + `"… (301 bytes)`},
	} {
		if got := Quote(tc.in); got != tc.want {
			t.Errorf("Quote(%d bytes) = %s, want %s", len(tc.in), got, tc.want)
		}
	}
}

// A value of 100 KB in any place of a document is quoted in a few hundred
// bytes by every error that names it: field errors, decoding errors,
// unknown keys, the store's rejection (shown by the admin API and logged).
func TestLongValuesAreQuotedShort(t *testing.T) {
	huge := strings.Repeat("x", 100000)
	for name, doc := range map[string]string{
		"retry.on":          "service: a\nretry: {on: [" + huge + "]}\n",
		"retry.methods":     "service: a\nretry: {methods: [" + huge + "]}\n",
		"service":           "service: " + huge + "\n",
		"apiVersion":        "service: a\napiVersion: " + huge + "\n",
		"kind":              "service: a\nkind: " + huge + "\n",
		"duration":          "service: a\ntimeout: " + huge + "\n",
		"unknown key":       "service: a\n? " + huge + "\n: 1\n",
		"unknown nested":    "service: a\nretry:\n  ? " + huge + "\n  : 1\n",
		"duplicate key":     "service: a\n? " + huge + "\n: 1\n? " + huge + "\n: 2\n",
		"type":              "service: a\nretry: {attempts: " + huge + "}\n",
		"duplicate service": "service: " + strings.Repeat("b", 60) + "\n---\nservice: " + strings.Repeat("b", 60) + "\n",
	} {
		_, err := Parse([]byte(doc), "p.yaml")
		if err == nil {
			t.Errorf("%s: Parse accepted the document", name)
			continue
		}
		if n := len(err.Error()); n > 1000 {
			t.Errorf("%s: Parse's error is %d bytes, want at most 1000: %.300s", name, n, err.Error())
		}
		store := NewStore(StoreOptions{})
		_ = store.SetConsul(map[string]KVDocument{"a": {Key: KVKey("a"), Value: []byte(doc), ModifyIndex: 3}})
		st, _ := store.Status("a")
		if st.LastRejection == nil || len(st.LastRejection.Error) > 1000 {
			t.Errorf("%s: the store's rejection is %+v, want one of at most 1000 bytes", name, st.LastRejection)
		}
	}
	if _, err := Parse([]byte("service: a\nretry: {on: ["+huge+"]}\n"), "p.yaml"); !strings.Contains(err.Error(), "… (100000 bytes)") {
		t.Errorf("the error does not give the value's length: %.500s", err)
	}
}

// An input with many problems lists the first MaxProblems and counts the
// rest, and validating it does not cost memory for each.
func TestProblemsAreBounded(t *testing.T) {
	// 300,000 invalid retry conditions: 600 KB of YAML.
	on := make(List, 300000)
	for i := range on {
		on[i] = "a"
	}
	p := Policy{Service: "a", Retry: &Retry{On: on}}
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	err := p.Validate()
	runtime.ReadMemStats(&after)
	var ps *Problems
	if !errors.As(err, &ps) {
		t.Fatalf("Validate: %T, want a *Problems", err)
	}
	if len(ps.Errs) != MaxProblems || ps.Len() != 300000 {
		t.Fatalf("Validate listed %d of %d problems, want %d of 300000", len(ps.Errs), ps.Len(), MaxProblems)
	}
	// A FieldError and its strings per problem came to 60 MB.
	if grew := after.TotalAlloc - before.TotalAlloc; grew > 1<<20 {
		t.Errorf("Validate allocated %d KB for 300,000 problems, want at most 1 MB", grew>>10)
	}

	doc := "service: a\nretry: {on: [" + strings.Repeat("a,", 30000) + "a]}\n"
	_, err = Parse([]byte(doc), "p.yaml")
	if !errors.As(err, &ps) || len(ps.Errs) != MaxProblems || ps.Len() != 30001 {
		t.Fatalf("Parse: %T, %d listed of %d; want a *Problems listing %d of 30001", err, len(ps.Errs), ps.Len(), MaxProblems)
	}
	msg := err.Error()
	if n := strings.Count(msg, "\n") + 1; n != MaxProblems+1 {
		t.Errorf("the error has %d lines, want %d problems and a count", n, MaxProblems+1)
	}
	if !strings.HasSuffix(msg, "… and 29901 more problems (only the first 100 are listed)") {
		t.Errorf("the error ends %q", msg[max(0, len(msg)-200):])
	}
	var fe *FieldError
	if !errors.As(err, &fe) || fe.Path != "retry.on[0]" {
		t.Errorf("errors.As found %+v, want the FieldError of retry.on[0]", fe)
	}

	// Many documents with a problem each: counted across documents.
	many := strings.Repeat("service: a\ntimeout: 0s\n---\n", 999) + "service: a\ntimeout: 0s\n"
	_, err = Parse([]byte(many), "p.yaml")
	if !errors.As(err, &ps) || len(ps.Errs) != MaxProblems || ps.Len() != 1000 {
		t.Fatalf("1000 documents: %d listed of %d, want %d of 1000", len(ps.Errs), ps.Len(), MaxProblems)
	}

	// Decoding errors too: 20,000 values of the wrong type.
	types := "service: a\nretry: {on: [" + strings.Repeat("[1],", 20000) + "[1]]}\n"
	_, err = Parse([]byte(types), "p.yaml")
	if !errors.As(err, &ps) || len(ps.Errs) != MaxProblems || ps.Len() != 20001 {
		t.Fatalf("20,001 decoding errors: %T, %d listed of %d", err, len(ps.Errs), ps.Len())
	}
	if got, want := ps.Errs[0].Error(), "p.yaml:2: retry.on[0]: must be a string, got a list"; got != want {
		t.Errorf("first decoding problem: %q, want %q, with its file, line and key path", got, want)
	}
}
