package inject

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"
)

// Operation is one RFC 6902 JSON Patch operation: "add", "remove" or
// "replace". Value is the JSON value of add and replace, held as a YAML node
// so that it keeps its key order (the Kubernetes field order) when the
// operation is applied to a YAML document.
type Operation struct {
	Op    string
	Path  string // a JSON Pointer (RFC 6901)
	Value *yaml.Node
}

// MarshalJSON encodes the operation as RFC 6902 JSON.
func (o Operation) MarshalJSON() ([]byte, error) {
	var buf bytes.Buffer
	buf.WriteString(`{"op":`)
	writeJSONString(&buf, o.Op)
	buf.WriteString(`,"path":`)
	writeJSONString(&buf, o.Path)
	if o.Op != "remove" {
		buf.WriteString(`,"value":`)
		if err := writeNodeJSON(&buf, o.Value); err != nil {
			return nil, fmt.Errorf("%s %s: %w", o.Op, o.Path, err)
		}
	}
	buf.WriteByte('}')
	return buf.Bytes(), nil
}

// PatchJSON encodes ops as a JSON Patch document (an array; "[]" when empty).
func PatchJSON(ops []Operation) ([]byte, error) {
	if ops == nil {
		ops = []Operation{}
	}
	return json.Marshal(ops)
}

func writeJSONString(buf *bytes.Buffer, s string) {
	enc := json.NewEncoder(buf)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(s) // a string always encodes
	buf.Truncate(buf.Len() - 1)
}

// writeNodeJSON writes a node parsed from JSON (see jsonNode) back as JSON,
// in its key order.
func writeNodeJSON(buf *bytes.Buffer, n *yaml.Node) error {
	if n == nil {
		buf.WriteString("null")
		return nil
	}
	switch n.Kind {
	case yaml.MappingNode:
		buf.WriteByte('{')
		for i := 0; i+1 < len(n.Content); i += 2 {
			if i > 0 {
				buf.WriteByte(',')
			}
			writeJSONString(buf, n.Content[i].Value)
			buf.WriteByte(':')
			if err := writeNodeJSON(buf, n.Content[i+1]); err != nil {
				return err
			}
		}
		buf.WriteByte('}')
	case yaml.SequenceNode:
		buf.WriteByte('[')
		for i, c := range n.Content {
			if i > 0 {
				buf.WriteByte(',')
			}
			if err := writeNodeJSON(buf, c); err != nil {
				return err
			}
		}
		buf.WriteByte(']')
	case yaml.ScalarNode:
		switch n.ShortTag() {
		case "!!str":
			writeJSONString(buf, n.Value)
		case "!!null":
			buf.WriteString("null")
		case "!!bool", "!!int", "!!float":
			buf.WriteString(n.Value)
		default:
			return fmt.Errorf("scalar %q with tag %s has no JSON form", n.Value, n.ShortTag())
		}
	default:
		return fmt.Errorf("node kind %d has no JSON form", n.Kind)
	}
	return nil
}

// jsonNode parses a JSON document into a YAML node tree (JSON is YAML), which
// keeps the order of object keys. Styles are cleared so that the nodes print
// as block YAML.
func jsonNode(data []byte) (*yaml.Node, error) {
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return nil, err
	}
	if doc.Kind != yaml.DocumentNode || len(doc.Content) != 1 {
		return nil, errors.New("not a single JSON value")
	}
	n := doc.Content[0]
	clearStyle(n)
	return n, nil
}

// clearStyle makes a subtree print as plain block YAML; strings that would
// read as another type are still quoted by the encoder.
func clearStyle(n *yaml.Node) {
	n.Style = 0
	for _, c := range n.Content {
		clearStyle(c)
	}
}

// Diff returns the operations that turn the JSON value a into b. Both must
// come from jsonNode. Arrays are aligned by element identity (the "name" of
// an object that has one, the whole value otherwise), so that an element
// inserted before others (a native sidecar first in initContainers) is one
// "add", and an element that changed inside is patched field by field rather
// than replaced: fields a newer API server knows and these types don't are
// never touched.
func Diff(a, b *yaml.Node) []Operation {
	var ops []Operation
	diff(a, b, "", &ops)
	return ops
}

