package mesh

import (
	"errors"
	"fmt"
	"net/url"
	"strings"
)

// SPIFFEID is the identity of a Consul service as its leaf certificate
// carries it, in a URI SAN:
//
//	spiffe://<trust-domain>/ns/<namespace>/dc/<datacenter>/svc/<service>
//	spiffe://<trust-domain>/ap/<partition>/ns/<namespace>/dc/<datacenter>/svc/<service>
//
// The second form is Consul Enterprise's, for a partition other than
// "default". A SPIFFEID is a value, safe to copy and compare; the zero value
// is no identity.
type SPIFFEID struct {
	// TrustDomain is the URI's host: "<cluster-id>.consul" for Consul's
	// built-in CA. Compare it without regard to case.
	TrustDomain string
	// Namespace is never empty in a parsed ID ("default" in Consul CE).
	Namespace string
	// Partition is "default" when the URI has no /ap/ segment.
	Partition string
	// Datacenter is the one the certificate was issued in.
	Datacenter string
	// Service is the service name.
	Service string
}

// ErrNotServiceID marks a URI that is not a Consul service SPIFFE ID: another
// scheme, another kind of Consul ID (an agent's, a mesh gateway's, a CA's
// signing ID), or a malformed one. Errors wrapping it say which URI.
var ErrNotServiceID = errors.New("not a Consul service SPIFFE ID")

// ParseSPIFFE parses a Consul service SPIFFE ID, as found in a certificate's
// URIs. Path segments may be percent-encoded, as Consul allows; the
// partition defaults to "default". Anything else (an agent's or a gateway's
// ID, a query, a fragment, a port, user info, an empty or dot segment) is
// refused with an error wrapping ErrNotServiceID.
func ParseSPIFFE(u *url.URL) (SPIFFEID, error) {
	if u == nil {
		return SPIFFEID{}, fmt.Errorf("%w: no URI", ErrNotServiceID)
	}
	bad := func(why string) (SPIFFEID, error) {
		return SPIFFEID{}, fmt.Errorf("%w: %q: %s", ErrNotServiceID, u.String(), why)
	}
	switch {
	case !strings.EqualFold(u.Scheme, "spiffe"):
		return bad("scheme is not spiffe")
	case u.Opaque != "":
		return bad("not a hierarchical URI")
	case u.User != nil:
		return bad("has user info")
	case u.Host == "":
		return bad("no trust domain")
	case u.Port() != "" || strings.HasSuffix(u.Host, ":"):
		return bad("trust domain has a port")
	case u.RawQuery != "" || u.ForceQuery:
		return bad("has a query")
	case u.Fragment != "":
		return bad("has a fragment")
	}
	segs := strings.Split(u.EscapedPath(), "/")
	// An absolute path splits into a leading "" and its segments.
	if len(segs) == 0 || segs[0] != "" {
		return bad("no path")
	}
	segs = segs[1:]
	id := SPIFFEID{TrustDomain: u.Host, Partition: "default"}
	if len(segs) == 8 && segs[0] == "ap" {
		id.Partition = segs[1]
		segs = segs[2:]
	}
	if len(segs) != 6 || segs[0] != "ns" || segs[2] != "dc" || segs[4] != "svc" {
		return bad("path is not [/ap/<partition>]/ns/<namespace>/dc/<datacenter>/svc/<service>")
	}
	id.Namespace, id.Datacenter, id.Service = segs[1], segs[3], segs[5]
	for _, f := range []*string{&id.Partition, &id.Namespace, &id.Datacenter, &id.Service} {
		v, err := url.PathUnescape(*f)
		if err != nil {
			return bad("bad escape in " + *f)
		}
		if v == "" || v == "." || v == ".." || strings.Contains(v, "/") {
			return bad(fmt.Sprintf("segment %q is empty, a dot segment or holds a slash", v))
		}
		*f = v
	}
	return id, nil
}

// ParseSPIFFEString is ParseSPIFFE for a URI in a string.
func ParseSPIFFEString(s string) (SPIFFEID, error) {
	u, err := url.Parse(s)
	if err != nil {
		return SPIFFEID{}, fmt.Errorf("%w: %w", ErrNotServiceID, err)
	}
	return ParseSPIFFE(u)
}

// URI is the ID as Consul writes it in a certificate: no /ap/ segment for
// the "default" (or empty) partition, namespace "default" when empty, each
// segment percent-encoded where it needs to be.
func (s SPIFFEID) URI() *url.URL {
	ns := s.Namespace
	if ns == "" {
		ns = "default"
	}
	var plain, escaped []string
	add := func(segs ...string) {
		for _, seg := range segs {
			plain = append(plain, seg)
			escaped = append(escaped, url.PathEscape(seg))
		}
	}
	if s.Partition != "" && s.Partition != "default" {
		add("ap", s.Partition)
	}
	add("ns", ns, "dc", s.Datacenter, "svc", s.Service)
	return &url.URL{
		Scheme:  "spiffe",
		Host:    s.TrustDomain,
		Path:    "/" + strings.Join(plain, "/"),
		RawPath: "/" + strings.Join(escaped, "/"),
	}
}

// String is URI as a string, the form logs and status pages show.
func (s SPIFFEID) String() string { return s.URI().String() }

// sameTrustDomain reports whether two trust domains are the same: host
// names, compared without regard to case, as Consul compares them.
func sameTrustDomain(a, b string) bool { return a != "" && strings.EqualFold(a, b) }
