package mesh_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/mesh"
)

// meshEntryAgent is an agent (over HTTP, as Consul serves its API, blocking
// queries included) with ACLs off, no intentions, an http destination, and
// a mesh config entry that a test sets: its JSON, or a status to refuse it
// with.
type meshEntryAgent struct {
	mu      sync.Mutex
	index   uint64
	entry   string // the JSON list /v1/config/mesh answers
	status  int    // when not 0, /v1/config/mesh answers it
	changed chan struct{}
}

func newMeshEntryAgent(t *testing.T, entry string, status int) (*meshEntryAgent, mesh.IntentionsAgent) {
	t.Helper()
	a := &meshEntryAgent{index: 7, entry: entry, status: status, changed: make(chan struct{})}
	srv := httptest.NewServer(http.HandlerFunc(a.serve))
	t.Cleanup(srv.Close)
	c, err := discovery.NewClient(discovery.ClientConfig{Address: srv.Listener.Addr().String(), NonPooled: true})
	if err != nil {
		t.Fatal(err)
	}
	return a, discovery.NewMeshAgent(c)
}

// set changes the mesh config entry, as `consul config write` would.
func (a *meshEntryAgent) set(entry string, status int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.index++
	a.entry, a.status = entry, status
	close(a.changed)
	a.changed = make(chan struct{})
}

func (a *meshEntryAgent) serve(w http.ResponseWriter, r *http.Request) {
	a.mu.Lock()
	index, changed := a.index, a.changed
	a.mu.Unlock()
	if q := r.URL.Query().Get("index"); q == strconv.FormatUint(index, 10) {
		select { // a blocking query: answer on a change, or at the end of a short wait
		case <-changed:
		case <-r.Context().Done():
			return
		case <-time.After(2 * time.Second):
		}
	}
	a.mu.Lock()
	index, entry, status := a.index, a.entry, a.status
	a.mu.Unlock()
	w.Header().Set("X-Consul-Index", strconv.FormatUint(index, 10))
	switch r.URL.Path {
	case "/v1/agent/self":
		fmt.Fprint(w, `{"Config": {"Datacenter": "dc1"}, "DebugConfig": {"ACLsEnabled": false}}`)
	case "/v1/config/service-intentions":
		fmt.Fprint(w, `[]`)
	case "/v1/discovery-chain/api":
		fmt.Fprint(w, `{"Chain": {"ServiceName": "api", "Protocol": "http"}}`)
	case "/v1/config/mesh":
		if status != 0 {
			http.Error(w, "Permission denied: token with AccessorID '1' lacks permission 'mesh:read'", status)
			return
		}
		fmt.Fprint(w, entry)
	default:
		http.NotFound(w, r)
	}
}

const mergeAndForward = `[{"Kind": "mesh", "Name": "mesh", "HTTP": {"Incoming": {"RequestNormalization": {
	"MergeSlashes": true, "PathWithEscapedSlashesAction": "UNESCAPE_AND_FORWARD", "HeadersWithUnderscoresAction": "DROP_HEADER"}}}}]`

// The Authorizer follows the mesh config entry's request normalization:
// read before it is ready, and a change applies without a restart.
func TestAuthorizerFollowsRequestNormalization(t *testing.T) {
	agent, client := newMeshEntryAgent(t, mergeAndForward, 0)
	auth, logs := runAuthorizer(t, client, "api")
	if !eventually(10*time.Second, auth.Ready) {
		t.Fatalf("not ready; log:\n%s", logs)
	}
	want := mesh.Normalization{MergeSlashes: true, PathWithEscapedSlashesAction: mesh.EscapedSlashesForward, HeadersWithUnderscoresAction: mesh.UnderscoresDrop}
	if got := auth.Normalization(); got != want {
		t.Fatalf("Normalization() = %s, want %s", got, want)
	}
	agent.set(`[{"Kind": "mesh", "Name": "mesh", "HTTP": {"Incoming": {"RequestNormalization": {"PathWithEscapedSlashesAction": "REJECT_REQUEST"}}}}]`, 0)
	want = mesh.Normalization{PathWithEscapedSlashesAction: mesh.EscapedSlashesReject}
	if !eventually(10*time.Second, func() bool { return auth.Normalization() == want }) {
		t.Fatalf("after the entry changed: Normalization() = %s, want %s", auth.Normalization(), want)
	}
	agent.set(`[]`, 0) // the entry deleted: Consul's default again
	if !eventually(10*time.Second, func() bool { return auth.Normalization() == mesh.Normalization{} }) {
		t.Fatalf("after the entry was deleted: Normalization() = %s, want the default", auth.Normalization())
	}
	// An entry with a value Consul would refuse is not applied: the last
	// one read stays in force.
	agent.set(mergeAndForward, 0)
	if !eventually(10*time.Second, func() bool { return auth.Normalization().MergeSlashes }) {
		t.Fatalf("Normalization() = %s, want slashes merged", auth.Normalization())
	}
	agent.set(`[{"Kind": "mesh", "Name": "mesh", "HTTP": {"Incoming": {"RequestNormalization": {"HeadersWithUnderscoresAction": "drop"}}}}]`, 0)
	if !eventually(10*time.Second, func() bool { return strings.Contains(logs.String(), `headers_with_underscores_action \"drop\"`) }) {
		t.Fatalf("no log of the refused value; log:\n%s", logs)
	}
	if got := auth.Normalization(); !got.MergeSlashes {
		t.Errorf("after a value Consul refuses: Normalization() = %s, want the last good one", got)
	}
}

// A refused read (Consul lets every token read the mesh config entry: a
// refusal is the token itself gone) is a failure like any other: before
// the first read the Authorizer is not ready (it denies), and after it
// the normalization held stays in force.
func TestRequestNormalizationRefused(t *testing.T) {
	agent, client := newMeshEntryAgent(t, "", http.StatusForbidden)
	auth, logs := runAuthorizer(t, client, "api")
	if eventually(300*time.Millisecond, auth.Ready) {
		t.Fatalf("ready with the mesh config entry refused; log:\n%s", logs)
	}
	if _, err := mesh.Check(context.Background(), client, "web", "api", request("GET /admin")); !errors.Is(err, mesh.ErrACLDenied) {
		t.Errorf("Check with the entry refused: %v, want ErrACLDenied", err)
	}
	agent.set(mergeAndForward, 0)
	if !eventually(10*time.Second, auth.Ready) {
		t.Fatalf("not ready once the entry was read; log:\n%s", logs)
	}
	held := auth.Normalization()
	agent.set("", http.StatusForbidden)
	if !eventually(10*time.Second, func() bool { return strings.Contains(logs.String(), "lacks permission") }) {
		t.Fatalf("no log of the refusal; log:\n%s", logs)
	}
	if got := auth.Normalization(); got != held || !got.MergeSlashes {
		t.Errorf("after a refusal: Normalization() = %s, want the one held, %s", got, held)
	}
}