func diff(a, b *yaml.Node, path string, ops *[]Operation) {
	if a.Kind != b.Kind || a.Kind == yaml.ScalarNode || a.Kind == yaml.AliasNode {
		if !equal(a, b) {
			*ops = append(*ops, Operation{Op: "replace", Path: path, Value: b})
		}
		return
	}
	switch a.Kind {
	case yaml.MappingNode:
		inB := map[string]*yaml.Node{}
		for i := 0; i+1 < len(b.Content); i += 2 {
			inB[b.Content[i].Value] = b.Content[i+1]
		}
		inA := map[string]bool{}
		for i := 0; i+1 < len(a.Content); i += 2 {
			k := a.Content[i].Value
			inA[k] = true
			p := path + "/" + escapePointer(k)
			if bv, ok := inB[k]; ok {
				diff(a.Content[i+1], bv, p, ops)
			} else {
				*ops = append(*ops, Operation{Op: "remove", Path: p})
			}
		}
		for i := 0; i+1 < len(b.Content); i += 2 {
			if k := b.Content[i].Value; !inA[k] {
				*ops = append(*ops, Operation{Op: "add", Path: path + "/" + escapePointer(k), Value: b.Content[i+1]})
			}
		}
	case yaml.SequenceNode:
		diffSequence(a.Content, b.Content, path, ops)
	}
}

// diffSequence aligns two arrays with a longest common subsequence over
// element identity, then walks both: matched elements are diffed in place,
// elements only in a are removed, elements only in b are added. Indexes in
// the operations are those of the array as patched so far.
func diffSequence(a, b []*yaml.Node, path string, ops *[]Operation) {
	n, m := len(a), len(b)
	// lcs[i][j] is the LCS length of a[i:] and b[j:].
	lcs := make([][]int, n+1)
	for i := range lcs {
		lcs[i] = make([]int, m+1)
	}
	for i := n - 1; i >= 0; i-- {
		for j := m - 1; j >= 0; j-- {
			if sameElement(a[i], b[j]) {
				lcs[i][j] = lcs[i+1][j+1] + 1
			} else {
				lcs[i][j] = max(lcs[i+1][j], lcs[i][j+1])
			}
		}
	}
	i, j, k := 0, 0, 0
	for i < n || j < m {
		switch {
		case i < n && j < m && sameElement(a[i], b[j]) && lcs[i][j] == lcs[i+1][j+1]+1:
			diff(a[i], b[j], path+"/"+strconv.Itoa(k), ops)
			i, j, k = i+1, j+1, k+1
		case i < n && (j == m || lcs[i+1][j] >= lcs[i][j+1]):
			*ops = append(*ops, Operation{Op: "remove", Path: path + "/" + strconv.Itoa(k)})
			i++
		default:
			*ops = append(*ops, Operation{Op: "add", Path: path + "/" + strconv.Itoa(k), Value: b[j]})
			j, k = j+1, k+1
		}
	}
}

// sameElement says whether two array elements are the same item: objects
// with a "name" are the same when their names are; anything else when equal.
func sameElement(a, b *yaml.Node) bool {
	an, bn := nameOf(a), nameOf(b)
	if an != "" || bn != "" {
		return an == bn
	}
	return equal(a, b)
}

func nameOf(n *yaml.Node) string {
	if n.Kind != yaml.MappingNode {
		return ""
	}
	for i := 0; i+1 < len(n.Content); i += 2 {
		if n.Content[i].Value == "name" && n.Content[i+1].Kind == yaml.ScalarNode {
			return n.Content[i+1].Value
		}
	}
	return ""
}

// equal compares two JSON values; object key order does not matter.
func equal(a, b *yaml.Node) bool {
	if a.Kind != b.Kind {
		return false
	}
	switch a.Kind {
	case yaml.ScalarNode:
		return a.ShortTag() == b.ShortTag() && a.Value == b.Value
	case yaml.SequenceNode:
		if len(a.Content) != len(b.Content) {
			return false
		}
		for i := range a.Content {
			if !equal(a.Content[i], b.Content[i]) {
				return false
			}
		}
		return true
	case yaml.MappingNode:
		if len(a.Content) != len(b.Content) {
			return false
		}
		inB := map[string]*yaml.Node{}
		for i := 0; i+1 < len(b.Content); i += 2 {
			inB[b.Content[i].Value] = b.Content[i+1]
		}
		for i := 0; i+1 < len(a.Content); i += 2 {
			bv, ok := inB[a.Content[i].Value]
			if !ok || !equal(a.Content[i+1], bv) {
				return false
			}
		}
		return true
	}
	return false
}

// escapePointer escapes a key for a JSON Pointer: "~" is "~0", "/" is "~1".
func escapePointer(s string) string {
	if !strings.ContainsAny(s, "~/") {
		return s
	}
	return strings.ReplaceAll(strings.ReplaceAll(s, "~", "~0"), "/", "~1")
}

func unescapePointer(s string) string {
	return strings.ReplaceAll(strings.ReplaceAll(s, "~1", "/"), "~0", "~")
}

// Apply applies ops to a YAML node tree (a document's root node) in place,
// keeping everything the operations don't touch, comments included. Unlike
// RFC 6902, an "add" creates missing parent objects: a document may leave out
// what the typed form of the object has (an empty pod template metadata).
func Apply(root *yaml.Node, ops []Operation) error {
	for _, op := range ops {
		if err := applyOne(root, op); err != nil {
			return fmt.Errorf("%s %s: %w", op.Op, op.Path, err)
		}
	}
	return nil
}

