// Package redact keeps secrets out of what the sidecar shows and logs: the
// admin API's configuration, the health port's answers, log lines and
// error messages. Its types hold the real value for the code that uses it;
// their JSON, text (fmt, String) and log/slog forms are redacted.
package redact

import (
	"encoding/json"
	"log/slog"
	"maps"
	"net/url"
	"strconv"
	"strings"
)

// Mask stands for a value that is not shown.
const Mask = "[redacted]"

// sensitive are the parts of a header or parameter name that make its value
// a secret: Authorization, Proxy-Authorization, Cookie, X-Api-Key,
// X-Auth-Token, client_secret, password...
var sensitive = []string{"auth", "cookie", "token", "secret", "key", "password", "passwd", "credential"}

// SensitiveName reports whether a header, query parameter or similar name
// holds a secret, whatever its case.
func SensitiveName(name string) bool {
	n := strings.ToLower(name)
	for _, s := range sensitive {
		if strings.Contains(n, s) {
			return true
		}
	}
	return false
}

// Headers are header values by name (the probes' headers). The values of
// sensitive names (SensitiveName) are masked in its JSON, text and slog
// forms; the map itself holds them as given. Nil: none.
type Headers map[string]string

// Redacted returns a copy with the sensitive values masked.
func (h Headers) Redacted() map[string]string {
	if h == nil {
		return nil
	}
	out := maps.Clone(map[string]string(h))
	for k := range out {
		if SensitiveName(k) {
			out[k] = Mask
		}
	}
	return out
}

// MarshalJSON implements json.Marshaler: the redacted map.
func (h Headers) MarshalJSON() ([]byte, error) { return json.Marshal(h.Redacted()) }

// String implements fmt.Stringer: the redacted map, as fmt prints a map.
func (h Headers) String() string {
	b, _ := json.Marshal(h.Redacted())
	return string(b)
}

// GoString implements fmt.GoStringer, so that %#v is redacted too.
func (h Headers) GoString() string { return "redact.Headers" + h.String() }

// LogValue implements slog.LogValuer: a group of the redacted values.
func (h Headers) LogValue() slog.Value {
	r := h.Redacted()
	attrs := make([]slog.Attr, 0, len(r))
	for k, v := range r {
		attrs = append(attrs, slog.String(k, v))
	}
	return slog.GroupValue(attrs...)
}

// URL is a URL, an address or a path with a query, as configured. Its
// JSON, text and slog forms (Redacted) mask userinfo and the values of
// sensitive query parameters; string(u) is the real value.
type URL string

// Redacted is u without secrets: "https://[redacted]@collector:4318/v1?token=[redacted]&a=b".
// A value with userinfo that does not parse as a URL is masked whole.
func (u URL) Redacted() string {
	s := string(u)
	if !strings.ContainsAny(s, "@?") {
		return s
	}
	p, err := url.Parse(s)
	if err != nil || strings.Contains(p.Opaque, "@") {
		// "user:pass@host:port" parses as scheme "user", opaque "pass@...".
		if strings.Contains(s, "@") {
			return Mask
		}
		if i := strings.IndexByte(s, '?'); i >= 0 {
			return s[:i] + "?" + redactQuery(s[i+1:])
		}
		return s
	}
	userinfo := p.User != nil
	p.User = nil
	p.RawQuery = redactQuery(p.RawQuery)
	out := p.String()
	if userinfo {
		if i := strings.Index(out, "//"); i >= 0 {
			out = out[:i+2] + Mask + "@" + out[i+2:]
		}
	}
	return out
}

// redactQuery masks the values of sensitive parameters, keeping the order
// and spelling of the others.
func redactQuery(q string) string {
	if q == "" {
		return q
	}
	parts := strings.Split(q, "&")
	for i, kv := range parts {
		k, _, hasValue := strings.Cut(kv, "=")
		name, err := url.QueryUnescape(k)
		if err != nil {
			name = k
		}
		if hasValue && SensitiveName(name) {
			parts[i] = k + "=" + Mask
		}
	}
	return strings.Join(parts, "&")
}

// MarshalJSON implements json.Marshaler: the redacted form.
func (u URL) MarshalJSON() ([]byte, error) { return json.Marshal(u.Redacted()) }

// String implements fmt.Stringer: the redacted form.
func (u URL) String() string { return u.Redacted() }

// GoString implements fmt.GoStringer, so that %#v is redacted too.
func (u URL) GoString() string { return "redact.URL(" + strconv.Quote(u.Redacted()) + ")" }

// LogValue implements slog.LogValuer: the redacted form.
func (u URL) LogValue() slog.Value { return slog.StringValue(u.Redacted()) }

var (
	_ slog.LogValuer = Headers(nil)
	_ slog.LogValuer = URL("")
	_ json.Marshaler = Headers(nil)
	_ json.Marshaler = URL("")
)
