package policy

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"reflect"
	"regexp"
	"sort"
	"strings"

	"go.yaml.in/yaml/v3"
)

// DecodeStrict decodes one YAML (or JSON, a subset of YAML) document into v,
// rejecting keys that v's type does not have. Every error names the file and
// line and, for unknown keys, the full key path and the keys allowed there:
//
//	sidecar.yaml:4: unknown key "listeners.outbund" (allowed: admin, health, inbound, metrics, outbound)
//
// file is used only in messages. An empty document leaves v unchanged.
func DecodeStrict(data []byte, file string, v any) error {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return nil
		}
		return decodeProblems(file, err)
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); err == nil {
		return fmt.Errorf("%s:%d: more than one YAML document; put one document per file", file, extra.Line)
	}
	return DecodeNode(&doc, file, v)
}

// DecodeNode is DecodeStrict for an already parsed node.
func DecodeNode(n *yaml.Node, file string, v any) error {
	if err := checkKeys(n, reflect.TypeOf(v), "", file); err != nil {
		return err
	}
	if err := n.Decode(v); err != nil {
		return decodeProblems(file, err)
	}
	return nil
}

var lineRE = regexp.MustCompile(`(?m)^(?:yaml: )?(?:unmarshal errors:\n)?\s*line (\d+): `)

// prefixLines turns yaml's "line N: msg" into "file:N: msg", each line at
// most a few hundred bytes (the decoder quotes keys in full).
func prefixLines(file string, err error) error {
	msg := strings.TrimPrefix(err.Error(), "yaml: unmarshal errors:\n")
	lines := strings.Split(msg, "\n")
	for i, l := range lines {
		lines[i] = clipLine(l)
	}
	msg = lineRE.ReplaceAllString(strings.Join(lines, "\n"), file+":$1: ")
	if !strings.HasPrefix(msg, file+":") {
		msg = file + ": " + strings.TrimPrefix(msg, "yaml: ")
	}
	return errors.New(msg)
}

var unmarshalerType = reflect.TypeOf((*yaml.Unmarshaler)(nil)).Elem()

// checkKeys walks n alongside t and reports the first mapping key that has no
// field in t.
func checkKeys(n *yaml.Node, t reflect.Type, path, file string) error {
	for t.Kind() == reflect.Pointer {
		if t.Implements(unmarshalerType) {
			return nil
		}
		t = t.Elem()
	}
	if reflect.PointerTo(t).Implements(unmarshalerType) || t == reflect.TypeOf(yaml.Node{}) {
		return nil
	}
	switch n.Kind {
	case yaml.DocumentNode:
		for _, c := range n.Content {
			if err := checkKeys(c, t, path, file); err != nil {
				return err
			}
		}
	case yaml.AliasNode:
		return checkKeys(n.Alias, t, path, file)
	case yaml.MappingNode:
		switch t.Kind() {
		case reflect.Map:
			for i := 0; i+1 < len(n.Content); i += 2 {
				if err := checkKeys(n.Content[i+1], t.Elem(), join(path, n.Content[i].Value), file); err != nil {
					return err
				}
			}
		case reflect.Struct:
			fields := yamlFields(t)
			for i := 0; i+1 < len(n.Content); i += 2 {
				k := n.Content[i]
				ft, ok := fields[k.Value]
				if !ok {
					names := make([]string, 0, len(fields))
					for name := range fields {
						names = append(names, name)
					}
					sort.Strings(names)
					return fmt.Errorf("%s:%d: unknown key %s (allowed: %s)", file, k.Line, Quote(join(path, k.Value)), strings.Join(names, ", "))
				}
				if err := checkKeys(n.Content[i+1], ft, join(path, k.Value), file); err != nil {
					return err
				}
			}
		}
	case yaml.SequenceNode:
		if t.Kind() == reflect.Slice || t.Kind() == reflect.Array {
			for i, c := range n.Content {
				if err := checkKeys(c, t.Elem(), fmt.Sprintf("%s[%d]", path, i), file); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// yamlFields maps the YAML keys of struct t (inline structs flattened) to
// their types.
func yamlFields(t reflect.Type) map[string]reflect.Type {
	out := make(map[string]reflect.Type)
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		tag := f.Tag.Get("yaml")
		name, opts, _ := strings.Cut(tag, ",")
		if name == "-" {
			continue
		}
		if strings.Contains(opts, "inline") {
			for k, v := range yamlFields(f.Type) {
				out[k] = v
			}
			continue
		}
		if name == "" {
			name = strings.ToLower(f.Name)
		}
		out[name] = f.Type
	}
	return out
}

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}
