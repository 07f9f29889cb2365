package policy

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"unicode/utf8"

	"go.yaml.in/yaml/v3"
)

// MaxQuoted is how many bytes of a value from the input an error message
// quotes; a longer value is cut, and its length given.
const MaxQuoted = 200

// Quote quotes a value from the input for an error message, as
// strconv.Quote does, but at most MaxQuoted bytes of it: a longer value is
// cut at a character boundary and followed by an ellipsis and its length,
// `"aaaa"… (10485760 bytes)`, so that a hostile input cannot make an error
// (a log line, an admin API answer) as large as itself.
func Quote(s string) string {
	if len(s) <= MaxQuoted {
		return strconv.Quote(s)
	}
	cut := MaxQuoted
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return strconv.Quote(s[:cut]) + "… (" + strconv.Itoa(len(s)) + " bytes)"
}

// clipLine shortens one line of a message made by the YAML decoder, which
// may quote a key or a value in full: past 2 × MaxQuoted bytes, the middle
// goes.
func clipLine(line string) string {
	const max = 2 * MaxQuoted
	if len(line) <= max {
		return line
	}
	cut := max
	for cut > 0 && !utf8.RuneStart(line[cut]) {
		cut--
	}
	return line[:cut] + "… (a line of " + strconv.Itoa(len(line)) + " bytes)"
}

// MaxProblems is how many problems of one input (a file, a Consul key, a
// document) an error lists; past it they are only counted. A 600 KB file
// can have hundreds of thousands of invalid values, and listing each would
// cost hundreds of megabytes.
const MaxProblems = 100

// Problems are the problems found in one input: the first MaxProblems,
// each one line, and how many more there were. Parse, ParseDocument,
// DecodePolicyNode and Policy.Validate return a *Problems when they find
// any; errors.As finds each listed *FieldError through it. The zero value
// is empty and ready to use.
type Problems struct {
	// Errs are the problems listed, at most MaxProblems.
	Errs []error
	// More counts the problems found past MaxProblems, not listed.
	More int
}

// Len is how many problems were found, listed or not.
func (p *Problems) Len() int { return len(p.Errs) + p.More }

// full reports whether no more problems will be listed: further ones are
// only counted.
func (p *Problems) full() bool { return len(p.Errs) >= MaxProblems }

// add lists err, or counts it once the list is full.
func (p *Problems) add(err error) {
	if p.full() {
		p.More++
		return
	}
	p.Errs = append(p.Errs, err)
}

// addAll adds every problem err holds (a *Problems, several joined errors,
// or one error of one or more lines), each line prefixed with prefix.
func (p *Problems) addAll(prefix string, err error) {
	if err == nil {
		return
	}
	var ps *Problems
	errs := []error{err}
	if errors.As(err, &ps) {
		errs = ps.Errs
	} else if j, ok := err.(interface{ Unwrap() []error }); ok {
		errs = j.Unwrap()
	}
	for _, e := range errs {
		if prefix == "" && !strings.Contains(e.Error(), "\n") {
			p.add(e)
			continue
		}
		for _, line := range strings.Split(e.Error(), "\n") {
			p.add(prefixed{prefix: prefix, line: line, err: e})
		}
	}
	if ps != nil {
		p.More += ps.More
	}
}

// err is p as an error: nil when no problem was found.
func (p *Problems) err() error {
	if p.Len() == 0 {
		return nil
	}
	return p
}

// Error lists the problems one per line; a last line says how many more
// were found.
func (p *Problems) Error() string {
	var b strings.Builder
	for i, e := range p.Errs {
		if i > 0 {
			b.WriteByte('\n')
		}
		b.WriteString(e.Error())
	}
	if p.More > 0 {
		if len(p.Errs) > 0 {
			b.WriteByte('\n')
		}
		fmt.Fprintf(&b, "… and %d more problems (only the first %d are listed)", p.More, len(p.Errs))
	}
	return b.String()
}

// Unwrap returns the problems listed.
func (p *Problems) Unwrap() []error { return p.Errs }

// prefixed is one line of a problem, with where it was found.
type prefixed struct {
	prefix, line string
	err          error // the problem the line is from
}

func (e prefixed) Error() string { return e.prefix + e.line }
func (e prefixed) Unwrap() error { return e.err }

// decodeProblems turns an error of the YAML decoder into problems with the
// file and line: "file:N: msg". A decoder's type error lists every value it
// could not decode, which an input can make as many as it likes: past
// MaxProblems they are counted.
func decodeProblems(file string, err error) *Problems {
	ps := &Problems{}
	var te *yaml.TypeError
	if errors.As(err, &te) {
		for _, msg := range te.Errors {
			if ps.full() {
				ps.More++
				continue
			}
			ps.add(prefixLines(file, errors.New(msg)))
		}
		return ps
	}
	ps.add(prefixLines(file, err))
	return ps
}
