package mesh

import (
	"crypto/tls"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

var (
	allowByDefault = aclDefault{allow: true, why: "ACLs off"}
	denyByDefault  = aclDefault{allow: false, why: "ACL default policy deny"}
)

// l7 is a service-intentions entry for api whose one source, web, has
// perms.
func l7(perms ...IntentionPermission) []IntentionsEntry {
	return []IntentionsEntry{{Destination: "api",
		Sources: []SourceIntention{{Name: "web", Permissions: perms}}}}
}

func allowHTTP(h IntentionHTTP) IntentionPermission {
	return IntentionPermission{Allow: true, HTTP: &h}
}

func mustCompile(t *testing.T, entries []IntentionsEntry, protocol string, def aclDefault) *rules {
	t.Helper()
	s, err := compile("api", entries, protocol, def)
	if err != nil {
		t.Fatalf("compile(api, %d entries, %s): %v", len(entries), protocol, err)
	}
	return s
}

// req is a request as a server receives it: "METHOD TARGET" and headers
// given as "Name: value" lines (a name given twice is sent twice).
func req(line string, headers ...string) *http.Request {
	method, target, _ := strings.Cut(line, " ")
	r := httptest.NewRequest(method, target, nil)
	for _, h := range headers {
		k, v, _ := strings.Cut(h, ": ")
		if strings.EqualFold(k, "Host") {
			r.Host = v
			continue
		}
		r.Header.Add(k, v)
	}
	return r
}

// Each kind of HTTP match of an L7 permission, evaluated as Envoy does for
// Consul's proxies: a request the permission matches is allowed by it, one
// it does not falls to the default (here deny).
func TestPermissionMatchKinds(t *testing.T) {
	hdr := func(h IntentionHeader) IntentionHTTP {
		return IntentionHTTP{Headers: []IntentionHeader{h}}
	}
	tests := []struct {
		name    string
		perm    IntentionHTTP
		request *http.Request
		want    bool
	}{
		{"path exact", IntentionHTTP{PathExact: "/a"}, req("GET /a"), true},
		{"path exact ignores the query", IntentionHTTP{PathExact: "/a"}, req("GET /a?b=c"), true},
		{"path exact, longer path", IntentionHTTP{PathExact: "/a"}, req("GET /a/"), false},
		{"path exact is case-sensitive", IntentionHTTP{PathExact: "/a"}, req("GET /A"), false},
		{"path exact sees unreserved escapes decoded", IntentionHTTP{PathExact: "/a"}, req("GET /%61"), true},
		{"path exact sees an escaped slash as sent", IntentionHTTP{PathExact: "/a/b"}, req("GET /a%2Fb"), false},
		{"path prefix", IntentionHTTP{PathPrefix: "/public/"}, req("GET /public/x"), true},
		{"path prefix, itself", IntentionHTTP{PathPrefix: "/public/"}, req("GET /public/"), true},
		{"path prefix is a string prefix", IntentionHTTP{PathPrefix: "/pub"}, req("GET /public"), true},
		{"path prefix, shorter path", IntentionHTTP{PathPrefix: "/public/"}, req("GET /public"), false},
		{"path prefix, dot segments removed", IntentionHTTP{PathPrefix: "/public/"}, req("GET /public/../admin"), false},
		{"path prefix, adjacent slashes kept", IntentionHTTP{PathPrefix: "/public/"}, req("GET //public/x"), false},
		{"path regex", IntentionHTTP{PathRegex: "/v[0-9]+/.*"}, req("GET /v12/users"), true},
		{"path regex matches the whole path", IntentionHTTP{PathRegex: "/v[0-9]+"}, req("GET /v1/x"), false},
		{"path regex is anchored at the start", IntentionHTTP{PathRegex: "/v[0-9]+"}, req("GET /x/v1"), false},
		{"path regex, alternation anchored as a whole", IntentionHTTP{PathRegex: "/a|/b"}, req("GET /b"), true},
		{"method", IntentionHTTP{Methods: []string{"GET", "HEAD"}}, req("HEAD /"), true},
		{"method not listed", IntentionHTTP{Methods: []string{"GET", "HEAD"}}, req("POST /"), false},
		{"method is case-sensitive", IntentionHTTP{Methods: []string{"GET"}}, req("get /"), false},

		{"header present", hdr(IntentionHeader{Name: "X-Debug", Present: true}), req("GET /", "x-debug: "), true},
		{"header present, absent", hdr(IntentionHeader{Name: "X-Debug", Present: true}), req("GET /"), false},
		{"header not present, absent", hdr(IntentionHeader{Name: "X-Debug", Present: true, Invert: true}), req("GET /"), true},
		{"header not present, present", hdr(IntentionHeader{Name: "X-Debug", Present: true, Invert: true}), req("GET /", "X-Debug: 1"), false},
		{"header exact", hdr(IntentionHeader{Name: "x-env", Exact: "prod"}), req("GET /", "X-Env: prod"), true},
		{"header exact, other value", hdr(IntentionHeader{Name: "x-env", Exact: "prod"}), req("GET /", "X-Env: Prod"), false},
		{"header exact, absent", hdr(IntentionHeader{Name: "x-env", Exact: "prod"}), req("GET /"), false},
		{"header exact, sent twice: values joined with a comma", hdr(IntentionHeader{Name: "X-Env", Exact: "a,b"}), req("GET /", "X-Env: a", "X-Env: b"), true},
		{"header not exact, other value", hdr(IntentionHeader{Name: "X-Env", Exact: "prod", Invert: true}), req("GET /", "X-Env: dev"), true},
		{"header not exact, same value", hdr(IntentionHeader{Name: "X-Env", Exact: "prod", Invert: true}), req("GET /", "X-Env: prod"), false},
		{"header not exact, absent: no match (Envoy)", hdr(IntentionHeader{Name: "X-Env", Exact: "prod", Invert: true}), req("GET /"), false},
		{"header exact, any case", hdr(IntentionHeader{Name: "X-Env", Exact: "prod", IgnoreCase: true}), req("GET /", "X-Env: PROD"), true},
		{"header prefix", hdr(IntentionHeader{Name: "User-Agent", Prefix: "curl/"}), req("GET /", "User-Agent: curl/8.5"), true},
		{"header prefix, other", hdr(IntentionHeader{Name: "User-Agent", Prefix: "curl/"}), req("GET /", "User-Agent: Go-http-client/1.1"), false},
		{"header prefix, any case", hdr(IntentionHeader{Name: "User-Agent", Prefix: "curl/", IgnoreCase: true}), req("GET /", "User-Agent: CURL/8"), true},
		{"header not prefix", hdr(IntentionHeader{Name: "User-Agent", Prefix: "curl/", Invert: true}), req("GET /", "User-Agent: wget"), true},
		{"header suffix", hdr(IntentionHeader{Name: "X-Tenant", Suffix: ".internal"}), req("GET /", "X-Tenant: a.internal"), true},
		{"header suffix, other", hdr(IntentionHeader{Name: "X-Tenant", Suffix: ".internal"}), req("GET /", "X-Tenant: a.example"), false},
		{"header suffix, any case", hdr(IntentionHeader{Name: "X-Tenant", Suffix: ".internal", IgnoreCase: true}), req("GET /", "X-Tenant: A.INTERNAL"), true},
		{"header contains", hdr(IntentionHeader{Name: "X-Tags", Contains: "beta"}), req("GET /", "X-Tags: a,beta,c"), true},
		{"header contains, other", hdr(IntentionHeader{Name: "X-Tags", Contains: "beta"}), req("GET /", "X-Tags: a,c"), false},
		{"header regex", hdr(IntentionHeader{Name: "X-Version", Regex: "v[0-9]+"}), req("GET /", "X-Version: v42"), true},
		{"header regex matches the whole value", hdr(IntentionHeader{Name: "X-Version", Regex: "v[0-9]+"}), req("GET /", "X-Version: v42-beta"), false},
		{"header not regex", hdr(IntentionHeader{Name: "X-Version", Regex: "v[0-9]+", Invert: true}), req("GET /", "X-Version: beta"), true},
		{":authority is the Host", hdr(IntentionHeader{Name: ":authority", Exact: "api.internal"}), req("GET /", "Host: api.internal"), true},
		{"host is :authority to Envoy", hdr(IntentionHeader{Name: "host", Present: true}), req("GET /", "Host: api.internal"), true},
		{"Host matched as :authority", hdr(IntentionHeader{Name: "Host", Exact: "admin.api"}), req("GET /", "Host: admin.api"), true},
		{":path of an absolute-form request is origin-form", hdr(IntentionHeader{Name: ":path", Prefix: "/admin"}), req("GET http://api/admin?x=1"), true},
		{":path is the normalized path and the query", hdr(IntentionHeader{Name: ":path", Exact: "/admin?x=1"}), req("GET /public/../%61dmin?x=1"), true},
		{":method", hdr(IntentionHeader{Name: ":method", Exact: "PUT"}), req("PUT /"), true},
		{":path has the query", hdr(IntentionHeader{Name: ":path", Exact: "/a?b=c"}), req("GET /a?b=c"), true},
		{":scheme", hdr(IntentionHeader{Name: ":scheme", Exact: "http"}), req("GET /"), true},

		{"all conditions, all met", IntentionHTTP{PathPrefix: "/public/", Methods: []string{"GET"},
			Headers: []IntentionHeader{{Name: "X-A", Present: true}, {Name: "X-B", Exact: "1"}}},
			req("GET /public/x", "X-A: ", "X-B: 1"), true},
		{"all conditions, one header not met", IntentionHTTP{PathPrefix: "/public/", Methods: []string{"GET"},
			Headers: []IntentionHeader{{Name: "X-A", Present: true}, {Name: "X-B", Exact: "1"}}},
			req("GET /public/x", "X-A: ", "X-B: 2"), false},
		{"all conditions, method not met", IntentionHTTP{PathPrefix: "/public/", Methods: []string{"GET"}},
			req("POST /public/x"), false},
		{"no condition matches any request", IntentionHTTP{}, req("DELETE /x"), true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := mustCompile(t, l7(allowHTTP(tt.perm)), "http", denyByDefault)
			got := s.decide("web", tt.request)
			if got.Allowed != tt.want {
				t.Fatalf("permission %s, request %s %s %v: got %+v, want allowed=%v",
					describeHTTP(&tt.perm), tt.request.Method, tt.request.RequestURI, tt.request.Header, got, tt.want)
			}
			wantBy := "intention web -> api, permission 1 (allow: " + describeHTTP(&tt.perm) + ")"
			if !tt.want {
				wantBy = "intention web -> api, no permission matches: default (ACL default policy deny: deny)"
			}
			if got.By != wantBy {
				t.Fatalf("permission %s, request %s %s: got By %q, want %q", describeHTTP(&tt.perm), tt.request.Method, tt.request.RequestURI, got.By, wantBy)
			}
		})
	}
}

