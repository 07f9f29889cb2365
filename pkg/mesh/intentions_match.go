package mesh

import (
	"fmt"
	"net/http"
	"regexp"
	"slices"
	"strings"
)

// Decision is an answer of Authorize or Check: may a caller reach the
// destination, and what decided. The zero Decision is a denial by nothing.
type Decision struct {
	// Allowed is the answer.
	Allowed bool `json:"allowed"`
	// By says in words what decided, e.g. "intention web -> api (allow)",
	// "intention * -> api, permission 2 (deny: POST)", "default (ACLs off:
	// allow)".
	By string `json:"by"`
	// Intention is the intention that decided, "SOURCE -> DESTINATION" as
	// Consul writes it ("*" for a wildcard); empty when none matched the
	// caller.
	Intention string `json:"intention,omitempty"`
	// Permission is the 1-based index, in the intention's Permissions, of
	// the L7 permission that decided; 0 when none did.
	Permission int `json:"permission,omitempty"`
	// Default is set when the default decided: no intention matched the
	// caller, or one with L7 permissions matched but none of its
	// permissions matched the request.
	Default bool `json:"default,omitempty"`
	// PerRequest is set when the question had no request (L4) and the
	// intention that matched has L7 permissions: Allowed is then false, as
	// Consul answers an L4 check (`consul intention check`, the agent's
	// authorize endpoint), while for a request the permissions decide on
	// its method, path and headers.
	PerRequest bool `json:"perRequest,omitempty"`
}

// rules are one destination's intentions compiled for Authorize: the
// sources that may match a caller, in Consul's precedence, each with the
// decisions it can give already worded. Immutable once built.
type rules struct {
	destination string
	// Sources of the destination's own entry, by name (precedence 9),
	// then its "*" source (8); sources of the "*" entry by name (6),
	// then its "*" source (5): the order in which Consul's precedence
	// (agent/structs/config_entry_intentions.go computeIntentionPrecedence)
	// ranks what can match one caller.
	exact, wildcard       map[string]*sourceRule
	exactAny, wildcardAny *sourceRule
	// http is whether the destination's protocol is HTTP-like (http,
	// http2, grpc: structs.IsProtocolHTTPLike), the only case in which
	// Consul's proxies evaluate L7 permissions.
	http     bool
	protocol string
	// def is the decision when no intention matches.
	def Decision
	// norm is how a request's path is normalized before it is judged
	// (Normalization.Path): the path Envoy's url_path matcher sees.
	norm Normalization
}

// sourceRule is one source of a service-intentions entry.
type sourceRule struct {
	name string // "web -> api"
	// l4 is the decision of an intention without permissions; for one with
	// permissions, the answer to an L4 question (deny, PerRequest).
	l4 Decision
	// jwt, when set, is the decision for a request: the entry requires a
	// JWT, which the sidecar does not verify.
	jwt *Decision
	// perms are the L7 permissions in order; notHTTP is their decision
	// when the destination's protocol is not HTTP-like, noMatch when none
	// matches the request.
	perms            []permission
	notHTTP, noMatch Decision
}

// permission is one L7 permission: its HTTP match and its decision.
type permission struct {
	// decision is the permission's; when it requires a JWT, the default
	// (the sidecar verifies no token, and Envoy, finding none, lets the
	// request fall to the default: xds/rbac.go rbacPermission.Flatten
	// ANDs the JWT to the permission, while later permissions exclude
	// only its HTTP match).
	decision Decision

	methods    []string // empty: any
	pathExact  string
	pathPrefix string
	pathRegex  *regexp.Regexp
	headers    []headerMatch
}

// headerMatch is one header condition of a permission, as Envoy's
// HeaderMatcher evaluates it.
type headerMatch struct {
	name     string // canonical, or a pseudo-header (":authority")
	kind     headerKind
	value    string
	re       *regexp.Regexp
	invert   bool
	foldCase bool
}

type headerKind int

const (
	headerPresent headerKind = iota
	headerExact
	headerPrefix
	headerSuffix
	headerContains
	headerRegex
)