func applyOne(root *yaml.Node, op Operation) error {
	if op.Path == "" {
		if op.Op != "replace" {
			return errors.New("only replace may target the whole document")
		}
		*root = *op.Value
		return nil
	}
	tokens := strings.Split(strings.TrimPrefix(op.Path, "/"), "/")
	parent := root
	chain := []*yaml.Node{root}
	defer func() {
		// A block value added inside a flow collection ({...} or [...])
		// would print as one long flow line: make the collections on the
		// way to it block style instead.
		if op.Value != nil && op.Value.Kind != yaml.ScalarNode {
			for _, n := range chain {
				n.Style &^= yaml.FlowStyle
			}
		}
	}()
	for _, t := range tokens[:len(tokens)-1] {
		t = unescapePointer(t)
		next, err := child(parent, t)
		if err != nil {
			return err
		}
		if next == nil || next.ShortTag() == "!!null" {
			if op.Op != "add" || parent.Kind != yaml.MappingNode {
				return fmt.Errorf("%q does not exist", t)
			}
			m := &yaml.Node{Kind: yaml.MappingNode, Tag: "!!map"}
			setKey(parent, t, m)
			next = m
		}
		parent = next
		chain = append(chain, next)
	}
	last := unescapePointer(tokens[len(tokens)-1])
	switch parent.Kind {
	case yaml.MappingNode:
		switch op.Op {
		case "add":
			setKey(parent, last, op.Value)
		case "replace":
			if !hasKey(parent, last) {
				return fmt.Errorf("%q does not exist", last)
			}
			setKey(parent, last, op.Value)
		case "remove":
			if !deleteKey(parent, last) {
				return fmt.Errorf("%q does not exist", last)
			}
		default:
			return fmt.Errorf("unsupported operation %q", op.Op)
		}
	case yaml.SequenceNode:
		i := len(parent.Content)
		if last != "-" {
			var err error
			if i, err = strconv.Atoi(last); err != nil || i < 0 {
				return fmt.Errorf("%q is not an array index", last)
			}
		}
		switch {
		case op.Op == "add" && i <= len(parent.Content):
			parent.Content = append(parent.Content[:i], append([]*yaml.Node{op.Value}, parent.Content[i:]...)...)
		case op.Op == "replace" && i < len(parent.Content):
			parent.Content[i] = op.Value
		case op.Op == "remove" && i < len(parent.Content):
			parent.Content = append(parent.Content[:i], parent.Content[i+1:]...)
		default:
			return fmt.Errorf("index %s out of range (length %d) or unsupported operation", last, len(parent.Content))
		}
	default:
		return fmt.Errorf("parent is not an object or array")
	}
	return nil
}

// child returns the value at key t of a mapping or index t of a sequence;
// nil when a mapping has no such key.
func child(n *yaml.Node, t string) (*yaml.Node, error) {
	switch n.Kind {
	case yaml.MappingNode:
		for i := 0; i+1 < len(n.Content); i += 2 {
			if n.Content[i].Value == t {
				return n.Content[i+1], nil
			}
		}
		return nil, nil
	case yaml.SequenceNode:
		i, err := strconv.Atoi(t)
		if err != nil || i < 0 || i >= len(n.Content) {
			return nil, fmt.Errorf("%q is not an index of an array of %d", t, len(n.Content))
		}
		return n.Content[i], nil
	}
	return nil, fmt.Errorf("%q: parent is not an object or array", t)
}

func hasKey(m *yaml.Node, k string) bool {
	for i := 0; i+1 < len(m.Content); i += 2 {
		if m.Content[i].Value == k {
			return true
		}
	}
	return false
}

// setKey sets key k of mapping m, in place when it exists, else at the end.
func setKey(m *yaml.Node, k string, v *yaml.Node) {
	for i := 0; i+1 < len(m.Content); i += 2 {
		if m.Content[i].Value == k {
			// Keep a comment that sat on the old value's line.
			if v.LineComment == "" {
				v.LineComment = m.Content[i+1].LineComment
			}
			m.Content[i+1] = v
			return
		}
	}
	key := &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!str", Value: k}
	if k == "metadata" {
		// Where Kubernetes objects have it: before spec.
		for i := 0; i+1 < len(m.Content); i += 2 {
			if m.Content[i].Value == "spec" {
				m.Content = append(m.Content[:i], append([]*yaml.Node{key, v}, m.Content[i:]...)...)
				return
			}
		}
	}
	m.Content = append(m.Content, key, v)
}

func deleteKey(m *yaml.Node, k string) bool {
	for i := 0; i+1 < len(m.Content); i += 2 {
		if m.Content[i].Value == k {
			m.Content = append(m.Content[:i], m.Content[i+2:]...)
			return true
		}
	}
	return false
}
