package mesh

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"sync"
	"sync/atomic"
)

// Authorizer decides, by Consul's intentions, which callers may reach one
// destination service, as Consul decides for its proxies. Run follows the
// intentions, the destination's protocol and the default decision from the
// local agent with blocking queries; Authorize answers from the last
// snapshot read, without any call to the agent.
//
// Evaluation, for a caller S (a service of this datacenter's default
// namespace and partition) and the destination D:
//   - The intention that decides is the first, in Consul's precedence, whose
//     source is S or "*" and whose destination is D or "*": in that order
//     "S -> D", "* -> D", "S -> *", "* -> *" (an exact destination ranks
//     before an exact source). Sources of peers and sameness groups never
//     match. This is the agent's rule (connect_auth.go ConnectAuthorize,
//     used by `consul connect proxy`, and `consul intention check`).
//     Envoy's RBAC translation (xds/rbac.go removeSourcePrecedence)
//     differs in one corner: it excludes from a lower intention only the
//     sources of higher ones that are more specific, so "* -> D" deny
//     over "S -> *" allow lets S through Envoy, not through the agent.
//   - An intention without permissions allows or denies by its Action.
//   - One with L7 permissions: for a request, the first permission whose
//     HTTP match (path, methods, headers, all of them) matches decides by
//     its Action; when none matches, the default decides. For an L4
//     question (no request) the answer is deny, as Consul's L4 checks
//     answer, with Decision.PerRequest set. When D's protocol is not
//     http, http2 or grpc, the permissions are not evaluated and the
//     answer is deny.
//   - No intention: the default, allow when the agent's ACLs are off or
//     their default policy is allow, deny when it is deny (or when the
//     agent refuses to tell, which only an ACL system can).
//   - JWT requirements are not verified: a request is judged as one
//     without a valid token, which gets the default where the JWT applies.
//
// Authorize is safe for concurrent use and never blocks. The zero value is
// not usable: use NewAuthorizer.
type Authorizer struct {
	agent       IntentionsAgent
	destination string
	log         *slog.Logger

	snap atomic.Pointer[rules] // nil until the first complete read

	// The last error of each query, until an answer comes.
	intentionsErr, protocolErr, normErr atomic.Pointer[string]

	mu sync.Mutex // guards the parts below, and the building from them
	// def is the default decision; known once the agent was read.
	def *aclDefault
	// entries are every service-intentions entry; protocol is the
	// destination's; have* say whether they were read.
	entries      []IntentionsEntry
	protocol     string
	haveEntries  bool
	haveProtocol bool
	// built is the index of the entries built from, to log changes once.
	built uint64
	// entriesIndex is the index of the entries held.
	entriesIndex uint64
	// norm is the mesh's request normalization; nil until read.
	norm *Normalization
}

// NewAuthorizer is an Authorizer for destination, reading from agent,
// whose token must be allowed to read the destination's intentions
// (intention:read), its discovery chain (service:read) and the agent's
// configuration (agent:read; without it the default is deny). It does not
// contact the agent: Run does. log may be nil.
func NewAuthorizer(agent IntentionsAgent, destination string, log *slog.Logger) *Authorizer {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Authorizer{
		agent:       agent,
		destination: destination,
		log:         log.With("component", "intentions", "destination", destination),
	}
}

// Run follows the intentions, the destination's protocol and the default
// decision until ctx ends, then returns. Call it once, in a goroutine of
// its own. While the agent cannot be reached, Authorize keeps answering
// from the last snapshot read.
func (a *Authorizer) Run(ctx context.Context) {
	var wg sync.WaitGroup
	wg.Add(3)
	go func() {
		defer wg.Done()
		followAgent(ctx, a.log, "intentions", &a.intentionsErr, a.askIntentions)
	}()
	go func() {
		defer wg.Done()
		followAgent(ctx, a.log, "destination protocol", &a.protocolErr, a.askProtocol)
	}()
	go func() {
		defer wg.Done()
		followAgent(ctx, a.log, "request normalization", &a.normErr, a.askNormalization)
	}()
	wg.Wait()
}

// Ready reports whether Authorize answers from Consul's intentions: the
// intentions, the protocol, the default and the request normalization
// have all been read once.
func (a *Authorizer) Ready() bool { return a.snap.Load() != nil }

// notReady is Authorize's answer before Ready.
var notReady = Decision{By: "not ready: the intentions have not been read from Consul yet (deny)"}

