package policy

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math"
	"reflect"
	"regexp"
	"sort"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// MaxAliasNodes is how many nodes the aliases of one document may add to it.
// An alias stands for a copy of the node it names, and that node may hold
// aliases in turn: a few kilobytes of aliases of aliases stand for hundreds
// of millions of nodes, each of which the decoder would build. A document's
// own nodes are bounded by its size; what its aliases add is bounded here,
// far above a policy's few dozen fields.
const MaxAliasNodes = 10000

// DecodeStrict decodes one YAML (or JSON, a subset of YAML) document into v,
// rejecting keys that v's type does not have, keys given twice, and
// documents whose aliases add more than MaxAliasNodes nodes. Every error
// names the file and line and, for keys, the full key path and the keys
// allowed there:
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
	return decodeNode(n, file, v, &checker{file: file})
}

// decodeNode checks n with c, then decodes it into v. The decoder runs
// only on a document that passed: its check of duplicate keys compares
// every key of a mapping with every other and reports each pair, and it
// copies what each alias names at every use.
func decodeNode(n *yaml.Node, file string, v any, c *checker) error {
	if err := checkAliases(n, file); err != nil {
		return &Problems{Errs: []error{err}}
	}
	c.walk(n, reflect.TypeOf(v), "")
	if err := c.errs.err(); err != nil {
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

// checkAliases rejects a document whose aliases add more than
// MaxAliasNodes nodes to it, or one with an alias inside the node it names.
// It counts without copying: the size of each node an alias names is
// counted once and remembered, and counting stops at the cap, so it costs
// at most the document's own nodes and MaxAliasNodes more.
func checkAliases(n *yaml.Node, file string) error {
	a := aliasCounter{sizes: map[*yaml.Node]int{}}
	a.walk(n)
	switch {
	case a.loop != nil:
		return fmt.Errorf("%s:%d: alias %s is inside the node it names", file, a.loop.Line, Quote("*"+a.loop.Value))
	case a.added > MaxAliasNodes:
		return fmt.Errorf("%s:%d: aliases expand to more than %d nodes (allowed: at most %d)",
			file, a.at.Line, MaxAliasNodes, MaxAliasNodes)
	}
	return nil
}

type aliasCounter struct {
	// sizes holds the size of each node an alias names, its own aliases
	// expanded (at most MaxAliasNodes+1); -1 while it is being counted.
	sizes map[*yaml.Node]int
	added int        // nodes added by the aliases seen so far
	at    *yaml.Node // the alias that took added past the cap
	loop  *yaml.Node // an alias inside the node it names
}

// walk adds to a.added the nodes that the aliases in n stand for.
func (a *aliasCounter) walk(n *yaml.Node) {
	if n.Kind == yaml.AliasNode {
		a.added += a.size(n.Alias)
		if a.added > MaxAliasNodes && a.at == nil {
			a.at = n
		}
		return
	}
	for _, c := range n.Content {
		if a.added > MaxAliasNodes || a.loop != nil {
			return
		}
		a.walk(c)
	}
}

// size is the number of nodes n stands for, its aliases expanded, counted
// up to MaxAliasNodes+1.
func (a *aliasCounter) size(n *yaml.Node) int {
	if s, ok := a.sizes[n]; ok {
		if s < 0 {
			a.loop = n
			return MaxAliasNodes + 1
		}
		return s
	}
	a.sizes[n] = -1
	s := 1
	for _, c := range n.Content {
		if c.Kind == yaml.AliasNode {
			s += a.size(c.Alias)
			if a.loop == c.Alias {
				a.loop = c
			}
		} else {
			s += a.size(c)
		}
		if s > MaxAliasNodes || a.loop != nil {
			s = MaxAliasNodes + 1
			break
		}
	}
	a.sizes[n] = s
	return s
}

var (
	unmarshalerType = reflect.TypeFor[yaml.Unmarshaler]()
	nodeType        = reflect.TypeFor[yaml.Node]()
	durationType    = reflect.TypeFor[Duration]()
)

// A checker walks a parsed document alongside the Go type it decodes into,
// before the decoder runs, and lists its problems with their key paths:
// unknown keys, keys given twice and, when typed, values of the wrong type.
// A node that aliases name is walked once for each type it is used as.
type checker struct {
	file string
	// typed checks every value against its field's type, naming the field
	// and, for a duration, the range of durations (by key path); untyped,
	// values are left to the decoder, whose errors name a line and a Go
	// type.
	typed     bool
	durations map[string]durationRange

	walked map[walkedAs]bool
	fields map[reflect.Type]structFields
	errs   Problems
}

type walkedAs struct {
	n *yaml.Node
	t reflect.Type
}

type structFields struct {
	types   map[string]reflect.Type // YAML key -> field type
	allowed string                  // the keys, sorted, for messages
}

// add lists a problem found on line, or only counts it once the list is
// full, before formatting it: a document can have hundreds of thousands.
func (c *checker) add(line int, format string, args ...any) {
	if c.errs.full() {
		c.errs.More++
		return
	}
	c.errs.add(fmt.Errorf("%s:%d: "+format, append([]any{c.file, line}, args...)...))
}

func (c *checker) walk(n *yaml.Node, t reflect.Type, path string) {
	switch n.Kind {
	case yaml.DocumentNode:
		for _, d := range n.Content {
			c.walk(d, t, path)
		}
		return
	case yaml.AliasNode:
		as := walkedAs{n.Alias, t}
		if c.walked[as] {
			return
		}
		if c.walked == nil {
			c.walked = map[walkedAs]bool{}
		}
		c.walked[as] = true
		c.walk(n.Alias, t, path)
		return
	}
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null" {
		return // null is "not set", for any field
	}
	switch {
	case t == durationType:
		if c.typed {
			c.duration(n, path)
		}
		return
	case t == nodeType || reflect.PointerTo(t).Implements(unmarshalerType):
		return
	}
	switch t.Kind() {
	case reflect.Struct:
		if n.Kind != yaml.MappingNode {
			c.wrongType(n, path, "a mapping")
			return
		}
		fs := c.structFields(t)
		c.mapping(n, path, func(key string, line int) (reflect.Type, bool) {
			ft, ok := fs.types[key]
			if !ok {
				c.add(line, "unknown key %s (allowed: %s)", Quote(join(path, key)), fs.allowed)
			}
			return ft, ok
		})
	case reflect.Map:
		if n.Kind != yaml.MappingNode {
			c.wrongType(n, path, "a mapping")
			return
		}
		c.mapping(n, path, func(string, int) (reflect.Type, bool) { return t.Elem(), true })
	case reflect.Slice, reflect.Array:
		if n.Kind != yaml.SequenceNode {
			c.wrongType(n, path, "a list")
			return
		}
		for i, e := range n.Content {
			c.walk(e, t.Elem(), fmt.Sprintf("%s[%d]", path, i))
		}
	case reflect.String:
		if n.Kind != yaml.ScalarNode {
			c.wrongType(n, path, "a string")
		}
	case reflect.Bool:
		c.scalar(n, t, path, "true or false")
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		c.scalar(n, t, path, "an integer")
	case reflect.Float32, reflect.Float64:
		c.scalar(n, t, path, "a number")
	}
}

// mapping checks the keys of n, each once, and walks each value as the
// type field gives for its key (none: the key is not allowed).
func (c *checker) mapping(n *yaml.Node, path string, field func(key string, line int) (reflect.Type, bool)) {
	first := make(map[string]int, len(n.Content)/2) // key -> its line
	for i := 0; i+1 < len(n.Content); i += 2 {
		k := n.Content[i]
		if k.Kind == yaml.AliasNode {
			k = k.Alias
		}
		if line, dup := first[k.Value]; dup {
			c.add(n.Content[i].Line, "key %s given twice (first on line %d)", Quote(join(path, k.Value)), line)
			continue
		}
		first[k.Value] = n.Content[i].Line
		if t, ok := field(k.Value, n.Content[i].Line); ok {
			c.walk(n.Content[i+1], t, join(path, k.Value))
		}
	}
}

// scalar checks that the decoder takes n as a value of t, and takes all of
// it.
func (c *checker) scalar(n *yaml.Node, t reflect.Type, path, want string) {
	if !c.typed {
		return
	}
	if n.Kind == yaml.ScalarNode && n.Decode(reflect.New(t).Interface()) == nil && !dropsPart(n, t) {
		return
	}
	c.wrongType(n, path, want)
}

// dropsPart reports whether n is a number the decoder takes for an integer
// field t by dropping part of it: it makes 2.5 attempts 2, and -1e300 the
// smallest int64.
func dropsPart(n *yaml.Node, t reflect.Type) bool {
	if k := t.Kind(); k == reflect.Float32 || k == reflect.Float64 || k == reflect.Bool || n.ShortTag() != "!!float" {
		return false
	}
	var f float64
	return n.Decode(&f) != nil || f != math.Trunc(f) || f < math.MinInt64 || f >= math.MaxInt64
}

func (c *checker) wrongType(n *yaml.Node, path, want string) {
	if c.typed {
		c.add(n.Line, "%s must be %s, got %s", subject(path), want, describe(n))
	}
}

// duration checks a duration field, naming the durations it allows.
func (c *checker) duration(n *yaml.Node, path string) {
	allowed := "a duration"
	if r, ok := c.durations[path]; ok {
		allowed = r.String()
	}
	const written = ", written as 250ms, 5s or 1m"
	if n.Kind != yaml.ScalarNode {
		c.add(n.Line, "%s must be a duration, got %s (allowed: %s%s)", subject(path), describe(n), allowed, written)
		return
	}
	d, err := time.ParseDuration(n.Value)
	switch {
	case err != nil:
		c.add(n.Line, "%s invalid duration %s (allowed: %s%s)", subject(path), Quote(n.Value), allowed, written)
	case d < 0:
		c.add(n.Line, "%s negative duration %s (allowed: %s)", subject(path), Quote(n.Value), allowed)
	}
}

// structFields are the YAML keys of struct t (inline structs flattened),
// worked out once per check.
func (c *checker) structFields(t reflect.Type) structFields {
	if fs, ok := c.fields[t]; ok {
		return fs
	}
	types := yamlFields(t)
	names := make([]string, 0, len(types))
	for name := range types {
		names = append(names, name)
	}
	sort.Strings(names)
	fs := structFields{types: types, allowed: strings.Join(names, ", ")}
	if c.fields == nil {
		c.fields = map[reflect.Type]structFields{}
	}
	c.fields[t] = fs
	return fs
}

// subject begins a message about the value at path.
func subject(path string) string {
	if path == "" {
		return "the document"
	}
	return path + ":"
}

// describe names a value found where another kind was wanted: `string
// "3"`, `number 2.5`, `boolean true`, `a list`.
func describe(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	}
	kind, value := strings.TrimPrefix(n.ShortTag(), "!!"), Quote(n.Value)
	switch kind {
	case "str":
		kind = "string"
	case "int", "float":
		kind = "number"
		if len(n.Value) <= MaxQuoted {
			value = n.Value
		}
	case "bool":
		kind, value = "boolean", n.Value
	}
	return kind + " " + value
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
