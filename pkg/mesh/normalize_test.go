package mesh

import (
	"net/http"
	"strings"
	"testing"
)

// Path follows Envoy's order for every setting of the mesh config entry:
// escaped slashes, then the RFC 3986 normalization, then merged slashes.
func TestNormalizationPath(t *testing.T) {
	merge := Normalization{MergeSlashes: true}
	raw := Normalization{InsecureDisablePathNormalization: true}
	forward := Normalization{PathWithEscapedSlashesAction: EscapedSlashesForward}
	reject := Normalization{PathWithEscapedSlashesAction: EscapedSlashesReject}
	redirect := Normalization{PathWithEscapedSlashesAction: EscapedSlashesRedirect, MergeSlashes: true}
	keep := Normalization{PathWithEscapedSlashesAction: EscapedSlashesKeep}
	for _, tt := range []struct {
		n       Normalization
		in      string
		want    string
		outcome PathOutcome
	}{
		{Normalization{}, "//admin", "//admin", PathServe}, // Consul's default: not merged
		{Normalization{}, "/a%2Fb", "/a%2Fb", PathServe},   // nor escaped slashes decoded
		{merge, "//admin", "/admin", PathServe},
		{merge, "/a///b//", "/a/b/", PathServe},
		{merge, "/a/..//b", "/b", PathServe}, // merged after the dot segments went
		{merge, "/a%2F%2Fb", "/a%2F%2Fb", PathServe},
		{raw, "/public/../admin", "/public/../admin", PathServe},
		{raw, "/%61dmin", "/%61dmin", PathServe},
		{Normalization{InsecureDisablePathNormalization: true, MergeSlashes: true}, "/x//../admin", "/x/../admin", PathServe},
		{forward, "/a%2Fb", "/a/b", PathServe},
		{forward, "/a%2fb%5cc", "/a/b/c", PathServe}, // a backslash is a slash once normalized
		{forward, "/public%2F..%2Fadmin", "/admin", PathServe},
		{forward, "/plain", "/plain", PathServe},
		{Normalization{PathWithEscapedSlashesAction: EscapedSlashesForward, InsecureDisablePathNormalization: true}, "/a%5Cb", "/a\\b", PathServe},
		{reject, "/a%2Fb", "/a%2Fb", PathReject},
		{reject, "/a%5cb", "/a%5cb", PathReject},
		{reject, "/a%2Eb", "/a.b", PathServe},
		{redirect, "/a%2F%2Fb", "/a/b", PathRedirect},
		{redirect, "/a//b", "/a/b", PathServe}, // merged, but no escaped slash: served
		{keep, "/a%2Fb", "/a%2Fb", PathServe},
		{Normalization{PathWithEscapedSlashesAction: EscapedSlashesDefault, MergeSlashes: true}, "/a%2F/b//c", "/a%2F/b/c", PathServe},
		{Normalization{}, "/admin%00", "/admin%00", PathReject},
		{Normalization{}, "/a%zz", "/a%zz", PathReject},
		{raw, "/a%zz", "/a%zz", PathServe}, // nothing decodes it
	} {
		got, outcome, err := tt.n.Path(tt.in)
		if got != tt.want || outcome != tt.outcome || (outcome == PathReject) != (err != nil) {
			t.Errorf("%s: Path(%q) = %q, %d, %v; want %q, %d", tt.n, tt.in, got, outcome, err, tt.want, tt.outcome)
		}
	}
}

// The intentions judge the path as the mesh config entry has it
// normalized: with merged slashes "//admin" cannot pass a deny of
// "/admin", with escaped slashes decoded "/admin%2Fusers" cannot pass one
// of "/admin/"; with Consul's defaults both are other paths, as Envoy
// sees them.
func TestIntentionsJudgeTheNormalizedPath(t *testing.T) {
	entries := l7(IntentionPermission{HTTP: &IntentionHTTP{PathPrefix: "/admin/"}},
		IntentionPermission{HTTP: &IntentionHTTP{PathExact: "/admin"}},
		allowHTTP(IntentionHTTP{PathPrefix: "/"}))
	for _, tt := range []struct {
		n       Normalization
		target  string
		allowed bool
	}{
		{Normalization{}, "//admin", true},
		{Normalization{MergeSlashes: true}, "//admin", false},
		{Normalization{MergeSlashes: true}, "/x/..//admin//users", false},
		{Normalization{}, "/admin%2Fusers", true},
		{Normalization{PathWithEscapedSlashesAction: EscapedSlashesForward}, "/admin%2Fusers", false},
		{Normalization{PathWithEscapedSlashesAction: EscapedSlashesForward}, "/admin%5cusers", false},
		{Normalization{}, "/x/../admin", false},
		{Normalization{InsecureDisablePathNormalization: true}, "/x/../admin", true}, // as Envoy with normalize_path off
		{Normalization{MergeSlashes: true}, "/public//page", true},
	} {
		s := mustCompile(t, entries, "http", denyByDefault)
		s.norm = tt.n
		if d := s.decide("web", req("GET "+tt.target)); d.Allowed != tt.allowed {
			t.Errorf("%s: GET %s: %+v, want allowed=%v", tt.n, tt.target, d, tt.allowed)
		}
	}
}

// A value Consul would not accept is refused, naming the field.
func TestNormalizationValidate(t *testing.T) {
	for _, n := range []Normalization{{}, {PathWithEscapedSlashesAction: EscapedSlashesRedirect, HeadersWithUnderscoresAction: UnderscoresDrop},
		{PathWithEscapedSlashesAction: EscapedSlashesDefault}} { // what Consul's getter gives for an empty field
		if err := n.Validate(); err != nil {
			t.Errorf("%s: %v", n, err)
		}
	}
	for field, n := range map[string]Normalization{
		"path_with_escaped_slashes_action": {PathWithEscapedSlashesAction: "unescape_and_forward"},
		"headers_with_underscores_action":  {HeadersWithUnderscoresAction: "DROP"},
	} {
		if err := n.Validate(); err == nil || !strings.Contains(err.Error(), field) {
			t.Errorf("%+v: %v, want an error naming %s", n, err, field)
		}
	}
}

func TestUnderscoredHeaders(t *testing.T) {
	h := http.Header{"X_user": {"admin"}, "X-User": {"web"}, "Accept": {"*/*"}, "A_b_c": {"1"}}
	if name := Underscored(h); name != "X_user" && name != "A_b_c" {
		t.Errorf("Underscored: %q", name)
	}
	if n := DropUnderscored(h); n != 2 || len(h) != 2 || h.Get("X-User") != "web" || Underscored(h) != "" {
		t.Errorf("DropUnderscored: %d, left %v", n, h)
	}
}