// A request over TLS has the scheme https.
func TestSchemeOverTLS(t *testing.T) {
	perm := IntentionHTTP{Headers: []IntentionHeader{{Name: ":scheme", Exact: "https"}}}
	s := mustCompile(t, l7(allowHTTP(perm)), "http", denyByDefault)
	r := req("GET /")
	r.TLS = &tls.ConnectionState{}
	if got := s.decide("web", r); !got.Allowed {
		t.Fatalf("permission %s, request over TLS: got %+v, want allowed", describeHTTP(&perm), got)
	}
}

// The permissions of an L7 intention are tried in order, the first that
// matches decides, and a request none matches gets the default (xds/rbac.go
// removePermissionPrecedence), whichever it is.
func TestPermissionsInOrder(t *testing.T) {
	entries := []IntentionsEntry{{Destination: "api", Sources: []SourceIntention{{
		Name: "*", Permissions: []IntentionPermission{
			{HTTP: &IntentionHTTP{PathExact: "/public/admin"}},
			{Allow: true, HTTP: &IntentionHTTP{PathPrefix: "/public/", Methods: []string{"GET"}}},
			{HTTP: &IntentionHTTP{Methods: []string{"POST"}}},
		},
	}}}}
	tests := []struct {
		request *http.Request
		def     aclDefault
		want    Decision
	}{
		{req("GET /public/admin"), allowByDefault, Decision{Allowed: false, Intention: "* -> api", Permission: 1,
			By: "intention * -> api, permission 1 (deny: path /public/admin)"}},
		{req("GET /public/x"), denyByDefault, Decision{Allowed: true, Intention: "* -> api", Permission: 2,
			By: "intention * -> api, permission 2 (allow: GET path prefix /public/)"}},
		{req("POST /public/x"), allowByDefault, Decision{Allowed: false, Intention: "* -> api", Permission: 3,
			By: "intention * -> api, permission 3 (deny: POST)"}},
		{req("GET /private"), allowByDefault, Decision{Allowed: true, Intention: "* -> api", Default: true,
			By: "intention * -> api, no permission matches: default (ACLs off: allow)"}},
		{req("GET /private"), denyByDefault, Decision{Allowed: false, Intention: "* -> api", Default: true,
			By: "intention * -> api, no permission matches: default (ACL default policy deny: deny)"}},
	}
	for _, tt := range tests {
		s := mustCompile(t, entries, "http", tt.def)
		if got := s.decide("web", tt.request); got != tt.want {
			t.Errorf("decide(web, %s %s) with %s: got %+v, want %+v", tt.request.Method, tt.request.RequestURI, tt.def.why, got, tt.want)
		}
	}
}

