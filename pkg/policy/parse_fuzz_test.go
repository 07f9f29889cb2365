package policy

import (
	"encoding/json"
	"reflect"
	"testing"

	"go.yaml.in/yaml/v3"
)

// FuzzParse holds policy decoding to its promises, for any bytes a policy
// file or a Consul KV value may hold:
//   - Parse and ParseDocument never hand out a policy that Validate
//     rejects, nor one without a service, nor two for one service;
//   - what they accept means one thing: written back as YAML or JSON and
//     parsed again, it is the same policy (so no value, NaN say, slips
//     through that compares unlike itself or changes in a round trip).
func FuzzParse(f *testing.F) {
	for _, s := range []string{
		designExample,
		"service: a\ntimeout: 1s\n---\nservice: '*'\nretry: {attempts: 2}\n",
		`{"service": "b", "retry": {"budget": {"ratio": 0.5}}, "circuitBreaker": {"failureRatio": 1}}`,
		"service: a\nretry: {attempts: 0}\n",
		"service: a\nretry:\n  atempts: 3\n",
		"service: a\ntimeout: fast\n",
		"service: a\n---\nservice: a\n",
		"service: a\nretry: &r {attempts: 2}\ncircuitBreaker: *r\n",
		"service: a\n<<: {timeout: 1s}\n",
		"service: a\nretry: {on: [503, reset], methods: [GET]}\n",
		"service: a\noutlierDetection: {maxEjectionPercent: 100, ejectionTime: 100ms}\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		ps, _ := Parse(data, "f.yaml")
		seen := map[string]bool{}
		for _, p := range ps {
			if seen[p.Service] {
				t.Fatalf("Parse gave two policies for service %q", p.Service)
			}
			seen[p.Service] = true
			checkAccepted(t, "Parse", p)
		}
		if p, err := ParseDocument(data, "kv", "svc"); err == nil {
			if p.Service != "svc" {
				t.Fatalf("ParseDocument for svc gave service %q", p.Service)
			}
			checkAccepted(t, "ParseDocument", p)
		}
	})
}

func checkAccepted(t *testing.T, via string, p Policy) {
	t.Helper()
	if p.Service == "" {
		t.Fatalf("%s accepted a policy without a service: %+v", via, p)
	}
	if err := p.Validate(); err != nil {
		t.Fatalf("%s accepted a policy Validate rejects: %v", via, err)
	}
	y, err := yaml.Marshal(p)
	if err != nil {
		t.Fatalf("%s accepted a policy that does not marshal to YAML: %v", via, err)
	}
	j, err := json.Marshal(p)
	if err != nil {
		t.Fatalf("%s accepted a policy that does not marshal to JSON: %v", via, err)
	}
	for _, doc := range [][]byte{y, j} {
		again, err := Parse(doc, "again")
		if err != nil || len(again) != 1 || !reflect.DeepEqual(again[0], p) {
			t.Fatalf("%s accepted %+v; written as\n%s\nit parses as %+v, %v", via, p, doc, again, err)
		}
	}
}
