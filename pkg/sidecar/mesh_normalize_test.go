package sidecar

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/sidecar-mesh/sidecar/pkg/mesh"
)

// The mesh's inbound listener does to a request what the mesh config
// entry asks of Consul's proxies before the intentions judge it and the
// app gets it, and answers what it refuses or redirects as Envoy does.
func TestMeshNormalizesRequests(t *testing.T) {
	for _, tt := range []struct {
		name     string
		n        mesh.Normalization
		target   string
		header   string // "Name: value" sent with the request
		grpc     bool
		status   int    // 0: served
		path     string // the path the app is sent (escaped), or the redirect's Location
		headerTo bool   // header reaches the app
	}{
		{name: "default", target: "/public/../admin?x=1", path: "/admin"},
		{name: "default keeps //", target: "//admin", path: "//admin"},
		{name: "merge", n: mesh.Normalization{MergeSlashes: true}, target: "//admin//users", path: "/admin/users"},
		{name: "off", n: mesh.Normalization{InsecureDisablePathNormalization: true}, target: "/public/../admin", path: "/public/../admin"},
		{name: "forward", n: mesh.Normalization{PathWithEscapedSlashesAction: mesh.EscapedSlashesForward}, target: "/a%2Fb%2F..%2Fc", path: "/a/c"},
		{name: "reject", n: mesh.Normalization{PathWithEscapedSlashesAction: mesh.EscapedSlashesReject}, target: "/a%2fb", status: http.StatusBadRequest},
		{name: "reject, none", n: mesh.Normalization{PathWithEscapedSlashesAction: mesh.EscapedSlashesReject}, target: "/a/b", path: "/a/b"},
		{name: "redirect", n: mesh.Normalization{PathWithEscapedSlashesAction: mesh.EscapedSlashesRedirect}, target: "/a%2Fb?q=1",
			status: http.StatusTemporaryRedirect, path: "/a/b?q=1"},
		{name: "redirect gRPC", n: mesh.Normalization{PathWithEscapedSlashesAction: mesh.EscapedSlashesRedirect}, target: "/pkg.Svc%2FM",
			grpc: true, status: http.StatusBadRequest},
		{name: "reserved bytes escaped", target: "/admin%2Fusers{", path: "/admin%2Fusers%7B"},
		{name: "asterisk", target: "*", status: http.StatusBadRequest},
		{name: "fragment", target: "/admin#x", status: http.StatusBadRequest},
		{name: "absolute, no path", target: "http://api", path: "/"},
		{name: "dot segment with parameters", target: "/public/..;x/admin", path: "/admin"},
		{name: "underscores allowed", target: "/", header: "X_user: admin", path: "/", headerTo: true},
		{name: "underscores dropped", n: mesh.Normalization{HeadersWithUnderscoresAction: mesh.UnderscoresDrop}, target: "/",
			header: "X_user: admin", path: "/"},
		{name: "underscores refused", n: mesh.Normalization{HeadersWithUnderscoresAction: mesh.UnderscoresReject}, target: "/",
			header: "X_user: admin", status: http.StatusBadRequest},
		{name: "dashes pass", n: mesh.Normalization{HeadersWithUnderscoresAction: mesh.UnderscoresReject}, target: "/",
			header: "X-User: web", path: "/", headerTo: true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			r := httptest.NewRequest("GET", tt.target, nil)
			if tt.grpc {
				r.ProtoMajor, r.Proto = 2, "HTTP/2.0"
				r.Header.Set("Content-Type", "application/grpc")
			}
			name, value, _ := strings.Cut(tt.header, ": ")
			if name != "" {
				r.Header[name] = []string{value}
			}
			w := httptest.NewRecorder()
			served := normalize(w, r, tt.n)
			switch {
			case tt.status == 0 && !served:
				t.Fatalf("refused: %d %s", w.Code, w.Body)
			case tt.status == 0:
				if got := r.URL.EscapedPath(); got != tt.path || (strings.HasPrefix(r.RequestURI, "/") && r.RequestURI != r.URL.RequestURI()) {
					t.Errorf("the app is sent %q (request target %q), want %q", got, r.RequestURI, tt.path)
				}
				if name != "" && (r.Header[name] != nil) != tt.headerTo {
					t.Errorf("header %s reaches the app: %v, want %v", name, r.Header[name] != nil, tt.headerTo)
				}
			case served:
				t.Fatalf("served, want %d", tt.status)
			case tt.grpc:
				// Envoy's answer, a local reply of 400 to a gRPC call: INTERNAL.
				if got := w.Header().Get("Grpc-Status") + w.Result().Trailer.Get("Grpc-Status"); got != "13" {
					t.Fatalf("answered %d with grpc-status %q, want 13 (INTERNAL)", w.Code, got)
				}
			case w.Code != tt.status:
				t.Fatalf("answered %d %s, want %d", w.Code, w.Body, tt.status)
			case tt.status == http.StatusTemporaryRedirect && w.Header().Get("Location") != tt.path:
				t.Errorf("Location %q, want %q", w.Header().Get("Location"), tt.path)
			}
		})
	}
}

// Whatever the path, the app is sent the path the intentions judged,
// byte for byte: Go's URL writes a path it holds as escaped only when that
// is a valid encoding, else it escapes the decoded one again, which would
// turn "%2F" into a slash the intentions never saw.
func TestMeshSendsThePathJudged(t *testing.T) {
	targets := []string{
		"/admin%2Fusers{", "/a%2fb|c", "/a%2F^b", "/a%2F%7Bb", "/%2F%2F", "/a%5Cb`", "/a%2Fb\"x", "/x/%2e%2e%2Fadmin{",
		"/a%2Fb%20c", "/a;b=c/%2F..", "/a%2Fb[1]", "/p%2fq/..;/r{", "/\xc3\xbc%2F", "/a%2Fb?q=%2F{",
	}
	for _, n := range []mesh.Normalization{{}, {MergeSlashes: true}, {PathWithEscapedSlashesAction: mesh.EscapedSlashesForward},
		{InsecureDisablePathNormalization: true}} {
		for _, target := range targets {
			r := httptest.NewRequest("GET", target, nil)
			w := httptest.NewRecorder()
			if !normalize(w, r, n) {
				if w.Code != http.StatusBadRequest {
					t.Errorf("%s: GET %s: %d, want served or 400", n, target, w.Code)
				}
				continue
			}
			judged, _, err := n.Path(mesh.RawPath(r))
			if err != nil {
				t.Fatalf("%s: GET %s: judged after normalize: %v", n, target, err)
			}
			sent, _, _ := strings.Cut(r.URL.RequestURI(), "?")
			if sent != judged || sent != r.URL.EscapedPath() {
				t.Errorf("%s: GET %s: the app is sent %q, the intentions judge %q", n, target, sent, judged)
			}
		}
	}
}