// Authorize decides whether the caller service source may reach the
// destination; r is the request for an L7 question, nil for an L4 one (a
// connection). r is only read. Before Ready it denies.
func (a *Authorizer) Authorize(source string, r *http.Request) Decision {
	s := a.snap.Load()
	if s == nil {
		return notReady
	}
	return s.decide(source, r)
}

// Normalization is the mesh's request normalization in force: what the
// inbound listener does to a request's path and headers before it is
// judged (the zero value, Consul's default, before Ready).
func (a *Authorizer) Normalization() Normalization {
	if s := a.snap.Load(); s != nil {
		return s.norm
	}
	return Normalization{}
}

// AuthorizeCaller is Authorize for a caller known by its certificate's
// ID. The intentions read here are those of the default namespace and
// partition (Consul CE's only ones; entries and sources elsewhere are
// skipped), so a caller of another namespace or partition, which an
// Enterprise CA signs, matches none of them, "*" included (Envoy's
// principal for a source is spiffe://<td>/ns/default/dc/<dc>/svc/<name>):
// the default decides for it.
func (a *Authorizer) AuthorizeCaller(caller SPIFFEID, r *http.Request) Decision {
	s := a.snap.Load()
	if s == nil {
		return notReady
	}
	if !defaultTenancy(caller.Namespace, caller.Partition) {
		d := s.def
		d.By = "no intention names a caller of namespace " + caller.Namespace + ", partition " + caller.Partition + ": " + d.By
		return d
	}
	return s.decide(caller.Service, r)
}

// Check answers once, for the CLI, whether source may reach destination
// (r as for Authorize), reading agent: the intentions, the destination's
// protocol and the default decision. It evaluates as an Authorizer does.
func Check(ctx context.Context, agent IntentionsAgent, source, destination string, r *http.Request) (Decision, error) {
	def, err := readDefault(ctx, agent)
	if err != nil {
		return Decision{}, err
	}
	entries, _, err := readIntentions(ctx, agent, Query{})
	if err != nil {
		return Decision{}, err
	}
	protocol, _, err := readProtocol(ctx, agent, destination, Query{})
	if err != nil {
		return Decision{}, err
	}
	norm, _, err := readNormalization(ctx, agent, Query{})
	if err != nil {
		return Decision{}, err
	}
	s, err := compile(destination, entries, protocol, def)
	if err != nil {
		return Decision{}, err
	}
	s.norm = norm
	return s.decide(source, r), nil
}

// askIntentions is one blocking query of the service-intentions entries.
// A query from index 0 (the first, or after a failure, when the agent may
// have come back with another configuration) reads the default first.
func (a *Authorizer) askIntentions(ctx context.Context, q Query) (uint64, error) {
	index := q.Index
	if index == 0 {
		def, err := readDefault(ctx, a.agent)
		if err != nil {
			return 0, err
		}
		a.mu.Lock()
		changed := a.def == nil || *a.def != def
		a.def = &def
		a.mu.Unlock()
		if changed {
			a.log.Info("default decision read from the agent", "default", def.decision().By)
		}
	}
	entries, last, err := readIntentions(ctx, a.agent, q)
	if err != nil || (index != 0 && last == index) {
		return last, err // the wait ended with nothing new
	}
	a.mu.Lock()
	a.entries, a.haveEntries, a.entriesIndex = entries, true, last
	a.mu.Unlock()
	a.build()
	return last, nil
}

// askProtocol is one blocking query of the destination's discovery chain,
// for its protocol.
func (a *Authorizer) askProtocol(ctx context.Context, q Query) (uint64, error) {
	protocol, last, err := readProtocol(ctx, a.agent, a.destination, q)
	if err != nil || (q.Index != 0 && last == q.Index) {
		return last, err // the wait ended with nothing new
	}
	a.mu.Lock()
	changed := a.haveProtocol && a.protocol != protocol
	a.protocol, a.haveProtocol = protocol, true
	a.mu.Unlock()
	if changed {
		a.log.Info("destination protocol changed", "protocol", protocol)
	}
	a.build()
	return last, nil
}