// The intention that decides is the first whose source and destination
// match, in Consul's precedence: S -> D (9), * -> D (8), S -> * (6),
// * -> * (5).
func TestPrecedence(t *testing.T) {
	l4 := func(dest string, sources ...string) IntentionsEntry {
		e := IntentionsEntry{Destination: dest}
		for _, s := range sources {
			name, action, _ := strings.Cut(s, ":")
			e.Sources = append(e.Sources, SourceIntention{Name: name, Allow: action == "allow"})
		}
		return e
	}
	tests := []struct {
		name    string
		entries []IntentionsEntry
		source  string
		want    string // Decision.By
	}{
		{"none", nil, "web", "default (ACLs off: allow)"},
		{"another destination's", []IntentionsEntry{l4("db", "web:deny")}, "web", "default (ACLs off: allow)"},
		{"another source's", []IntentionsEntry{l4("api", "admin:deny")}, "web", "default (ACLs off: allow)"},
		{"exact", []IntentionsEntry{l4("api", "web:deny")}, "web", "intention web -> api (deny)"},
		{"exact source beats wildcard source", []IntentionsEntry{l4("api", "*:deny", "web:allow")}, "web", "intention web -> api (allow)"},
		{"wildcard source for the others", []IntentionsEntry{l4("api", "*:deny", "web:allow")}, "admin", "intention * -> api (deny)"},
		{"exact destination beats wildcard destination", []IntentionsEntry{l4("*", "web:deny"), l4("api", "web:allow")}, "web", "intention web -> api (allow)"},
		{"exact destination and wildcard source beat wildcard destination and exact source",
			[]IntentionsEntry{l4("*", "web:allow"), l4("api", "*:deny")}, "web", "intention * -> api (deny)"},
		{"wildcard destination and exact source beat both wildcards",
			[]IntentionsEntry{l4("*", "*:deny", "web:allow")}, "web", "intention web -> * (allow)"},
		{"both wildcards last", []IntentionsEntry{l4("*", "*:deny", "web:allow")}, "admin", "intention * -> * (deny)"},
		{"all four", []IntentionsEntry{l4("*", "*:deny", "web:deny"), l4("api", "*:deny", "web:allow")}, "web", "intention web -> api (allow)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := mustCompile(t, tt.entries, "tcp", allowByDefault)
			if got := s.decide(tt.source, nil); got.By != tt.want {
				t.Fatalf("decide(%s -> api): got %q, want %q", tt.source, got.By, tt.want)
			}
		})
	}
}

