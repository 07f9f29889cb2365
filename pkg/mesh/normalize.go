package mesh

import (
	"fmt"
	"net/http"
	"strings"
)

// Normalization is what the mesh config entry asks of every inbound
// listener for the requests it takes (Consul 1.20 and later:
// mesh.http.incoming.request_normalization), which Consul hands to Envoy's
// HTTP connection manager. The zero value is Consul's default: paths
// normalized (CanonicalPath), slashes not merged, escaped slashes kept,
// headers with underscores allowed. A value.
type Normalization struct {
	// InsecureDisablePathNormalization turns off CanonicalPath: the
	// intentions judge, and the app is sent, the path as written.
	InsecureDisablePathNormalization bool
	// MergeSlashes merges adjacent slashes ("//admin" is "/admin") after
	// the path is normalized.
	MergeSlashes bool
	// PathWithEscapedSlashesAction says what becomes of a path with an
	// escaped slash or backslash (%2F, %5C): one of the EscapedSlashes
	// constants; "" and EscapedSlashesDefault are EscapedSlashesKeep,
	// Envoy's default.
	PathWithEscapedSlashesAction string
	// HeadersWithUnderscoresAction says what becomes of a header whose
	// name has an underscore: one of the Underscores constants; "" is
	// UnderscoresAllow.
	HeadersWithUnderscoresAction string
}

// Envoy's path_with_escaped_slashes_action, as Consul names its values.
const (
	// EscapedSlashesDefault is Envoy's default, which keeps them.
	EscapedSlashesDefault = "IMPLEMENTATION_SPECIFIC_DEFAULT"
	// EscapedSlashesKeep leaves escaped slashes as they are.
	EscapedSlashesKeep = "KEEP_UNCHANGED"
	// EscapedSlashesReject refuses a request whose path has one (400).
	EscapedSlashesReject = "REJECT_REQUEST"
	// EscapedSlashesRedirect decodes them and, when there were any,
	// answers with a redirect to the path normalized (307; gRPC, which
	// cannot follow one, is refused).
	EscapedSlashesRedirect = "UNESCAPE_AND_REDIRECT"
	// EscapedSlashesForward decodes them and serves the request.
	EscapedSlashesForward = "UNESCAPE_AND_FORWARD"
)

// Envoy's headers_with_underscores_action, as Consul names its values.
const (
	// UnderscoresAllow serves such headers.
	UnderscoresAllow = "ALLOW"
	// UnderscoresReject refuses a request with one (400).
	UnderscoresReject = "REJECT_REQUEST"
	// UnderscoresDrop removes them before the intentions or the app see
	// the request.
	UnderscoresDrop = "DROP_HEADER"
)

// String is n as Consul's configuration writes it, its defaults spelled
// out.
func (n Normalization) String() string {
	slashes, underscores := n.PathWithEscapedSlashesAction, n.HeadersWithUnderscoresAction
	if slashes == "" || slashes == EscapedSlashesDefault {
		slashes = EscapedSlashesKeep
	}
	if underscores == "" {
		underscores = UnderscoresAllow
	}
	return fmt.Sprintf("insecure_disable_path_normalization=%t merge_slashes=%t path_with_escaped_slashes_action=%s headers_with_underscores_action=%s",
		n.InsecureDisablePathNormalization, n.MergeSlashes, slashes, underscores)
}

// Validate reports a value Consul would not accept, naming its field.
func (n Normalization) Validate() error {
	switch n.PathWithEscapedSlashesAction {
	case "", EscapedSlashesDefault, EscapedSlashesKeep, EscapedSlashesReject, EscapedSlashesRedirect, EscapedSlashesForward:
	default:
		return fmt.Errorf("mesh config entry: http.incoming.request_normalization.path_with_escaped_slashes_action %q, want one of %s, %s, %s, %s, %s",
			n.PathWithEscapedSlashesAction, EscapedSlashesDefault, EscapedSlashesKeep, EscapedSlashesReject, EscapedSlashesRedirect, EscapedSlashesForward)
	}
	switch n.HeadersWithUnderscoresAction {
	case "", UnderscoresAllow, UnderscoresReject, UnderscoresDrop:
	default:
		return fmt.Errorf("mesh config entry: http.incoming.request_normalization.headers_with_underscores_action %q, want one of %s, %s, %s",
			n.HeadersWithUnderscoresAction, UnderscoresAllow, UnderscoresReject, UnderscoresDrop)
	}
	return nil
}

