package inject

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"

	"github.com/sidecar-mesh/sidecar/internal/lcs"
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

// jsonNode parses a JSON document into a YAML node tree (JSON is YAML),
// keeping the order of object keys, with no styles, so that the nodes print
// as block YAML (strings that would read as another type are still quoted
// by the encoder). It builds the tree from the JSON tokens directly: the
// YAML parser costs many times more for the same document.
func jsonNode(data []byte) (*yaml.Node, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	n, err := jsonValue(dec)
	if err != nil {
		return nil, err
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("not a single JSON value")
	}
	return n, nil
}

// jsonValue reads one JSON value from dec.
// strNode is a YAML string. One that YAML 1.1 reads as something else
// (yes, no, on, off, y, n, ~ in any case: kubectl and sigs.k8s.io/yaml
// read YAML 1.1, yaml.v3 quotes only what YAML 1.2 would retype) is
// double-quoted, so that a label value "yes" or a container named "no"
// stays a string for every reader.
func strNode(v string) *yaml.Node {
	n := &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!str", Value: v}
	switch strings.ToLower(v) {
	case "y", "yes", "n", "no", "on", "off", "~", "true", "false", "null":
		n.Style = yaml.DoubleQuotedStyle
	}
	return n
}

func jsonValue(dec *json.Decoder) (*yaml.Node, error) {
	tok, err := dec.Token()
	if err != nil {
		return nil, err
	}
	switch v := tok.(type) {
	case json.Delim:
		if v == '[' {
			n := &yaml.Node{Kind: yaml.SequenceNode, Tag: "!!seq"}
			for dec.More() {
				c, err := jsonValue(dec)
				if err != nil {
					return nil, err
				}
				n.Content = append(n.Content, c)
			}
			_, err := dec.Token() // ]
			return n, err
		}
		n := &yaml.Node{Kind: yaml.MappingNode, Tag: "!!map"}
		for dec.More() {
			k, err := dec.Token()
			if err != nil {
				return nil, err
			}
			c, err := jsonValue(dec)
			if err != nil {
				return nil, err
			}
			n.Content = append(n.Content, strNode(k.(string)), c)
		}
		_, err := dec.Token() // }
		return n, err
	case string:
		return strNode(v), nil
	case json.Number:
		tag := "!!int"
		if strings.ContainsAny(string(v), ".eE") {
			tag = "!!float"
		}
		return &yaml.Node{Kind: yaml.ScalarNode, Tag: tag, Value: string(v)}, nil
	case bool:
		return &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!bool", Value: strconv.FormatBool(v)}, nil
	case nil:
		return &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!null", Value: "null"}, nil
	}
	return nil, fmt.Errorf("unexpected JSON token %v", tok)
}

// Diff returns the operations that turn the JSON value a into b. Both must
// come from jsonNode. Arrays are aligned by element identity (the "name" of
// an object that has one, the whole value otherwise), so that an element
// inserted before others (a native sidecar first in initContainers) is one
// "add", and an element that changed inside is patched field by field rather
// than replaced: fields a newer API server knows and these types don't are
// never touched.
//
// The work is in proportion to the size of a and b: equal subtrees are
// skipped, arrays are aligned past their common prefix and suffix (all that
// injection leaves when it puts an element first, appends, or changes one
// in place), and the rest is aligned by a longest common subsequence only
// while its table stays small; a larger rest is one "replace" of the array.
func Diff(a, b *yaml.Node) []Operation {
	d := &differ{}
	d.diff(a, b, "")
	return d.ops
}

// maxLCSCells bounds the table of diffSequence's alignment:
// (n+1)x(m+1) cells for the n and m elements left between the common
// prefix and suffix.
const maxLCSCells = 1 << 16

// differ is one run of Diff.
type differ struct {
	ops []Operation
	// steps counts element comparisons and table cells: the work done.
	steps int
}

func (d *differ) add(op, path string, v *yaml.Node) {
	d.ops = append(d.ops, Operation{Op: op, Path: path, Value: v})
}