// decide answers for a caller named source and, for an L7 question, the
// request r (nil: an L4 question). It does no I/O and allocates only to
// join a header sent more than once.
func (s *rules) decide(source string, r *http.Request) Decision {
	src := s.match(source)
	if src == nil {
		return s.def
	}
	if len(src.perms) == 0 {
		// A JWT applies only to requests of an HTTP-like destination
		// (xds/rbac.go intentionToIntermediateRBACForm: isHTTP &&
		// ixn.JWT != nil); L4 checks ignore it (connect_auth.go).
		if src.jwt != nil && s.http && r != nil {
			return *src.jwt
		}
		return src.l4
	}
	switch {
	case !s.http:
		return src.notHTTP
	case r == nil:
		return src.l4
	case src.jwt != nil:
		return *src.jwt
	}
	path := s.norm.judged(r) // once for every permission's path and :path rules
	for i := range src.perms {
		p := &src.perms[i]
		if p.matches(r, path) {
			return p.decision
		}
	}
	return src.noMatch
}

// match is the intention that decides for a caller: the first, in
// precedence, whose source is the caller or "*" (connect_auth.go
// ConnectAuthorize; xds/rbac.go removeSameSourceIntentions keeps only the
// highest one of a source).
func (s *rules) match(source string) *sourceRule {
	if r := s.exact[source]; r != nil {
		return r
	}
	if s.exactAny != nil {
		return s.exactAny
	}
	if r := s.wildcard[source]; r != nil {
		return r
	}
	return s.wildcardAny
}

// with is d's answer and wording for what another decision's intention
// and permission led to.
func (d Decision) with(by string, from Decision) Decision {
	d.By = by
	d.Intention = from.Intention
	d.Permission = from.Permission
	return d
}

// matches reports whether r, whose path as judged is path (requestPath),
// meets every condition of the permission (xds/rbac.go convertPermission:
// the path, each header, the methods, ANDed).
func (p *permission) matches(r *http.Request, path string) bool {
	if len(p.methods) > 0 && !slices.Contains(p.methods, r.Method) {
		return false
	}
	if p.pathExact != "" || p.pathPrefix != "" || p.pathRegex != nil {
		switch {
		case p.pathExact != "" && path != p.pathExact,
			p.pathPrefix != "" && !strings.HasPrefix(path, p.pathPrefix),
			p.pathRegex != nil && !p.pathRegex.MatchString(path):
			return false
		}
	}
	for i := range p.headers {
		if !p.headers[i].matches(r, path) {
			return false
		}
	}
	return true
}

// RawPath is r's path as the client wrote it, without the query: from its
// request target when that is origin-form (a backslash stays a
// backslash, where the URL's escaped path turns it into %5C), else the
// URL's escaped path.
func RawPath(r *http.Request) string {
	if t := r.RequestURI; strings.HasPrefix(t, "/") {
		if i := strings.IndexByte(t, '?'); i >= 0 {
			t = t[:i]
		}
		return t
	}
	if r.URL == nil {
		return ""
	}
	return r.URL.EscapedPath()
}

// matches is Envoy's HeaderUtility::matchHeaders: an absent header matches
// only an inverted Present; the values of a header sent more than once are
// joined with ","; the result is inverted by Invert.
func (h *headerMatch) matches(r *http.Request, path string) bool {
	v, ok := headerValue(r, path, h.name)
	if !ok {
		return h.invert && h.kind == headerPresent
	}
	var m bool
	switch h.kind {
	case headerPresent:
		m = true
	case headerRegex:
		m = h.re.MatchString(v)
	case headerExact:
		m = v == h.value || h.foldCase && strings.EqualFold(v, h.value)
	case headerPrefix:
		m = strings.HasPrefix(v, h.value) || h.foldCase && len(v) >= len(h.value) && strings.EqualFold(v[:len(h.value)], h.value)
	case headerSuffix:
		m = strings.HasSuffix(v, h.value) || h.foldCase && len(v) >= len(h.value) && strings.EqualFold(v[len(v)-len(h.value):], h.value)
	case headerContains:
		m = strings.Contains(v, h.value) || h.foldCase && strings.Contains(strings.ToLower(v), strings.ToLower(h.value))
	}
	return m != h.invert
}

// headerValue is the value Envoy matches for header name: the pseudo-
// headers from the request line, and Host as :authority (Envoy's header
// map answers a lookup of "host" with :authority), which net/http keeps
// out of r.Header; else every value of the header joined with ",". :path
// is path, the path as judged (normalized, origin-form), with the query,
// also when the request named an absolute URL.
func headerValue(r *http.Request, path, name string) (string, bool) {
	switch name {
	case ":authority", "Host":
		return r.Host, r.Host != ""
	case ":method":
		return r.Method, true
	case ":path":
		if r.URL != nil && r.URL.RawQuery != "" {
			return path + "?" + r.URL.RawQuery, true
		}
		return path, true
	case ":scheme":
		if r.TLS != nil {
			return "https", true
		}
		return "http", true
	}
	vs := r.Header[name]
	switch len(vs) {
	case 0:
		return "", false
	case 1:
		return vs[0], true
	}
	return strings.Join(vs, ","), true
}

