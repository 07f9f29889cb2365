package policy

import (
	"bytes"
	"errors"
	"fmt"
	"io"

	"go.yaml.in/yaml/v3"
)

// ParseDocument decodes exactly one Policy document (YAML or JSON) strictly
// and validates it, as a Consul KV value is. name names the source in
// errors ("consul:sidecar/policies/users:3: retry.attempts: ..."). When
// service is not empty the document is that service's: one without a
// service field gets it, one naming another service is an error. data
// over MaxDocumentBytes is refused unread.
func ParseDocument(data []byte, name, service string) (Policy, error) {
	if err := tooLarge(data, name); err != nil {
		return Policy{}, err
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return Policy{}, fmt.Errorf("%s: empty value (want a Policy document, YAML or JSON)", name)
		}
		return Policy{}, decodeProblems(name, err)
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); err == nil {
		return Policy{}, fmt.Errorf("%s:%d: more than one document; a key holds one Policy", name, extra.Line)
	}
	if len(doc.Content) == 0 {
		return Policy{}, fmt.Errorf("%s: empty value (want a Policy document, YAML or JSON)", name)
	}
	root := doc.Content[0]
	where := fmt.Sprintf("%s:%d", name, root.Line)
	if service != "" && root.Kind == yaml.MappingNode {
		found := false
		for i := 0; i+1 < len(root.Content); i += 2 {
			if k, v := root.Content[i], root.Content[i+1]; k.Value == "service" {
				found = true
				if v.Value != service {
					return Policy{}, fmt.Errorf("%s:%d: service: %s does not match the key (allowed: %q or no service field)",
						name, v.Line, Quote(v.Value), service)
				}
			}
		}
		if !found {
			root.Content = append(root.Content,
				&yaml.Node{Kind: yaml.ScalarNode, Tag: "!!str", Value: "service"},
				&yaml.Node{Kind: yaml.ScalarNode, Tag: "!!str", Value: service})
		}
	}
	return DecodePolicyNode(&doc, name, where)
}