// askNormalization is one blocking query of the mesh config entry, for its
// request normalization. Any token may read it (Consul asks no
// permission of it): a refusal is the token itself gone, and like any
// failure it leaves the normalization held in force.
func (a *Authorizer) askNormalization(ctx context.Context, q Query) (uint64, error) {
	norm, last, err := readNormalization(ctx, a.agent, q)
	if err != nil || (q.Index != 0 && last == q.Index) {
		return last, err // the wait ended with nothing new
	}
	a.mu.Lock()
	changed := a.norm == nil || *a.norm != norm
	a.norm = &norm
	a.mu.Unlock()
	if changed {
		a.log.Info("request normalization read from the mesh config entry", "normalization", norm.String())
	}
	a.build()
	return last, nil
}

// build compiles the parts read into a new snapshot, once all are there,
// and swaps it in. A snapshot that does not compile (a regular expression
// Envoy would refuse too) leaves the last one in force.
func (a *Authorizer) build() {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.def == nil || !a.haveEntries || !a.haveProtocol || a.norm == nil {
		return
	}
	s, err := compile(a.destination, a.entries, a.protocol, *a.def)
	if err != nil {
		a.log.Error("intentions not applied: the last ones read stay in force", "index", a.entriesIndex, "err", err.Error())
		return
	}
	s.norm = *a.norm
	first := a.snap.Swap(s) == nil
	switch {
	case first:
		a.log.Info("intentions read", "index", a.entriesIndex, "protocol", orTCP(a.protocol))
	case a.built != a.entriesIndex:
		a.log.Info("intentions changed", "index", a.entriesIndex)
	}
	a.built = a.entriesIndex
}

// readIntentions is every service-intentions config entry, by query q.
func readIntentions(ctx context.Context, agent IntentionsAgent, q Query) ([]IntentionsEntry, uint64, error) {
	entries, last, err := agent.Intentions(ctx, q)
	if err != nil {
		return nil, 0, fmt.Errorf("reading the service-intentions config entries: %w", err)
	}
	return entries, last, nil
}

// readProtocol is destination's protocol as Consul resolves it for its
// proxies, by query q.
func readProtocol(ctx context.Context, agent IntentionsAgent, destination string, q Query) (string, uint64, error) {
	protocol, last, err := agent.Protocol(ctx, destination, q)
	if err != nil {
		return "", 0, fmt.Errorf("reading the discovery chain of %s (its protocol): %w", destination, err)
	}
	return protocol, last, nil
}

// readNormalization is the mesh's request normalization, by query q. A
// value Consul would not accept is an error (the last one read stays in
// force); so is a read the agent refuses (ErrACLDenied).
func readNormalization(ctx context.Context, agent IntentionsAgent, q Query) (Normalization, uint64, error) {
	norm, last, err := agent.Normalization(ctx, q)
	if err != nil {
		return Normalization{}, 0, fmt.Errorf("reading the mesh config entry: %w", err)
	}
	if err := norm.Validate(); err != nil {
		return Normalization{}, 0, err
	}
	return norm, last, nil
}

// readDefault is the decision when no intention matches, as the agent
// computes it for its authorize endpoint and for `consul intention check`:
// the agent's default_intention_policy when set (Consul 1.18 and later),
// else acl.Authorizer IntentionDefaultAllow (ManageAll when ACLs are off,
// else the ACL default policy). An agent that refuses to tell (403) has ACLs on
// and a token without agent:read; the default is then taken as deny.
func readDefault(ctx context.Context, agent IntentionsAgent) (aclDefault, error) {
	acl, err := agent.ACL(ctx)
	switch {
	case errors.Is(err, ErrACLDenied):
		return aclDefault{allow: false, why: "ACLs on, and the agent's default policy not readable with this token"}, nil
	case err != nil:
		return aclDefault{}, fmt.Errorf("reading the agent's ACL configuration: %w", err)
	}
	switch p := acl.DefaultIntentionPolicy; p {
	case "allow", "deny":
		return aclDefault{allow: p == "allow", why: "default_intention_policy " + p}, nil
	case "":
	default:
		return aclDefault{}, fmt.Errorf("reading the agent's configuration: default_intention_policy %q, want allow or deny", p)
	}
	switch policy := acl.DefaultPolicy; {
	case !acl.Enabled:
		return aclDefault{allow: true, why: "ACLs off"}, nil
	case policy == "allow", policy == "deny":
		return aclDefault{allow: policy == "allow", why: "ACL default policy " + policy}, nil
	default:
		return aclDefault{}, fmt.Errorf("reading the agent's ACL configuration: ACLs on with default policy %q, want allow or deny", policy)
	}
}