// wildcard is Consul's name for any service.
const wildcard = "*"

// fullMatch compiles an Envoy safe_regex (RE2, matched against the whole
// value) as a Go regexp, whose syntax is RE2's.
func fullMatch(re string) (*regexp.Regexp, error) {
	return regexp.Compile(`^(?:` + re + `)$`)
}

// aclDefault is the decision when no intention matches, as the agent
// computes it (acl.Authorizer IntentionDefaultAllow: allow when ACLs are
// off, else the ACL default policy).
type aclDefault struct {
	allow bool
	why   string // "ACLs off", "ACL default policy deny"
}

func (d aclDefault) decision() Decision {
	word := "deny"
	if d.allow {
		word = "allow"
	}
	return Decision{Allowed: d.allow, By: "default (" + d.why + ": " + word + ")", Default: true}
}

// compile builds the rules of destination from every service-intentions
// entry (those of other destinations are skipped), the destination's
// protocol and the default. It fails on what Consul's proxies would
// refuse too: a regular expression that does not compile.
func compile(destination string, entries []IntentionsEntry, protocol string, def aclDefault) (*rules, error) {
	s := &rules{
		destination: destination,
		exact:       map[string]*sourceRule{},
		wildcard:    map[string]*sourceRule{},
		protocol:    protocol,
		http:        protocol == "http" || protocol == "http2" || protocol == "grpc",
		def:         def.decision(),
	}
	for i := range entries {
		e := &entries[i]
		if (e.Destination != destination && e.Destination != wildcard) || !defaultTenancy(e.Namespace, e.Partition) {
			continue
		}
		byName := s.exact
		if e.Destination != destination {
			byName = s.wildcard
		}
		for j := range e.Sources {
			src := &e.Sources[j]
			if src.Peer != "" || src.SamenessGroup != "" || !defaultTenancy(src.Namespace, src.Partition) {
				continue // never a caller of this datacenter's default partition and namespace
			}
			r, err := s.compileSource(e, src)
			if err != nil {
				return nil, err
			}
			switch {
			case src.Name != wildcard:
				byName[src.Name] = r
			case e.Destination == destination:
				s.exactAny = r
			default:
				s.wildcardAny = r
			}
		}
	}
	return s, nil
}

// defaultTenancy is whether a namespace and partition are the only ones
// Consul CE has.
func defaultTenancy(ns, partition string) bool {
	return (ns == "" || ns == "default") && (partition == "" || partition == "default")
}

func (s *rules) compileSource(e *IntentionsEntry, src *SourceIntention) (*sourceRule, error) {
	name := src.Name + " -> " + e.Destination
	r := &sourceRule{name: name}
	if e.JWT {
		d := s.def.with("intention "+name+" requires a JWT, not verified here: "+s.def.By, Decision{Intention: name})
		r.jwt = &d
	}
	if len(src.Permissions) == 0 {
		allow := src.Allow
		r.l4 = Decision{Allowed: allow, By: fmt.Sprintf("intention %s (%s)", name, actionWord(allow)), Intention: name}
		return r, nil
	}
	r.l4 = Decision{By: "intention " + name + " has L7 permissions, which decide per request (an L4 check is denied, as consul intention check answers)",
		Intention: name, PerRequest: true}
	// xds/rbac.go intentionToIntermediateRBACForm: "In case L7 intentions
	// slip through to here, treat them as deny intentions."
	r.notHTTP = Decision{By: fmt.Sprintf("intention %s has L7 permissions but %s's protocol is %s, not http (deny)", name, e.Destination, orTCP(s.protocol)),
		Intention: name}
	r.noMatch = s.def.with("intention "+name+", no permission matches: "+s.def.By, Decision{Intention: name})
	for i := range src.Permissions {
		p := &src.Permissions[i]
		cp, err := compilePermission(p)
		if err != nil {
			return nil, fmt.Errorf("intention %s, permission %d: %w", name, i+1, err)
		}
		allow := p.Allow
		cp.decision = Decision{Allowed: allow, Intention: name, Permission: i + 1,
			By: fmt.Sprintf("intention %s, permission %d (%s: %s)", name, i+1, actionWord(allow), describeHTTP(p.HTTP))}
		if p.JWT {
			cp.decision = s.def.with(cp.decision.By+" requires a JWT, not verified here: "+s.def.By, cp.decision)
		}
		r.perms = append(r.perms, cp)
	}
	return r, nil
}

