package policy

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// APIVersion and Kind name a Policy document.
const (
	APIVersion = "sidecar/v1"
	Kind       = "Policy"
	// Default is the service name of the policy merged under every other.
	Default = "*"
)

// Policy is the resilience policy of one service (or, with Service "*", the
// default under every service). A nil field is "not set": it takes the
// value of the "*" policy, then of Defaults. Policies are values: copy
// freely, never mutate one in force.
type Policy struct {
	APIVersion string `yaml:"apiVersion,omitempty" json:"apiVersion,omitempty"`
	Kind       string `yaml:"kind,omitempty" json:"kind,omitempty"`
	Service    string `yaml:"service" json:"service"`
	// Timeout bounds the whole request: every attempt and backoff, and the
	// answer's body; for a streaming answer (see StreamIdleTimeout), only
	// until its headers.
	Timeout *Duration `yaml:"timeout,omitempty" json:"timeout,omitempty"`
	// StreamIdleTimeout ends a streaming answer (gRPC, text/event-stream, or
	// a body of unknown length) once the upstream has sent nothing for this
	// long. A stream that keeps sending runs on, past Timeout, until the
	// caller's own deadline (grpc-timeout) or disconnect.
	StreamIdleTimeout *Duration `yaml:"streamIdleTimeout,omitempty" json:"streamIdleTimeout,omitempty"`
	// ConnectTimeout bounds opening a connection to an endpoint; a failure
	// is a connect-failure, retryable for any method.
	ConnectTimeout   *Duration         `yaml:"connectTimeout,omitempty" json:"connectTimeout,omitempty"`
	Retry            *Retry            `yaml:"retry,omitempty" json:"retry,omitempty"`
	CircuitBreaker   *CircuitBreaker   `yaml:"circuitBreaker,omitempty" json:"circuitBreaker,omitempty"`
	OutlierDetection *OutlierDetection `yaml:"outlierDetection,omitempty" json:"outlierDetection,omitempty"`
	Concurrency      *Concurrency      `yaml:"concurrency,omitempty" json:"concurrency,omitempty"`
	LoadBalancer     *LoadBalancer     `yaml:"loadBalancer,omitempty" json:"loadBalancer,omitempty"`
	Hedge            *Hedge            `yaml:"hedge,omitempty" json:"hedge,omitempty"`
}

// Retry says when and how a failed attempt is tried again.
type Retry struct {
	// Attempts is the total, the first try included; 1 turns retries off.
	Attempts *int `yaml:"attempts,omitempty" json:"attempts,omitempty"`
	// PerTryTimeout bounds each attempt; 0 means only the overall timeout.
	PerTryTimeout *Duration `yaml:"perTryTimeout,omitempty" json:"perTryTimeout,omitempty"`
	Backoff       *Backoff  `yaml:"backoff,omitempty" json:"backoff,omitempty"`
	// On lists the retryable outcomes (see RetryConditions); empty: none.
	On List `yaml:"on,omitempty" json:"on,omitzero"`
	// Methods lists the methods retried; others only with an
	// Idempotency-Key header. Empty: none.
	Methods List    `yaml:"methods,omitempty" json:"methods,omitzero"`
	Budget  *Budget `yaml:"budget,omitempty" json:"budget,omitempty"`
}

// List is a list setting. A nil List is not set (the "*" policy's or the
// default applies); an empty one is set, to nothing.
type List []string

// IsZero reports whether l is not set. YAML's omitempty and JSON's omitzero
// ask it, so that a list set to nothing is written as [] and still means
// nothing when read back, instead of the default.
func (l List) IsZero() bool { return l == nil }

// Backoff is exponential from Base to Max, with full jitter.
type Backoff struct {
	Base *Duration `yaml:"base,omitempty" json:"base,omitempty"`
	Max  *Duration `yaml:"max,omitempty" json:"max,omitempty"`
}

// Budget caps retries at Ratio of recent requests plus MinPerSecond.
type Budget struct {
	Ratio        *float64 `yaml:"ratio,omitempty" json:"ratio,omitempty"`
	MinPerSecond *int     `yaml:"minPerSecond,omitempty" json:"minPerSecond,omitempty"`
}

