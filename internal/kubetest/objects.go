package kubetest

import (
	"bytes"
	"encoding/json"
	"fmt"

	sigsyaml "sigs.k8s.io/yaml"
)

// Objects splits a multi-document YAML stream (documents separated by
// "---" lines) into JSON objects, in order, with the items of a v1 List
// flattened. Empty and comment-only documents are dropped. Duplicate keys
// are errors.
func Objects(data []byte) ([][]byte, error) {
	var out [][]byte
	for i, doc := range splitYAML(data) {
		js, err := sigsyaml.YAMLToJSONStrict(doc)
		if err != nil {
			return nil, fmt.Errorf("document %d: %w", i+1, err)
		}
		if bytes.Equal(bytes.TrimSpace(js), []byte("null")) {
			continue
		}
		var list struct {
			APIVersion string            `json:"apiVersion"`
			Kind       string            `json:"kind"`
			Items      []json.RawMessage `json:"items"`
		}
		if err := json.Unmarshal(js, &list); err != nil {
			return nil, fmt.Errorf("document %d: not an object: %w", i+1, err)
		}
		if list.APIVersion == "v1" && list.Kind == "List" {
			for _, it := range list.Items {
				out = append(out, []byte(it))
			}
			continue
		}
		out = append(out, js)
	}
	return out, nil
}

// splitYAML cuts a stream at lines that are "---" (optionally followed by
// a space and more).
func splitYAML(data []byte) [][]byte {
	var docs [][]byte
	var cur bytes.Buffer
	for _, line := range bytes.SplitAfter(data, []byte("\n")) {
		l := bytes.TrimRight(line, " \t\r\n")
		if bytes.Equal(l, []byte("---")) || bytes.HasPrefix(l, []byte("--- ")) {
			docs = append(docs, bytes.Clone(cur.Bytes()))
			cur.Reset()
			continue
		}
		cur.Write(line)
	}
	return append(docs, cur.Bytes())
}