// PathOutcome is what becomes of a request after its path is normalized.
type PathOutcome int

const (
	// PathServe: the request is judged and served with the path.
	PathServe PathOutcome = iota
	// PathReject: the request is refused (400).
	PathReject
	// PathRedirect: the request is answered with a redirect (307) to the
	// path.
	PathRedirect
)

// Path is p, an escaped request path without its query, as the inbound
// listener judges it and sends it on, in Envoy's order
// (ConnectionManagerUtility::maybeNormalizePath): escaped slashes first
// (decoded unless kept, and then refused or redirected as the action
// says), then CanonicalPath unless turned off, then adjacent slashes
// merged. A malformed escape is PathReject, with the error saying why.
func (n Normalization) Path(p string) (string, PathOutcome, error) {
	outcome := PathServe
	if a := n.PathWithEscapedSlashesAction; a != "" && a != EscapedSlashesKeep && a != EscapedSlashesDefault {
		if q, found := unescapeSlashes(p); found {
			switch a {
			case EscapedSlashesReject:
				return p, PathReject, fmt.Errorf("the path has an escaped slash or backslash (%%2F, %%5C), which the mesh's configuration refuses (%s)", a)
			case EscapedSlashesRedirect:
				outcome = PathRedirect
			}
			p = q
		}
	}
	if !n.InsecureDisablePathNormalization {
		c, err := CanonicalPath(p)
		if err != nil {
			return p, PathReject, err
		}
		p = c
	}
	if n.MergeSlashes {
		p = mergeSlashes(p)
	}
	return p, outcome, nil
}

// judged is the path the intentions match for r: Path of its path as
// written; a path Path refuses is judged as written (the listener answers
// it before any intention is asked).
func (n Normalization) judged(r *http.Request) string {
	raw := RawPath(r)
	p, outcome, err := n.Path(raw)
	if err != nil || outcome == PathReject {
		return raw
	}
	return p
}

// Underscored is the first header of h whose name has an underscore, "" if
// none.
func Underscored(h http.Header) string {
	for name := range h {
		if strings.IndexByte(name, '_') >= 0 {
			return name
		}
	}
	return ""
}

// DropUnderscored removes every header of h whose name has an underscore,
// and says how many there were.
func DropUnderscored(h http.Header) int {
	n := 0
	for name := range h {
		if strings.IndexByte(name, '_') >= 0 {
			delete(h, name)
			n++
		}
	}
	return n
}

// unescapeSlashes decodes every %2F and %5C (either case) of p, as Envoy's
// PathUtil::unescapeSlashes, and reports whether there was one.
func unescapeSlashes(p string) (string, bool) {
	if !strings.Contains(p, "%") {
		return p, false
	}
	var b strings.Builder
	found := false
	for i := 0; i < len(p); i++ {
		if p[i] == '%' && i+2 < len(p) {
			switch strings.ToUpper(p[i+1 : i+3]) {
			case "2F":
				b.WriteByte('/')
				i += 2
				found = true
				continue
			case "5C":
				b.WriteByte('\\')
				i += 2
				found = true
				continue
			}
		}
		b.WriteByte(p[i])
	}
	if !found {
		return p, false
	}
	return b.String(), true
}

// mergeSlashes turns every run of slashes in p into one.
func mergeSlashes(p string) string {
	if !strings.Contains(p, "//") {
		return p
	}
	b := make([]byte, 0, len(p))
	for i := 0; i < len(p); i++ {
		if p[i] == '/' && len(b) > 0 && b[len(b)-1] == '/' {
			continue
		}
		b = append(b, p[i])
	}
	return string(b)
}