// CircuitBreaker trips on ConsecutiveFailures failed requests in a row, or
// on FailureRatio of the requests over Window once MinRequests were seen
// (ReadyToTrip). It counts requests by their outcome after retries, not
// attempts: an instance that fails is outlier detection's to eject.
type CircuitBreaker struct {
	ConsecutiveFailures *int      `yaml:"consecutiveFailures,omitempty" json:"consecutiveFailures,omitempty"`
	FailureRatio        *float64  `yaml:"failureRatio,omitempty" json:"failureRatio,omitempty"`
	MinRequests         *int      `yaml:"minRequests,omitempty" json:"minRequests,omitempty"`
	Window              *Duration `yaml:"window,omitempty" json:"window,omitempty"`
	OpenDuration        *Duration `yaml:"openDuration,omitempty" json:"openDuration,omitempty"`
	HalfOpenRequests    *int      `yaml:"halfOpenRequests,omitempty" json:"halfOpenRequests,omitempty"`
}

// OutlierDetection ejects an endpoint after ConsecutiveFailures.
type OutlierDetection struct {
	ConsecutiveFailures *int      `yaml:"consecutiveFailures,omitempty" json:"consecutiveFailures,omitempty"`
	EjectionTime        *Duration `yaml:"ejectionTime,omitempty" json:"ejectionTime,omitempty"`
	MaxEjectionPercent  *int      `yaml:"maxEjectionPercent,omitempty" json:"maxEjectionPercent,omitempty"`
}

// LoadBalancer chooses among the service's endpoints. Every policy honours
// the endpoints' weights (Consul's Weights.Passing, or Weights.Warning for
// an instance whose checks warn) and skips ejected endpoints.
type LoadBalancer struct {
	// Policy is round-robin (smoothly weighted when weights differ),
	// least-request (the fewer requests in flight of two endpoints picked
	// at random) or p2c-ewma (of two at random, the lower peak-EWMA
	// latency times requests in flight, as Linkerd's balancer).
	Policy *string `yaml:"policy,omitempty" json:"policy,omitempty"`
	// SlowStart ramps a new endpoint's share of the traffic up over this
	// long, from a tenth of its weight; 0: none.
	SlowStart *Duration `yaml:"slowStart,omitempty" json:"slowStart,omitempty"`
}

// Hedge sends an idempotent request (retry.methods, or one with an
// Idempotency-Key) whose body is held in memory to another endpoint too
// once Delay has passed without an answer, up to MaxHedges more times, one
// Delay apart. The first complete answer wins and the other attempts are
// cancelled. Each hedge is an attempt: it counts against retry.attempts
// and takes a retry from the retry budget, so hedging never adds more load
// than retries could.
type Hedge struct {
	// Delay is how long an attempt goes without an answer before a hedge
	// is sent; 0: no hedging.
	Delay *Duration `yaml:"delay,omitempty" json:"delay,omitempty"`
	// MaxHedges is the most hedges one request sends.
	MaxHedges *int `yaml:"maxHedges,omitempty" json:"maxHedges,omitempty"`
}

// On reports whether h hedges at all.
func (h *Hedge) On() bool {
	return h != nil && h.Delay != nil && *h.Delay > 0 && h.MaxHedges != nil && *h.MaxHedges > 0
}

// Load-balancing policies (LoadBalancer.Policy).
const (
	RoundRobin   = "round-robin"
	LeastRequest = "least-request"
	P2CEWMA      = "p2c-ewma"
)

// LoadBalancers are the values of loadBalancer.policy.
var LoadBalancers = []string{RoundRobin, LeastRequest, P2CEWMA}

// Concurrency bounds requests in flight to the service. Past MaxInFlight a
// request waits for a slot, first come first served, if fewer than
// MaxQueued wait already, for at most QueueTimeout (and never past the
// request's timeout); else it is answered 503 overloaded at once.
//
// With Adaptive, the limit follows the service's measured latency instead,
// between AdaptiveFloor and MaxInFlight (adaptive.go says how); a request
// over it is answered 503 overloaded at once, with a Retry-After, and
// MaxQueued and QueueTimeout do not apply. Nil or false: the fixed
// MaxInFlight.
type Concurrency struct {
	MaxInFlight  *int      `yaml:"maxInFlight,omitempty" json:"maxInFlight,omitempty"`
	MaxQueued    *int      `yaml:"maxQueued,omitempty" json:"maxQueued,omitempty"`
	QueueTimeout *Duration `yaml:"queueTimeout,omitempty" json:"queueTimeout,omitempty"`
	Adaptive     *bool     `yaml:"adaptive,omitempty" json:"adaptive,omitempty"`
}