func (d *differ) diff(a, b *yaml.Node, path string) {
	if a.Kind != b.Kind || a.Kind == yaml.ScalarNode || a.Kind == yaml.AliasNode {
		if !equal(a, b) {
			d.add("replace", path, b)
		}
		return
	}
	if equal(a, b) {
		return
	}
	switch a.Kind {
	case yaml.MappingNode:
		// Keys in the same order (two encodings of one type) need no
		// lookup; the sets after them are disjoint from those before.
		i := 0
		for ; i+1 < len(a.Content) && i+1 < len(b.Content) && a.Content[i].Value == b.Content[i].Value; i += 2 {
			if !equal(a.Content[i+1], b.Content[i+1]) {
				d.diff(a.Content[i+1], b.Content[i+1], path+"/"+escapePointer(a.Content[i].Value))
			}
		}
		if i >= len(a.Content) && i >= len(b.Content) {
			return
		}
		inB := map[string]*yaml.Node{}
		for j := i; j+1 < len(b.Content); j += 2 {
			inB[b.Content[j].Value] = b.Content[j+1]
		}
		inA := map[string]bool{}
		for j := i; j+1 < len(a.Content); j += 2 {
			k := a.Content[j].Value
			inA[k] = true
			p := path + "/" + escapePointer(k)
			if bv, ok := inB[k]; ok {
				d.diff(a.Content[j+1], bv, p)
			} else {
				d.add("remove", p, nil)
			}
		}
		for j := i; j+1 < len(b.Content); j += 2 {
			if k := b.Content[j].Value; !inA[k] {
				d.add("add", path+"/"+escapePointer(k), b.Content[j+1])
			}
		}
	case yaml.SequenceNode:
		d.diffSequence(a.Content, b.Content, path)
	}
}

// diffSequence aligns two arrays: their common prefix and suffix (by
// element identity) pair up in place, and the elements between are
// aligned by a longest common subsequence: matched elements are diffed in
// place, elements only in a are removed, elements only in b are added.
// Indexes in the operations are those of the array as patched so far.
func (d *differ) diffSequence(a, b []*yaml.Node, path string) {
	pre := 0
	for pre < len(a) && pre < len(b) && d.same(a[pre], b[pre]) {
		pre++
	}
	suf := 0
	for suf < len(a)-pre && suf < len(b)-pre && d.same(a[len(a)-1-suf], b[len(b)-1-suf]) {
		suf++
	}
	am, bm := a[pre:len(a)-suf], b[pre:len(b)-suf]
	n, m := len(am), len(bm)
	if n > 0 && m > 0 && (n+1)*(m+1) > maxLCSCells {
		// Too much changed to align at a cost in proportion to the
		// array: the whole array is one operation.
		seq := &yaml.Node{Kind: yaml.SequenceNode, Tag: "!!seq", Content: b}
		d.add("replace", path, seq)
		return
	}
	for i := range pre {
		if !equal(a[i], b[i]) {
			d.diff(a[i], b[i], path+"/"+strconv.Itoa(i))
		}
	}
	d.steps += (n + 1) * (m + 1) // the alignment's table
	k := pre
	for _, op := range lcs.Script(n, m, func(i, j int) bool { return d.same(am[i], bm[j]) }) {
		switch op.Kind {
		case lcs.Keep:
			d.diff(am[op.A], bm[op.B], path+"/"+strconv.Itoa(k))
			k++
		case lcs.Delete:
			d.add("remove", path+"/"+strconv.Itoa(k), nil)
		case lcs.Insert:
			d.add("add", path+"/"+strconv.Itoa(k), bm[op.B])
			k++
		}
	}
	for s := range suf {
		if x, y := a[len(a)-suf+s], b[len(b)-suf+s]; !equal(x, y) {
			d.diff(x, y, path+"/"+strconv.Itoa(k+s))
		}
	}
}

// same is sameElement, counted.
func (d *differ) same(a, b *yaml.Node) bool {
	d.steps++
	return sameElement(a, b)
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
		// In the same key order, as two encodings of one type are, no
		// lookup is needed.
		i := 0
		for ; i+1 < len(a.Content) && a.Content[i].Value == b.Content[i].Value; i += 2 {
			if !equal(a.Content[i+1], b.Content[i+1]) {
				return false
			}
		}
		if i >= len(a.Content) {
			return true
		}
		inB := map[string]*yaml.Node{}
		for j := i; j+1 < len(b.Content); j += 2 {
			inB[b.Content[j].Value] = b.Content[j+1]
		}
		for j := i; j+1 < len(a.Content); j += 2 {
			bv, ok := inB[a.Content[j].Value]
			if !ok || !equal(a.Content[j+1], bv) {
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
	key := strNode(k)
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
