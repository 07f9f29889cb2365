package mesh

import (
	"testing"
)

func TestCanonicalPath(t *testing.T) {
	for in, want := range map[string]string{
		"/":                    "/",
		"/public/page":         "/public/page",
		"/%61dmin":             "/admin",
		"/%7Euser/%2d%5F":      "/~user/-_",
		"/a%2fb":               "/a%2fb", // an escaped slash stays escaped, as written
		"/a%5Cb":               "/a%5Cb",
		"/%5c%25":              "/%5c%25",
		"/a%20b":               "/a%20b",
		"/a\\b":                "/a/b",
		"/a/./b":               "/a/b",
		"/a/b/../c":            "/a/c",
		"/a/b/..":              "/a/",
		"/a/.":                 "/a/",
		"/..":                  "/",
		"/../../etc/passwd":    "/etc/passwd",
		"/public/%2e%2e/admin": "/admin",
		"/public/.%2E/admin":   "/admin",
		"/public/..\\admin":    "/admin",
		"//admin":              "//admin", // adjacent slashes are not merged
		"/a/..b/c":             "/a/..b/c",
		"/file.txt":            "/file.txt",
		"*":                    "*",
		"/a%2e%2e%2fb":         "/a..%2fb",
		"/a{b}|c^d":            "/a%7Bb%7D%7Cc%5Ed", // bytes a path may not hold unescaped
		"/a b\"<>`":            "/a%20b%22%3C%3E%60",
		"/\xc3\xbc":            "/%C3%BC",
		"/a[b]":                "/a%5Bb%5D",
		"/a:b@c!$&'()*+,;=":    "/a:b@c!$&'()*+,;=",
		"/public/..;x=1/admin": "/admin", // a dot segment with parameters, as Tomcat reads it
		"/a/.;x/b":             "/a/b",
		"/a/..;/b/..;":         "/",
		"/a/...;/b":            "/a/...;/b",
		"/a;x/../b":            "/b",
	} {
		got, err := CanonicalPath(in)
		if err != nil || got != want {
			t.Errorf("CanonicalPath(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"/a%", "/a%4", "/a%zz", "/%g0", "/admin%00", "/xyz/.%00../abc"} {
		if got, err := CanonicalPath(bad); err == nil {
			t.Errorf("CanonicalPath(%q) = %q, want an error", bad, got)
		}
	}
	for _, p := range []string{"/public/page-1", "/helloworld.Greeter/SayHello", "/file.txt"} {
		if n := testing.AllocsPerRun(100, func() { _, _ = CanonicalPath(p) }); n != 0 {
			t.Errorf("%s, with nothing to normalize, cost %.0f allocations", p, n)
		}
	}
}

// A deny cannot be passed by writing its path another way: escapes of
// unreserved characters, dot segments (escaped or not) and backslashes
// are normalized before the permissions are matched, as Consul has Envoy
// do since CVE-2024-10005.
func TestNormalizedPathsCannotPassADeny(t *testing.T) {
	entries := l7(IntentionPermission{HTTP: &IntentionHTTP{PathPrefix: "/public/admin"}},
		allowHTTP(IntentionHTTP{PathPrefix: "/public/", Methods: []string{"GET"}}))
	s := mustCompile(t, entries, "http", denyByDefault)
	for _, target := range []string{
		"/public/admin", "/public/%61dmin", "/public/%61%64%6D%69%6E/users", "/public/./admin",
		"/public/x/../admin", "/public/%2e/admin", "/public/x/%2E%2E/admin", "/public/admin/../admin/x",
		"/public/x\\..\\admin",
	} {
		if d := s.decide("web", req("GET "+target)); d.Allowed || d.Permission != 1 {
			t.Errorf("GET %s: %+v, want denied by permission 1", target, d)
		}
	}
	for _, target := range []string{"/public/page", "/public/x/../page", "/public/%70age", "/public/admin%2Fx/../page"} {
		if d := s.decide("web", req("GET "+target)); !d.Allowed || d.Permission != 2 {
			t.Errorf("GET %s: %+v, want allowed by permission 2", target, d)
		}
	}
}