func ptr[T any](v T) *T { return &v }

// Defaults is every field's default, in one place. Effective policies are
// Defaults, under the "*" policy, under the service's own.
func Defaults() Policy {
	return Policy{
		APIVersion: APIVersion,
		Kind:       Kind,
		Service:    Default,
		Timeout:    ptr(Duration(15 * time.Second)),
		// Long enough for a watch or an event stream that is quiet between
		// events (Envoy's stream_idle_timeout is 5m too), short enough that
		// a stream whose upstream hung does not hold a slot for long.
		StreamIdleTimeout: ptr(Duration(5 * time.Minute)),
		// A connection on loopback or within a cluster opens in well under a
		// millisecond; a second is a dead or overloaded endpoint.
		ConnectTimeout: ptr(Duration(time.Second)),
		Retry: &Retry{
			Attempts:      ptr(3),
			PerTryTimeout: ptr(Duration(0)),
			Backoff:       &Backoff{Base: ptr(Duration(25 * time.Millisecond)), Max: ptr(Duration(250 * time.Millisecond))},
			On:            []string{"connect-failure", "reset", "502", "503", "504", "grpc-unavailable"},
			Methods:       []string{"GET", "HEAD", "OPTIONS", "PUT", "DELETE"},
			Budget:        &Budget{Ratio: ptr(0.2), MinPerSecond: ptr(10)},
		},
		// The breaker counts requests after their retries, and opens only
		// for a service that fails as a whole: never for a path that
		// always fails among healthy ones, nor for an instance that fails
		// (retries and outlier detection hide it). With 1 request in 10
		// failing at random, 20 in a row come about once in 10^20
		// requests, and half of a window of 100 about once in 10^23
		// (RequestsBetweenOpenings; `sidecar policy explain` warns below
		// 10^10). A service that is down opens it after 20 requests; while
		// open every request would have failed anyway, and once it heals
		// a probe closes the breaker within openDuration, which is short
		// for that reason.
		CircuitBreaker: &CircuitBreaker{
			ConsecutiveFailures: ptr(20),
			FailureRatio:        ptr(0.5),
			MinRequests:         ptr(100),
			Window:              ptr(Duration(10 * time.Second)),
			OpenDuration:        ptr(Duration(5 * time.Second)),
			HalfOpenRequests:    ptr(1),
		},
		OutlierDetection: &OutlierDetection{
			ConsecutiveFailures: ptr(5),
			EjectionTime:        ptr(Duration(30 * time.Second)),
			MaxEjectionPercent:  ptr(50),
		},
		Concurrency:  &Concurrency{MaxInFlight: ptr(1024), MaxQueued: ptr(1024), QueueTimeout: ptr(Duration(time.Second)), Adaptive: ptr(false)},
		LoadBalancer: &LoadBalancer{Policy: ptr(RoundRobin), SlowStart: ptr(Duration(0))},
		Hedge:        &Hedge{Delay: ptr(Duration(0)), MaxHedges: ptr(1)},
	}
}

// RetryConditions are the words allowed in retry.on, besides HTTP status
// codes 400-599.
var RetryConditions = []string{
	"connect-failure", "reset", "timeout",
	"grpc-unavailable", "grpc-resource-exhausted", "grpc-deadline-exceeded", "grpc-cancelled",
}

// Merge returns base with every field set in over replacing base's, field by
// field (nested sections merge too; lists replace).
func Merge(base, over Policy) Policy {
	out := deepCopy(base)
	mergeValue(reflect.ValueOf(&out).Elem(), reflect.ValueOf(deepCopy(over)))
	return out
}

