package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"unicode"
	"unicode/utf8"

	"github.com/spf13/pflag"
	"go.yaml.in/yaml/v3"
)

// printer writes a command's result as -o table (for people), json or
// yaml (for programs). It is the one printer of the CLI: YAML is made from
// the JSON encoding, so both have the same field names, order and values.
type printer struct {
	format string
}

// outputFormats are the values of -o.
var outputFormats = []string{"table", "json", "yaml"}

// addFlag registers -o/--output with def as its default; tableIs says
// what the table format is for this command.
func (p *printer) addFlag(fs *pflag.FlagSet, def, tableIs string) {
	fs.StringVarP(&p.format, "output", "o", def, "output format: table ("+tableIs+"), json or yaml")
}

func (p *printer) validate() error {
	for _, f := range outputFormats {
		if p.format == f {
			return nil
		}
	}
	return fmt.Errorf("--output %q: allowed %s", p.format, strings.Join(outputFormats, ", "))
}

// print writes v as JSON or YAML, or calls table for the table format.
func (p *printer) print(w io.Writer, v any, table func(io.Writer) error) error {
	switch p.format {
	case "json":
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(v)
	case "yaml":
		b, err := toYAML(v)
		if err != nil {
			return err
		}
		_, err = w.Write(b)
		return err
	default:
		return table(w)
	}
}

// toYAML encodes v as YAML by way of its JSON encoding: JSON's field names
// and order, block style, two-space indent.
func toYAML(v any) ([]byte, error) {
	j, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	var n yaml.Node
	if err := yaml.Unmarshal(j, &n); err != nil {
		return nil, err
	}
	var plain func(*yaml.Node)
	plain = func(n *yaml.Node) {
		n.Style = 0 // drop JSON's flow mappings and quoted strings; the encoder quotes where YAML needs it
		for _, c := range n.Content {
			plain(c)
		}
	}
	plain(&n)
	var b bytes.Buffer
	enc := yaml.NewEncoder(&b)
	enc.SetIndent(2)
	if err := enc.Encode(&n); err != nil {
		return nil, err
	}
	if err := enc.Close(); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

// writeTable writes rows under header as aligned columns, kubectl's way;
// every cell is written terminal-safe (termSafe).
func writeTable(w io.Writer, header []string, rows [][]string) error {
	tw := tabwriter.NewWriter(w, 0, 8, 3, ' ', 0)
	fmt.Fprintln(tw, strings.Join(header, "\t"))
	cells := make([]string, 0, len(header))
	for _, r := range rows {
		cells = cells[:0]
		for _, c := range r {
			cells = append(cells, termSafe(c))
		}
		fmt.Fprintln(tw, strings.Join(cells, "\t"))
	}
	return tw.Flush()
}

// termSafe is s with every control or format character (an escape
// sequence's ESC, CR, LF, tab, a bidirectional override) and every byte
// that is not UTF-8 written as \xNN or \uNNNN: text that an app, a peer
// or a Consul writer chose (a path, a service name, an upstream's answer)
// cannot move the cursor, forge lines or recolor the terminal it is
// printed on.
func termSafe(s string) string {
	i := 0
	for i < len(s) {
		r, n := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && n == 1 || unicode.IsControl(r) || unicode.Is(unicode.Cf, r) {
			break
		}
		i += n
	}
	if i == len(s) {
		return s
	}
	var b strings.Builder
	b.WriteString(s[:i])
	for i < len(s) {
		r, n := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && n == 1:
			fmt.Fprintf(&b, `\x%02x`, s[i])
		case r < 0x80 && unicode.IsControl(r):
			fmt.Fprintf(&b, `\x%02x`, r)
		case unicode.IsControl(r) || unicode.Is(unicode.Cf, r):
			fmt.Fprintf(&b, `\u%04x`, r)
		default:
			b.WriteString(s[i : i+n])
		}
		i += n
	}
	return b.String()
}