// Sources that name a peer or a sameness group, or another namespace or
// partition, are never this datacenter's callers.
func TestForeignSourcesNeverMatch(t *testing.T) {
	entries := []IntentionsEntry{{Destination: "api", Sources: []SourceIntention{
		{Name: "web", Peer: "other"},
		{Name: "*", SamenessGroup: "group"},
	}}, {Destination: "*", Namespace: "team", Sources: []SourceIntention{
		{Name: "web"},
	}}}
	s := mustCompile(t, entries, "tcp", allowByDefault)
	if got := s.decide("web", nil); got.By != "default (ACLs off: allow)" {
		t.Fatalf("decide(web -> api) with only foreign sources: got %+v, want the default", got)
	}
}

// An L7 intention answers an L4 question with deny (as `consul intention
// check` and the agent's authorize endpoint do), marked PerRequest, and a
// destination whose protocol is not HTTP-like denies whatever the request.
func TestL7IntentionOutsideHTTP(t *testing.T) {
	entries := l7(allowHTTP(IntentionHTTP{PathPrefix: "/"}))
	s := mustCompile(t, entries, "http", allowByDefault)
	got := s.decide("web", nil)
	want := Decision{Intention: "web -> api", PerRequest: true,
		By: "intention web -> api has L7 permissions, which decide per request (an L4 check is denied, as consul intention check answers)"}
	if got != want {
		t.Fatalf("decide(web -> api, no request) with an L7 intention: got %+v, want %+v", got, want)
	}
	for _, protocol := range []string{"tcp", ""} {
		s := mustCompile(t, entries, protocol, allowByDefault)
		got := s.decide("web", req("GET /x"))
		want := Decision{Intention: "web -> api", By: "intention web -> api has L7 permissions but api's protocol is tcp, not http (deny)"}
		if got != want {
			t.Fatalf("decide(web -> api, GET /x) with an L7 intention and protocol %q: got %+v, want %+v", protocol, got, want)
		}
	}
	for _, protocol := range []string{"http2", "grpc"} {
		s := mustCompile(t, entries, protocol, denyByDefault)
		if got := s.decide("web", req("GET /x")); !got.Allowed || got.Permission != 1 {
			t.Fatalf("decide(web -> api, GET /x) with protocol %s: got %+v, want allowed by permission 1", protocol, got)
		}
	}
}