func mergeValue(dst, src reflect.Value) {
	for i := 0; i < dst.NumField(); i++ {
		d, s := dst.Field(i), src.Field(i)
		switch d.Kind() {
		case reflect.Pointer:
			if s.IsNil() {
				continue
			}
			if d.IsNil() || s.Elem().Kind() != reflect.Struct {
				d.Set(s)
				continue
			}
			mergeValue(d.Elem(), s.Elem())
		case reflect.Slice:
			if !s.IsNil() {
				d.Set(s)
			}
		case reflect.String:
			if s.String() != "" {
				d.Set(s)
			}
		}
	}
}

// deepCopy copies p with no pointer shared.
func deepCopy(p Policy) Policy {
	v := copyValue(reflect.ValueOf(p))
	return v.Interface().(Policy)
}

func copyValue(v reflect.Value) reflect.Value {
	switch v.Kind() {
	case reflect.Pointer:
		if v.IsNil() {
			return v
		}
		n := reflect.New(v.Elem().Type())
		n.Elem().Set(copyValue(v.Elem()))
		return n
	case reflect.Slice:
		if v.IsNil() {
			return v
		}
		n := reflect.MakeSlice(v.Type(), v.Len(), v.Len())
		reflect.Copy(n, v)
		return n
	case reflect.Struct:
		n := reflect.New(v.Type()).Elem()
		for i := 0; i < v.NumField(); i++ {
			n.Field(i).Set(copyValue(v.Field(i)))
		}
		return n
	}
	return v
}

// Effective returns the policy in force for service: Defaults, under the
// "*" policy (if any), under the service's own (if any).
func Effective(service string, byService map[string]Policy) Policy {
	p := Defaults()
	if d, ok := byService[Default]; ok {
		p = Merge(p, d)
	}
	if s, ok := byService[service]; ok && service != Default {
		p = Merge(p, s)
	}
	p.Service = service
	return p
}

// FieldError is one invalid field: its path, the value found and what is
// allowed.
type FieldError struct {
	Path    string
	Value   string
	Allowed string
}

func (e *FieldError) Error() string {
	return fmt.Sprintf("%s: %s is not allowed (allowed: %s)", e.Path, e.Value, e.Allowed)
}

var serviceRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)

// ValidServiceName reports whether name is a service name: lower-case
// letters, digits and '-', at most 63, not starting or ending with '-'.
func ValidServiceName(name string) bool { return serviceRE.MatchString(name) }

var methodRE = regexp.MustCompile(`^[A-Z]{1,20}$`)

// durationRanges are the durations each duration field allows, by key
// path: Validate checks a decoded value against its range, and decoding
// names the range when a value is not a duration at all.
var durationRanges = map[string]durationRange{
	"timeout":                       {time.Millisecond, time.Hour, false},
	"streamIdleTimeout":             {time.Millisecond, 24 * time.Hour, false},
	"connectTimeout":                {time.Millisecond, time.Minute, false},
	"retry.perTryTimeout":           {time.Millisecond, time.Hour, true},
	"retry.backoff.base":            {time.Millisecond, 10 * time.Second, false},
	"retry.backoff.max":             {time.Millisecond, time.Minute, false},
	"circuitBreaker.window":         {time.Second, 10 * time.Minute, false},
	"circuitBreaker.openDuration":   {100 * time.Millisecond, time.Hour, false},
	"outlierDetection.ejectionTime": {100 * time.Millisecond, time.Hour, false},
	"concurrency.queueTimeout":      {time.Millisecond, time.Hour, false},
	"loadBalancer.slowStart":        {time.Second, time.Hour, true},
	"hedge.delay":                   {time.Millisecond, time.Minute, true},
}

// durationRange is lo to hi, and 0 for "none" when zeroOK.
type durationRange struct {
	lo, hi time.Duration
	zeroOK bool
}

func (r durationRange) String() string {
	s := fmt.Sprintf("%v to %v", r.lo, r.hi)
	if r.zeroOK {
		s += ", or 0 for none"
	}
	return s
}

