package mesh_test

import (
	"errors"
	"net/url"
	"testing"

	"github.com/sidecar-mesh/sidecar/pkg/mesh"
)

func TestParseSPIFFE(t *testing.T) {
	const td = "11111111-2222-3333-4444-555555555555.consul"
	for _, tc := range []struct {
		uri  string
		want mesh.SPIFFEID
		// canon is String of the result when it differs from uri.
		canon string
	}{
		{uri: "spiffe://" + td + "/ns/default/dc/dc1/svc/web",
			want: mesh.SPIFFEID{TrustDomain: td, Namespace: "default", Partition: "default", Datacenter: "dc1", Service: "web"}},
		{uri: "spiffe://" + td + "/ap/team-a/ns/payments/dc/eu-west/svc/api",
			want: mesh.SPIFFEID{TrustDomain: td, Namespace: "payments", Partition: "team-a", Datacenter: "eu-west", Service: "api"}},
		// Consul writes no /ap/ for the default partition.
		{uri: "spiffe://" + td + "/ap/default/ns/default/dc/dc1/svc/web",
			want:  mesh.SPIFFEID{TrustDomain: td, Namespace: "default", Partition: "default", Datacenter: "dc1", Service: "web"},
			canon: "spiffe://" + td + "/ns/default/dc/dc1/svc/web"},
		// Escaped segments are unescaped, as Consul's parser does.
		{uri: "spiffe://" + td + "/ns/default/dc/dc1/svc/we%62",
			want:  mesh.SPIFFEID{TrustDomain: td, Namespace: "default", Partition: "default", Datacenter: "dc1", Service: "web"},
			canon: "spiffe://" + td + "/ns/default/dc/dc1/svc/web"},
		{uri: "spiffe://" + td + "/ns/default/dc/dc1/svc/a%20b",
			want: mesh.SPIFFEID{TrustDomain: td, Namespace: "default", Partition: "default", Datacenter: "dc1", Service: "a b"}},
		{uri: "SPIFFE://" + td + "/ns/default/dc/dc1/svc/web",
			want:  mesh.SPIFFEID{TrustDomain: td, Namespace: "default", Partition: "default", Datacenter: "dc1", Service: "web"},
			canon: "spiffe://" + td + "/ns/default/dc/dc1/svc/web"},
	} {
		got, err := mesh.ParseSPIFFEString(tc.uri)
		if err != nil || got != tc.want {
			t.Errorf("ParseSPIFFEString(%q) = %+v, %v; want %+v, nil", tc.uri, got, err, tc.want)
			continue
		}
		canon := tc.canon
		if canon == "" {
			canon = tc.uri
		}
		if s := got.String(); s != canon {
			t.Errorf("ParseSPIFFEString(%q).String() = %q, want %q", tc.uri, s, canon)
		}
		if again, err := mesh.ParseSPIFFE(got.URI()); err != nil || again != got {
			t.Errorf("ParseSPIFFE(%q.URI()) = %+v, %v; want %+v, nil (a round trip)", tc.uri, again, err, got)
		}
	}
}

func TestParseSPIFFERefuses(t *testing.T) {
	const td = "td.consul"
	for _, uri := range []string{
		"",
		"https://" + td + "/ns/default/dc/dc1/svc/web",
		"spiffe:/ns/default/dc/dc1/svc/web",
		"spiffe:opaque",
		"spiffe:///ns/default/dc/dc1/svc/web",
		"spiffe://user@" + td + "/ns/default/dc/dc1/svc/web",
		"spiffe://" + td + ":8443/ns/default/dc/dc1/svc/web",
		"spiffe://" + td + "/ns/default/dc/dc1/svc/web?x=1",
		"spiffe://" + td + "/ns/default/dc/dc1/svc/web?",
		"spiffe://" + td + "/ns/default/dc/dc1/svc/web#f",
		"spiffe://" + td, // the CA's signing ID
		"spiffe://" + td + "/agent/client/dc/dc1/id/node-1", // an agent
		"spiffe://" + td + "/agent/server/dc/dc1",           // a server
		"spiffe://" + td + "/gateway/mesh/dc/dc1",           // a mesh gateway
		"spiffe://" + td + "/ns/default/dc/dc1/svc/web/",    // trailing slash
		"spiffe://" + td + "/ns/default/dc/dc1/svc/",        // empty service
		"spiffe://" + td + "/ns//dc/dc1/svc/web",            // empty namespace
		"spiffe://" + td + "/ns/default/dc/dc1/svc/..",      // dot segment
		"spiffe://" + td + "/ns/default/dc/dc1/svc/a%2Fb",   // a slash in a name
		"spiffe://" + td + "/ns/default/dc/dc1/svc/a%zz",    // a bad escape
		"spiffe://" + td + "/ap/p/ap/q/ns/default/dc/dc1/svc/web",
		"spiffe://" + td + "/ns/default/svc/web/dc/dc1",
		"spiffe://" + td + "/ap/p/ns/default/dc/dc1",
	} {
		got, err := mesh.ParseSPIFFEString(uri)
		if err == nil || !errors.Is(err, mesh.ErrNotServiceID) {
			t.Errorf("ParseSPIFFEString(%q) = %+v, %v; want an error wrapping ErrNotServiceID", uri, got, err)
		}
	}
	if got, err := mesh.ParseSPIFFE(nil); !errors.Is(err, mesh.ErrNotServiceID) {
		t.Errorf("ParseSPIFFE(nil) = %+v, %v; want an error wrapping ErrNotServiceID", got, err)
	}
}

func TestSPIFFEIDStringDefaults(t *testing.T) {
	for _, tc := range []struct {
		id   mesh.SPIFFEID
		want string
	}{
		{mesh.SPIFFEID{TrustDomain: "td.consul", Datacenter: "dc1", Service: "web"},
			"spiffe://td.consul/ns/default/dc/dc1/svc/web"},
		{mesh.SPIFFEID{TrustDomain: "td.consul", Partition: "default", Namespace: "ns1", Datacenter: "dc1", Service: "web"},
			"spiffe://td.consul/ns/ns1/dc/dc1/svc/web"},
		{mesh.SPIFFEID{TrustDomain: "td.consul", Partition: "p1", Namespace: "ns1", Datacenter: "dc1", Service: "web"},
			"spiffe://td.consul/ap/p1/ns/ns1/dc/dc1/svc/web"},
		{mesh.SPIFFEID{TrustDomain: "td.consul", Namespace: "default", Datacenter: "dc1", Service: "a/b"},
			"spiffe://td.consul/ns/default/dc/dc1/svc/a%2Fb"},
	} {
		if got := tc.id.String(); got != tc.want {
			t.Errorf("%+v.String() = %q, want %q", tc.id, got, tc.want)
		}
	}
	u := &url.URL{Scheme: "spiffe", Host: "td.consul", Path: "/ns/default/dc/dc1/svc/web"}
	if got, err := mesh.ParseSPIFFE(u); err != nil || got.Service != "web" {
		t.Errorf("ParseSPIFFE(%v built without RawPath) = %+v, %v; want service web", u, got, err)
	}
}