// A JWT requirement is not verified: a request where it applies gets the
// default, as Envoy gives one without a valid token; L4 questions and
// TCP destinations ignore it, as Consul does.
func TestJWTRequirementGivesTheDefault(t *testing.T) {
	entries := []IntentionsEntry{{Destination: "api", JWT: true,
		Sources: []SourceIntention{{Name: "web", Allow: true}}}}
	if got := mustCompile(t, entries, "http", denyByDefault).decide("web", req("GET /")); got.Allowed ||
		got.By != "intention web -> api requires a JWT, not verified here: default (ACL default policy deny: deny)" {
		t.Fatalf("decide(web -> api, GET /) under an entry requiring a JWT: got %+v, want the default (deny)", got)
	}
	if got := mustCompile(t, entries, "http", denyByDefault).decide("web", nil); !got.Allowed {
		t.Fatalf("decide(web -> api, no request) under an entry requiring a JWT: got %+v, want allowed by the intention", got)
	}
	if got := mustCompile(t, entries, "tcp", denyByDefault).decide("web", req("GET /")); !got.Allowed {
		t.Fatalf("decide(web -> api, GET /) to a TCP destination under an entry requiring a JWT: got %+v, want allowed by the intention", got)
	}

	perms := l7(IntentionPermission{JWT: true, HTTP: &IntentionHTTP{PathPrefix: "/admin"}},
		IntentionPermission{HTTP: &IntentionHTTP{PathPrefix: "/"}})
	got := mustCompile(t, perms, "http", allowByDefault).decide("web", req("GET /admin/x"))
	want := Decision{Allowed: true, Default: true, Intention: "web -> api", Permission: 1,
		By: "intention web -> api, permission 1 (deny: path prefix /admin) requires a JWT, not verified here: default (ACLs off: allow)"}
	if got != want {
		t.Fatalf("decide(web -> api, GET /admin/x), permission 1 requiring a JWT: got %+v, want %+v", got, want)
	}
}