// Validate checks every field of p and returns its problems as a *Problems
// of *FieldError values, each naming the field path (past MaxProblems they
// are only counted).
func (p Policy) Validate() error {
	var errs Problems
	add := func(path, value, allowed string) {
		errs.add(&FieldError{Path: path, Value: value, Allowed: allowed})
	}
	intIn := func(path string, v *int, lo, hi int) {
		if v != nil && (*v < lo || *v > hi) {
			add(path, strconv.Itoa(*v), fmt.Sprintf("%d to %d", lo, hi))
		}
	}
	floatIn := func(path string, v *float64, lo, hi float64, loOpen bool) {
		// Written so that NaN (YAML's .nan), unlike everything, fails.
		if v != nil && (!(*v >= lo && *v <= hi) || (loOpen && *v == lo)) {
			r := fmt.Sprintf("%g to %g", lo, hi)
			if loOpen {
				r = fmt.Sprintf("more than %g, at most %g", lo, hi)
			}
			add(path, strconv.FormatFloat(*v, 'g', -1, 64), r)
		}
	}
	durIn := func(path string, v *Duration) {
		r := durationRanges[path]
		if v == nil || (r.zeroOK && *v == 0) {
			return
		}
		if v.D() < r.lo || v.D() > r.hi {
			add(path, v.String(), r.String())
		}
	}

	if p.APIVersion != "" && p.APIVersion != APIVersion {
		add("apiVersion", Quote(p.APIVersion), APIVersion)
	}
	if p.Kind != "" && p.Kind != Kind {
		add("kind", Quote(p.Kind), Kind)
	}
	if p.Service != Default && !ValidServiceName(p.Service) {
		add("service", Quote(p.Service), `"*" or a service name: lower-case letters, digits and '-', at most 63`)
	}
	durIn("timeout", p.Timeout)
	durIn("streamIdleTimeout", p.StreamIdleTimeout)
	durIn("connectTimeout", p.ConnectTimeout)
	if r := p.Retry; r != nil {
		intIn("retry.attempts", r.Attempts, 1, 10)
		durIn("retry.perTryTimeout", r.PerTryTimeout)
		if r.PerTryTimeout != nil && p.Timeout != nil && r.PerTryTimeout.D() > p.Timeout.D() {
			add("retry.perTryTimeout", r.PerTryTimeout.String(), "at most timeout ("+p.Timeout.String()+")")
		}
		if b := r.Backoff; b != nil {
			durIn("retry.backoff.base", b.Base)
			durIn("retry.backoff.max", b.Max)
			if b.Base != nil && b.Max != nil && b.Max.D() < b.Base.D() {
				add("retry.backoff.max", b.Max.String(), "at least retry.backoff.base ("+b.Base.String()+")")
			}
		}
		for i, c := range r.On {
			switch {
			case validCondition(c):
			case errs.full():
				errs.More++ // a long list of bad values costs no message each
			default:
				add(fmt.Sprintf("retry.on[%d]", i), Quote(c), strings.Join(RetryConditions, ", ")+", or an HTTP status 400-599")
			}
		}
		for i, m := range r.Methods {
			switch {
			case methodRE.MatchString(m):
			case errs.full():
				errs.More++
			default:
				add(fmt.Sprintf("retry.methods[%d]", i), Quote(m), "an upper-case HTTP method such as GET")
			}
		}
		if b := r.Budget; b != nil {
			floatIn("retry.budget.ratio", b.Ratio, 0, 1, false)
			intIn("retry.budget.minPerSecond", b.MinPerSecond, 0, 100000)
		}
	}
	if cb := p.CircuitBreaker; cb != nil {
		intIn("circuitBreaker.consecutiveFailures", cb.ConsecutiveFailures, 1, 100000)
		floatIn("circuitBreaker.failureRatio", cb.FailureRatio, 0, 1, true)
		intIn("circuitBreaker.minRequests", cb.MinRequests, 1, 1000000)
		durIn("circuitBreaker.window", cb.Window)
		durIn("circuitBreaker.openDuration", cb.OpenDuration)
		intIn("circuitBreaker.halfOpenRequests", cb.HalfOpenRequests, 1, 1000)
	}
	if od := p.OutlierDetection; od != nil {
		intIn("outlierDetection.consecutiveFailures", od.ConsecutiveFailures, 1, 100000)
		durIn("outlierDetection.ejectionTime", od.EjectionTime)
		intIn("outlierDetection.maxEjectionPercent", od.MaxEjectionPercent, 0, 100)
	}
	if c := p.Concurrency; c != nil {
		intIn("concurrency.maxInFlight", c.MaxInFlight, 1, 1000000)
		intIn("concurrency.maxQueued", c.MaxQueued, 0, 100000)
		durIn("concurrency.queueTimeout", c.QueueTimeout)
	}
	if lb := p.LoadBalancer; lb != nil {
		if lb.Policy != nil && !slices.Contains(LoadBalancers, *lb.Policy) {
			add("loadBalancer.policy", Quote(*lb.Policy), strings.Join(LoadBalancers, ", "))
		}
		durIn("loadBalancer.slowStart", lb.SlowStart)
	}
	if h := p.Hedge; h != nil {
		durIn("hedge.delay", h.Delay)
		intIn("hedge.maxHedges", h.MaxHedges, 1, 3)
	}
	return errs.err()
}

