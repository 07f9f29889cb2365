package mesh

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"
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
	client      *api.Client
	destination string
	log         *slog.Logger

	snap atomic.Pointer[rules] // nil until the first complete read

	mu sync.Mutex // guards the parts below, and the building from them
	// def is the default decision; known once the agent was read.
	def *aclDefault
	// entries are every service-intentions entry; protocol is the
	// destination's; have* say whether they were read.
	entries      []*api.ServiceIntentionsConfigEntry
	protocol     string
	haveEntries  bool
	haveProtocol bool
	// built is the index of the entries built from, to log changes once.
	built uint64
	// entriesIndex is the index of the entries held.
	entriesIndex uint64
}

// NewAuthorizer is an Authorizer for destination, reading from the agent
// of client, whose token must be allowed to read the destination's
// intentions (intention:read), its discovery chain (service:read) and the
// agent's configuration (agent:read; without it the default is deny). It
// does not contact the agent: Run does. log may be nil.
func NewAuthorizer(client *api.Client, destination string, log *slog.Logger) *Authorizer {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Authorizer{
		client:      client,
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
	wg.Add(2)
	go func() {
		defer wg.Done()
		a.follow(ctx, "service-intentions config entries", a.askIntentions)
	}()
	go func() {
		defer wg.Done()
		a.follow(ctx, "discovery chain (protocol)", a.askProtocol)
	}()
	wg.Wait()
}

// Ready reports whether Authorize answers from Consul's intentions: the
// intentions, the protocol and the default have all been read once.
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

// Check answers once, for the CLI, whether source may reach destination
// (r as for Authorize), reading the agent of client: the intentions, the
// destination's protocol and the default decision. It evaluates as an
// Authorizer does.
func Check(ctx context.Context, client *api.Client, source, destination string, r *http.Request) (Decision, error) {
	def, err := readDefault(ctx, client)
	if err != nil {
		return Decision{}, err
	}
	entries, _, err := readIntentions(ctx, client, 0)
	if err != nil {
		return Decision{}, err
	}
	protocol, _, err := readProtocol(ctx, client, destination, 0)
	if err != nil {
		return Decision{}, err
	}
	s, err := compile(destination, entries, protocol, def)
	if err != nil {
		return Decision{}, err
	}
	return s.decide(source, r), nil
}

// askIntentions is one blocking query of the service-intentions entries.
// A query from index 0 (the first, or after a failure, when the agent may
// have come back with another configuration) reads the default first.
func (a *Authorizer) askIntentions(ctx context.Context, index uint64) (uint64, error) {
	if index == 0 {
		def, err := readDefault(ctx, a.client)
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
	entries, last, err := readIntentions(ctx, a.client, index)
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
func (a *Authorizer) askProtocol(ctx context.Context, index uint64) (uint64, error) {
	protocol, last, err := readProtocol(ctx, a.client, a.destination, index)
	if err != nil || (index != 0 && last == index) {
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

// build compiles the parts read into a new snapshot, once all are there,
// and swaps it in. A snapshot that does not compile (a regular expression
// Envoy would refuse too) leaves the last one in force.
func (a *Authorizer) build() {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.def == nil || !a.haveEntries || !a.haveProtocol {
		return
	}
	s, err := compile(a.destination, a.entries, a.protocol, *a.def)
	if err != nil {
		a.log.Error("intentions not applied: the last ones read stay in force", "index", a.entriesIndex, "err", err.Error())
		return
	}
	first := a.snap.Swap(s) == nil
	switch {
	case first:
		a.log.Info("intentions read", "index", a.entriesIndex, "protocol", orTCP(a.protocol))
	case a.built != a.entriesIndex:
		a.log.Info("intentions changed", "index", a.entriesIndex)
	}
	a.built = a.entriesIndex
}

// follow runs one blocking query in a loop until ctx ends, by Consul's
// rules: the answer's index is the next WaitIndex, 0 when it went
// backwards (a restarted agent, a snapshot restore) or after an error;
// never 0 after an answer (it would return at once forever). Errors back
// off (250ms doubling to 5s, jittered); only the first of a run and the
// recovery are logged.
func (a *Authorizer) follow(ctx context.Context, what string, ask func(ctx context.Context, index uint64) (uint64, error)) {
	var index uint64
	failures := 0
	for ctx.Err() == nil {
		last, err := ask(ctx, index)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			failures++
			index = 0
			if failures == 1 {
				a.log.Warn("reading "+what+" from Consul failed; the last ones read stay in force", "err", err.Error())
			}
			if !sleep(ctx, backoff(failures)) {
				return
			}
			continue
		}
		if failures > 0 {
			a.log.Info("reading "+what+" from Consul again", "after_failures", failures)
			failures = 0
		}
		switch {
		case last < index:
			index = 0
		case last == 0:
			index = 1
		default:
			index = last
		}
	}
}

func backoff(failures int) time.Duration {
	d := min(250*time.Millisecond<<min(failures-1, 5), 5*time.Second)
	return d/2 + rand.N(d/2+1)
}

func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// ErrACLDenied marks a read of Check or an Authorizer that the agent
// refused to the client's ACL token (403).
var ErrACLDenied = errors.New("the agent refused it to this ACL token")

// aclDenied adds ErrACLDenied to err when the agent answered 403.
func aclDenied(err error) error {
	var status api.StatusError
	if errors.As(err, &status) && status.Code == http.StatusForbidden {
		return fmt.Errorf("%w: %w", ErrACLDenied, err)
	}
	return err
}

// readIntentions is every service-intentions config entry (in Consul 1.9
// and later every intention is one, `consul intention create` included),
// waiting for a change after index when it is not 0.
func readIntentions(ctx context.Context, c *api.Client, index uint64) ([]*api.ServiceIntentionsConfigEntry, uint64, error) {
	q := (&api.QueryOptions{WaitIndex: index}).WithContext(ctx)
	list, meta, err := c.ConfigEntries().List(api.ServiceIntentions, q)
	if err != nil {
		return nil, 0, fmt.Errorf("reading the service-intentions config entries: %w", aclDenied(err))
	}
	out := make([]*api.ServiceIntentionsConfigEntry, 0, len(list))
	for _, e := range list {
		if si, ok := e.(*api.ServiceIntentionsConfigEntry); ok {
			out = append(out, si)
		}
	}
	return out, meta.LastIndex, nil
}

// readProtocol is destination's protocol as Consul resolves it for its
// proxies (service-defaults, else proxy-defaults, else tcp): its compiled
// discovery chain's, waiting for a change after index when it is not 0.
func readProtocol(ctx context.Context, c *api.Client, destination string, index uint64) (string, uint64, error) {
	q := (&api.QueryOptions{WaitIndex: index}).WithContext(ctx)
	resp, meta, err := c.DiscoveryChain().Get(destination, nil, q)
	if err != nil {
		return "", 0, fmt.Errorf("reading the discovery chain of %s (its protocol): %w", destination, aclDenied(err))
	}
	protocol := "tcp"
	if resp != nil && resp.Chain != nil && resp.Chain.Protocol != "" {
		protocol = resp.Chain.Protocol
	}
	return protocol, meta.LastIndex, nil
}

// agentSelf is the part of GET /v1/agent/self that says what the default
// decision is: the agent's runtime configuration.
type agentSelf struct {
	DebugConfig struct {
		ACLsEnabled         bool
		ACLResolverSettings struct {
			ACLDefaultPolicy string
		}
	}
}

// readDefault is the decision when no intention matches, as the agent
// computes it for its authorize endpoint and for `consul intention check`
// (acl.Authorizer IntentionDefaultAllow: ManageAll when ACLs are off, else
// the ACL default policy). An agent that refuses to tell (403) has ACLs on
// and a token without agent:read; the default is then taken as deny.
func readDefault(ctx context.Context, c *api.Client) (aclDefault, error) {
	var self agentSelf
	_, err := c.Raw().Query("/v1/agent/self", &self, (&api.QueryOptions{}).WithContext(ctx))
	var status api.StatusError
	switch {
	case errors.As(err, &status) && status.Code == http.StatusForbidden:
		return aclDefault{allow: false, why: "ACLs on, and the agent's default policy not readable with this token"}, nil
	case err != nil:
		return aclDefault{}, fmt.Errorf("reading the agent's ACL configuration: %w", err)
	}
	policy := self.DebugConfig.ACLResolverSettings.ACLDefaultPolicy
	switch {
	case !self.DebugConfig.ACLsEnabled:
		return aclDefault{allow: true, why: "ACLs off"}, nil
	case policy == "allow", policy == "deny":
		return aclDefault{allow: policy == "allow", why: "ACL default policy " + policy}, nil
	}
	return aclDefault{}, fmt.Errorf("reading the agent's ACL configuration: ACLs on with default policy %q, want allow or deny", policy)
}