// A regular expression that does not compile fails the whole set, naming
// the intention and the permission, as Envoy refuses such a configuration.
func TestBadRegexFailsCompile(t *testing.T) {
	_, err := compile("api", l7(allowHTTP(IntentionHTTP{PathExact: "/"}), allowHTTP(IntentionHTTP{PathRegex: "/(["})), "http", allowByDefault)
	if err == nil || !strings.Contains(err.Error(), "intention web -> api, permission 2: PathRegex \"/([\"") {
		t.Fatalf("compile with PathRegex \"/([\" in permission 2: got error %v, want one naming the intention, the permission and the regex", err)
	}
}

// Authorize is on every request's path: its evaluation allocates nothing
// for a request with single-valued headers.
func TestDecideAllocatesNothing(t *testing.T) {
	entries := l7(IntentionPermission{HTTP: &IntentionHTTP{
		PathRegex: "/admin/.*", Headers: []IntentionHeader{{Name: "X-Env", Regex: "prod|staging"}}}},
		allowHTTP(IntentionHTTP{PathPrefix: "/public/", Methods: []string{"GET"},
			Headers: []IntentionHeader{{Name: "X-Env", Exact: "prod"}, {Name: ":authority", Suffix: ".internal"}}}))
	s := mustCompile(t, entries, "http", denyByDefault)
	r := req("GET /public/x?y=1", "X-Env: prod", "Host: api.internal")
	var d Decision
	allocs := testing.AllocsPerRun(100, func() { d = s.decide("web", r) })
	if !d.Allowed || d.Permission != 2 || allocs != 0 {
		t.Fatalf("decide(web, GET /public/x): got %+v with %.0f allocations, want allowed by permission 2 with none", d, allocs)
	}
}

// BenchmarkDecide is the cost Authorize adds to a request: an L7
// intention of three permissions, the request matching the second.
func BenchmarkDecide(b *testing.B) {
	entries := l7(IntentionPermission{HTTP: &IntentionHTTP{PathRegex: "/admin/.*"}},
		allowHTTP(IntentionHTTP{PathPrefix: "/public/", Methods: []string{"GET", "HEAD"},
			Headers: []IntentionHeader{{Name: "X-Env", Exact: "prod"}}}),
		IntentionPermission{HTTP: &IntentionHTTP{Methods: []string{"POST"}}})
	s, err := compile("api", entries, "http", denyByDefault)
	if err != nil {
		b.Fatal(err)
	}
	r := req("GET /public/index.html", "X-Env: prod")
	b.ReportAllocs()
	for b.Loop() {
		if d := s.decide("web", r); !d.Allowed {
			b.Fatalf("decide(web, GET /public/index.html): got %+v, want allowed", d)
		}
	}
}