func validCondition(c string) bool {
	if slices.Contains(RetryConditions, c) {
		return true
	}
	// An HTTP status 400-599, checked without strconv (whose error for each
	// bad value of a long list would cost an allocation).
	return len(c) == 3 && (c[0] == '4' || c[0] == '5') && c[1] >= '0' && c[1] <= '9' && c[2] >= '0' && c[2] <= '9'
}

// MaxDocumentBytes is the most a policy file or a Consul KV value may hold:
// 1 MiB, a ConfigMap's limit (Consul's for a value is 512 KB). A policy is
// a few hundred bytes, and parsing YAML costs a hundred times its size in
// memory: a 10 MB file took 1.7 GB.
const MaxDocumentBytes = 1 << 20

// tooLarge is the error for data over MaxDocumentBytes, or nil.
func tooLarge(data []byte, name string) error {
	if len(data) <= MaxDocumentBytes {
		return nil
	}
	return fmt.Errorf("%s: %d bytes is too large (allowed: at most %d, 1 MiB)", name, len(data), MaxDocumentBytes)
}

// Parse decodes every Policy document in data (YAML, "---"-separated, or
// JSON) strictly and validates each. file names the source in errors, which
// carry the line: "policies.yaml:9: document 2: retry.attempts: 0 is not
// allowed (allowed: 1 to 10)". All problems are returned together, as a
// *Problems: the first MaxProblems listed, the rest counted. data over
// MaxDocumentBytes is refused unread.
func Parse(data []byte, file string) ([]Policy, error) {
	if err := tooLarge(data, file); err != nil {
		return nil, &Problems{Errs: []error{err}}
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var (
		out  []Policy
		errs Problems
		seen = map[string]int{}
	)
	for i := 1; ; i++ {
		var doc yaml.Node
		err := dec.Decode(&doc)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			errs.addAll("", decodeProblems(file, err))
			break
		}
		if len(doc.Content) == 0 {
			continue
		}
		p, err := DecodePolicyNode(&doc, file, fmt.Sprintf("%s:%d: document %d", file, doc.Content[0].Line, i))
		if err != nil {
			errs.addAll("", err)
			continue
		}
		if j, dup := seen[p.Service]; dup {
			errs.add(fmt.Errorf("%s: document %d: service %s already has a policy in document %d", file, i, Quote(p.Service), j))
			continue
		}
		seen[p.Service] = i
		out = append(out, p)
	}
	return out, errs.err()
}

// DecodePolicyNode decodes one Policy strictly and validates it. Decoding
// errors name file, line and key path, and for a value of the wrong type
// what was wanted; validation errors are prefixed with where. Its problems
// come as a *Problems.
func DecodePolicyNode(n *yaml.Node, file, where string) (Policy, error) {
	var p Policy
	if err := decodeNode(n, file, &p, &checker{file: file, typed: true, durations: durationRanges}); err != nil {
		return p, err
	}
	if p.Service == "" {
		return p, &Problems{Errs: []error{fmt.Errorf("%s: service: missing (allowed: \"*\" or a service name)", where)}}
	}
	if err := p.Validate(); err != nil {
		var ps Problems
		ps.addAll(where+": ", err)
		return p, &ps
	}
	return p, nil
}