func compilePermission(p *IntentionPermission) (permission, error) {
	var cp permission
	h := p.HTTP
	if h == nil {
		return cp, nil // Consul refuses it; convertPermission makes it match anything
	}
	cp.methods = h.Methods
	cp.pathExact, cp.pathPrefix = h.PathExact, h.PathPrefix
	switch {
	case h.PathExact != "":
		cp.pathPrefix = ""
	case h.PathPrefix != "":
	case h.PathRegex != "":
		re, err := fullMatch(h.PathRegex)
		if err != nil {
			return cp, fmt.Errorf("PathRegex %q: %w", h.PathRegex, err)
		}
		cp.pathRegex = re
	}
	for _, hp := range h.Headers {
		m := headerMatch{name: headerName(hp.Name), invert: hp.Invert, foldCase: hp.IgnoreCase}
		switch { // the order of convertPermission's switch
		case hp.Exact != "":
			m.kind, m.value = headerExact, hp.Exact
		case hp.Regex != "":
			re, err := fullMatch(hp.Regex)
			if err != nil {
				return cp, fmt.Errorf("header %s regex %q: %w", hp.Name, hp.Regex, err)
			}
			m.kind, m.re = headerRegex, re
		case hp.Prefix != "":
			m.kind, m.value = headerPrefix, hp.Prefix
		case hp.Suffix != "":
			m.kind, m.value = headerSuffix, hp.Suffix
		case hp.Contains != "":
			m.kind, m.value = headerContains, hp.Contains
		case hp.Present:
			m.kind = headerPresent
		default:
			continue // convertPermission: "skip this impossible situation"
		}
		cp.headers = append(cp.headers, m)
	}
	return cp, nil
}

// headerName is name as r.Header keys it, or a pseudo-header as is.
func headerName(name string) string {
	if strings.HasPrefix(name, ":") {
		return strings.ToLower(name)
	}
	return http.CanonicalHeaderKey(name)
}

// describeHTTP words a permission's match: "GET,HEAD path prefix /public/
// header X-Debug present".
func describeHTTP(h *IntentionHTTP) string {
	if h == nil {
		return "any request"
	}
	var parts []string
	if len(h.Methods) > 0 {
		parts = append(parts, strings.Join(h.Methods, ","))
	}
	switch {
	case h.PathExact != "":
		parts = append(parts, "path "+h.PathExact)
	case h.PathPrefix != "":
		parts = append(parts, "path prefix "+h.PathPrefix)
	case h.PathRegex != "":
		parts = append(parts, "path ~ "+h.PathRegex)
	}
	for _, hp := range h.Headers {
		not := ""
		if hp.Invert {
			not = "not "
		}
		switch {
		case hp.Exact != "":
			parts = append(parts, fmt.Sprintf("header %s %s%q", hp.Name, eq(hp.Invert), hp.Exact))
		case hp.Regex != "":
			parts = append(parts, fmt.Sprintf("header %s %s~ %q", hp.Name, not, hp.Regex))
		case hp.Prefix != "":
			parts = append(parts, fmt.Sprintf("header %s %sprefix %q", hp.Name, not, hp.Prefix))
		case hp.Suffix != "":
			parts = append(parts, fmt.Sprintf("header %s %ssuffix %q", hp.Name, not, hp.Suffix))
		case hp.Contains != "":
			parts = append(parts, fmt.Sprintf("header %s %scontains %q", hp.Name, not, hp.Contains))
		case hp.Present:
			parts = append(parts, fmt.Sprintf("header %s %spresent", hp.Name, not))
		}
	}
	if len(parts) == 0 {
		return "any request"
	}
	return strings.Join(parts, " ")
}

func eq(invert bool) string {
	if invert {
		return "!= "
	}
	return "= "
}

func actionWord(allow bool) string {
	if allow {
		return "allow"
	}
	return "deny"
}

func orTCP(protocol string) string {
	if protocol == "" {
		return "tcp"
	}
	return protocol
}
