package policy

import (
	"fmt"
	"math"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Origins of a value in an Explanation: the built-in Defaults, the "*"
// policy, or (any other string) the service's own document.
const (
	FromDefault = "default"
	FromStar    = Default
)

// Explanation is what a service's effective policy means for its requests:
// every value with where it came from, the worst case of attempts, time and
// load, the breaker's and the outlier detector's rules in words, and
// warnings about combinations that do not do what they seem to. It is a
// plain value, computed by Explain or ExplainInForce.
type Explanation struct {
	Service string `json:"service"`
	// Effective is the policy in force after defaults and merging.
	Effective Policy `json:"effective"`
	// Fields lists every value of Effective in document order.
	Fields []Field `json:"fields"`
	// OriginsInferred is set when the origins were inferred from
	// effective policies only (ExplainInForce), not read from documents.
	OriginsInferred bool `json:"originsInferred,omitempty"`

	// MaxAttempts is the most attempts one request makes, the first try
	// included: retry.attempts, or 1 when nothing can be retried (no
	// retry.on conditions, or a budget of ratio 0 and minPerSecond 0).
	MaxAttempts int `json:"maxAttempts"`
	// Backoffs is the longest backoff before each retry (Backoff.Longest:
	// exponential from retry.backoff.base, capped at retry.backoff.max;
	// full jitter picks anything from 0 to it).
	Backoffs []Duration `json:"backoffs"`
	// RetryAfterMax is how long a Retry-After answer can stretch one
	// backoff (Backoff.RetryAfterMax): max(retry.backoff.max, 1s).
	RetryAfterMax Duration `json:"retryAfterMax"`
	// AttemptsTime is MaxAttempts × perTryTimeout plus every backoff at its
	// longest; 0 when perTryTimeout is 0 (attempts are bounded only by
	// the overall timeout).
	AttemptsTime Duration `json:"attemptsTime"`
	// FittingAttempts is how many attempts of a full perTryTimeout, with
	// their backoffs at the longest, fit in timeout; MaxAttempts when
	// perTryTimeout is 0.
	FittingAttempts int `json:"fittingAttempts"`
	// Longest is the longest a request can take before the sidecar answers:
	// min(timeout, AttemptsTime), or timeout when perTryTimeout is 0.
	Longest Duration `json:"longest"`
	// LongestByTimeout says that timeout, not AttemptsTime, bounds Longest.
	LongestByTimeout bool `json:"longestByTimeout"`
	// LongestWithRetryAfter is Longest when answers carry a Retry-After
	// that stretches every backoff to RetryAfterMax.
	LongestWithRetryAfter Duration `json:"longestWithRetryAfter"`
	// ConnectTimeout bounds opening a connection in one attempt:
	// connectTimeout, or perTryTimeout or timeout when shorter.
	ConnectTimeout Duration `json:"connectTimeout"`
	// Load is the worst case of attempts per second at a few request rates,
	// with every attempt failing and retryable.
	Load []Load `json:"load"`

	// Bounds says in words how long each kind of answer may take: its
	// headers, an answer of known length, a stream.
	Bounds []string `json:"bounds"`

	// CircuitBreaker, OutlierDetection and Concurrency say in words when
	// each acts and what it does.
	CircuitBreaker   []string `json:"circuitBreaker"`
	OutlierDetection []string `json:"outlierDetection"`
	Concurrency      []string `json:"concurrency"`
	// LoadBalancer and Hedge say how an attempt's endpoint is chosen, and
	// when a request is sent to a second one while the first is out.
	LoadBalancer []string `json:"loadBalancer"`
	Hedge        []string `json:"hedge"`

	Warnings []Warning `json:"warnings"`
}

// Field is one value of an effective policy and where it came from.
type Field struct {
	// Path is the field's YAML path, e.g. "retry.backoff.base".
	Path string `json:"path"`
	// Value is the value as YAML writes it: "25ms", "0.2", "[GET, HEAD]".
	Value string `json:"value"`
	// Origin is FromDefault, FromStar or the service's name.
	Origin string `json:"origin"`
}

// Load is the worst case at one request rate: every attempt fails in a way
// that is retried, so the retry budget is all that holds retries back.
type Load struct {
	RequestsPerSecond float64 `json:"requestsPerSecond"`
	// RetriesPerSecond is min((MaxAttempts-1) × rate, ratio × rate +
	// minPerSecond).
	RetriesPerSecond float64 `json:"retriesPerSecond"`
	// Factor is attempts per request: 1 + RetriesPerSecond / rate.
	Factor float64 `json:"factor"`
	// ByBudget says the budget, not retry.attempts, is the limit.
	ByBudget bool `json:"byBudget"`
}

// Warning is a combination of values that does not do what it seems to.
type Warning struct {
	// Code names the kind of warning, stable for scripts and tests:
	// "per-try-timeout-exceeds-timeout", "no-per-try-timeout", ...
	Code string `json:"code"`
	// Fields are the paths involved.
	Fields  []string `json:"fields"`
	Message string   `json:"message"`
}

// LoadRates are the request rates Explanation.Load is computed at.
var LoadRates = []float64{1, 10, 100, 1000}

// Explain explains service's effective policy as Effective computes it from
// byService (the documents by service; "*" is the default). A value's
// origin is the last document that sets it.
func Explain(service string, byService map[string]Policy) Explanation {
	eff := Effective(service, byService)
	layers := []originLayer{{name: FromDefault, set: setLeaves(Defaults())}}
	if d, ok := byService[Default]; ok {
		layers = append(layers, originLayer{name: FromStar, set: setLeaves(d)})
	}
	if s, ok := byService[service]; ok && service != Default {
		layers = append(layers, originLayer{name: service, set: setLeaves(s)})
	}
	e := Explanation{Service: service, Effective: eff}
	for _, l := range leaves(eff) {
		f := Field{Path: l.path, Value: l.value, Origin: FromDefault}
		for _, layer := range layers {
			if layer.set[l.path] {
				f.Origin = layer.name
			}
		}
		e.Fields = append(e.Fields, f)
	}
	e.analyze()
	return e
}

// ExplainInForce explains a policy in force as a running sidecar reports
// it, where only effective policies are known. A value's origin is
// inferred: the first of Defaults, star (the "*" policy in force) and
// effective in which it differs from the one before; a value set to what it
// would have been anyway shows the origin below. hasOwn says whether the
// service has a document of its own. With star nil (not known), a value
// that differs from Defaults shows as "* or SERVICE", or "*" without hasOwn.
func ExplainInForce(service string, star *Policy, effective Policy, hasOwn bool) Explanation {
	eff := Merge(Defaults(), effective)
	eff.Service = service
	defaults := leafValues(Defaults())
	below := defaults
	var starValues map[string]string
	if star != nil && service != Default {
		starValues = leafValues(Merge(Defaults(), *star))
		below = starValues
	}
	e := Explanation{Service: service, Effective: eff, OriginsInferred: true}
	for _, l := range leaves(eff) {
		f := Field{Path: l.path, Value: l.value, Origin: FromDefault}
		switch {
		case service == Default && l.value != defaults[l.path]:
			f.Origin = FromStar
		case service == Default:
		case l.value != below[l.path] && starValues != nil && hasOwn:
			f.Origin = service
		case l.value != below[l.path] && hasOwn:
			f.Origin = FromStar + " or " + service
		case l.value != below[l.path]:
			f.Origin = FromStar
		case starValues != nil && starValues[l.path] != defaults[l.path]:
			f.Origin = FromStar
		}
		e.Fields = append(e.Fields, f)
	}
	e.analyze()
	return e
}

type originLayer struct {
	name string
	set  map[string]bool
}

type leaf struct {
	path, value string
}

// leaves lists the set values of p (not apiVersion, kind or service) in
// document order.
func leaves(p Policy) []leaf {
	var out []leaf
	walkLeaves(reflect.ValueOf(p), "", func(path string, v reflect.Value) {
		out = append(out, leaf{path, formatLeaf(v)})
	})
	return out
}

func setLeaves(p Policy) map[string]bool {
	set := map[string]bool{}
	for _, l := range leaves(p) {
		set[l.path] = true
	}
	return set
}

func leafValues(p Policy) map[string]string {
	m := map[string]string{}
	for _, l := range leaves(p) {
		m[l.path] = l.value
	}
	return m
}

// walkLeaves calls fn for every set leaf below struct v: pointers to
// scalars and slices; nil ones and the document's header are skipped.
func walkLeaves(v reflect.Value, prefix string, fn func(path string, v reflect.Value)) {
	t := v.Type()
	for i := 0; i < t.NumField(); i++ {
		name, _, _ := strings.Cut(t.Field(i).Tag.Get("yaml"), ",")
		f := v.Field(i)
		switch {
		case f.Kind() == reflect.String: // apiVersion, kind, service
		case f.IsNil():
		case f.Kind() == reflect.Pointer && f.Elem().Kind() == reflect.Struct:
			walkLeaves(f.Elem(), prefix+name+".", fn)
		case f.Kind() == reflect.Pointer:
			fn(prefix+name, f.Elem())
		default:
			fn(prefix+name, f)
		}
	}
}

func formatLeaf(v reflect.Value) string {
	switch x := v.Interface().(type) {
	case Duration:
		return x.String()
	case int:
		return strconv.Itoa(x)
	case float64:
		return strconv.FormatFloat(x, 'g', -1, 64)
	case List:
		return "[" + strings.Join(x, ", ") + "]"
	}
	return fmt.Sprint(v.Interface())
}

// idempotentMethods may be sent twice with the effect of once (RFC 9110
// 9.2.2).
var idempotentMethods = []string{"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"}

// analyze fills in everything but the fields, from e.Effective, which has
// every field set.
func (e *Explanation) analyze() {
	p := e.Effective
	r, cb, od := p.Retry, p.CircuitBreaker, p.OutlierDetection
	T, P := p.Timeout.D(), r.PerTryTimeout.D()
	ratio, floor := *r.Budget.Ratio, *r.Budget.MinPerSecond
	budgetOff := ratio == 0 && floor == 0

	e.MaxAttempts = *r.Attempts
	if len(r.On) == 0 || budgetOff {
		e.MaxAttempts = 1
	}
	e.Backoffs = []Duration{}
	for k := 1; k < e.MaxAttempts; k++ {
		e.Backoffs = append(e.Backoffs, Duration(r.Backoff.Longest(k)))
	}
	e.RetryAfterMax = Duration(r.Backoff.RetryAfterMax())
	backoffSum := func(n int) (s time.Duration) {
		for _, b := range e.Backoffs[:n] {
			s += b.D()
		}
		return s
	}
	e.Longest, e.LongestByTimeout, e.FittingAttempts = Duration(T), true, e.MaxAttempts
	e.LongestWithRetryAfter = e.Longest
	if P > 0 {
		e.AttemptsTime = Duration(time.Duration(e.MaxAttempts)*P + backoffSum(e.MaxAttempts-1))
		if e.AttemptsTime.D() <= T {
			e.Longest, e.LongestByTimeout = e.AttemptsTime, false
		}
		e.LongestWithRetryAfter = Duration(min(T, time.Duration(e.MaxAttempts)*P+time.Duration(e.MaxAttempts-1)*e.RetryAfterMax.D()))
		e.FittingAttempts = 0
		for k := 1; k <= e.MaxAttempts && time.Duration(k)*P+backoffSum(k-1) <= T; k++ {
			e.FittingAttempts = k
		}
	}
	e.ConnectTimeout = *p.ConnectTimeout
	if P > 0 && P < e.ConnectTimeout.D() {
		e.ConnectTimeout = Duration(P)
	}
	if T < e.ConnectTimeout.D() {
		e.ConnectTimeout = Duration(T)
	}
	for _, rate := range LoadRates {
		l := Load{RequestsPerSecond: rate, RetriesPerSecond: float64(e.MaxAttempts-1) * rate}
		if b := ratio*rate + float64(floor); b < l.RetriesPerSecond {
			l.RetriesPerSecond, l.ByBudget = b, true
		}
		l.Factor = 1 + l.RetriesPerSecond/rate
		e.Load = append(e.Load, l)
	}

	e.Bounds = boundsWords(p)
	e.CircuitBreaker = breakerWords(e.target(), cb)
	e.OutlierDetection = outlierWords(e.target(), od)
	e.Concurrency = []string{concurrencyWords(e.target(), p.Concurrency)}
	e.LoadBalancer = []string{balancerWords(p.LoadBalancer)}
	e.Hedge = []string{e.hedgeWords()}
	e.Warnings = e.warnings(backoffSum(max(e.MaxAttempts-1, 0)))
}

// boundsWords says how each kind of answer is bounded in time: the
// headers and an answer of known length by timeout, a stream by its
// silence.
func boundsWords(p Policy) []string {
	T, P, idle := FormatDuration(p.Timeout.D()), p.Retry.PerTryTimeout.D(), FormatDuration(p.StreamIdleTimeout.D())
	headers := "Response headers: within timeout (" + T + ") of the request's start, every attempt and backoff included"
	if P > 0 {
		headers += ", each attempt's within perTryTimeout (" + FormatDuration(P) + ")"
	}
	return []string{
		headers + "; else 504 upstream_timeout.",
		"An answer of known length (Content-Length): whole, body included, within timeout (" + T + "); past it the " +
			"answer is cut short (the connection closed).",
		"A stream (gRPC, text/event-stream, or a body whose length its headers do not give: chunked, ended by the " +
			"close, HTTP/2 without content-length): as long as it keeps sending, past timeout; cut after " +
			"streamIdleTimeout (" + idle + ") without a byte from the upstream: gRPC gets DEADLINE_EXCEEDED in its " +
			"trailers, HTTP an aborted body.",
		"Every one ends at the caller's own deadline (a gRPC client's grpc-timeout) or when the caller goes away.",
	}
}

func balancerWords(lb *LoadBalancer) string {
	var w string
	switch *lb.Policy {
	case LeastRequest:
		w = "least-request: of two endpoints drawn at random, the one with fewer requests in flight from this sidecar (per unit of weight)."
	case P2CEWMA:
		w = "p2c-ewma: of two endpoints drawn at random, the one with the lower peak-EWMA latency times requests in flight " +
			"(per unit of weight): a slow or stalled endpoint gets little traffic until it answers fast again."
	default:
		w = "round-robin: the endpoints in turn, smoothly weighted when their weights differ."
	}
	w += " Consul's instance weights count (Weights.Passing, Weights.Warning for an instance whose checks warn); ejected endpoints " +
		"are skipped, and a retry goes to another endpoint when there is one."
	if d := lb.SlowStart.D(); d > 0 {
		w += " A new or returning endpoint's share ramps up from a tenth of its weight over slowStart (" + FormatDuration(d) + ")."
	}
	return w
}

// hedgeWords says when a request is hedged, and what a hedge costs.
func (e *Explanation) hedgeWords() string {
	p := e.Effective
	h, r := p.Hedge, p.Retry
	if !h.On() {
		return "Off (hedge.delay 0s): each attempt runs alone; a retry starts only once it failed."
	}
	who := "an idempotent request (retry.methods: " + strings.Join(r.Methods, ", ") + ", or any with an Idempotency-Key)"
	if len(r.Methods) == 0 {
		who = "a request with an Idempotency-Key (retry.methods is empty)"
	}
	delay := FormatDuration(h.Delay.D())
	w := fmt.Sprintf("When %s, whose body is held in memory, has no answer %s after an attempt started, it is also sent to another "+
		"endpoint, up to %s, one delay apart; the first complete answer wins (a success, or a failure retry.on does not name) "+
		"and the other attempts are cancelled.", who, delay, plural(*h.MaxHedges, "hedge"))
	hedges := min(*h.MaxHedges, e.MaxAttempts-1)
	w += fmt.Sprintf(" Each hedge is an attempt: with retry.attempts %d, a request sends at most %s, and every hedge takes a retry "+
		"from the retry budget (%s of requests plus %d a second), so hedging adds no more load than retries could.",
		*r.Attempts, plural(hedges, "hedge"), percent(*r.Budget.Ratio), *r.Budget.MinPerSecond)
	return w
}

func concurrencyWords(service string, c *Concurrency) string {
	if c.IsAdaptive() {
		return adaptiveWords(service, c)
	}
	w := fmt.Sprintf("At most %d requests to %s in flight from this sidecar (each pod's sidecar counts its own); ", *c.MaxInFlight, service)
	if *c.MaxQueued == 0 {
		w += "the next is answered 503 overloaded at once: nothing queues."
	} else {
		w += fmt.Sprintf("up to %d more wait for a slot, first come first served, for at most %s each (and never past the request's timeout); "+
			"past that, or with the line full, 503 overloaded.", *c.MaxQueued, FormatDuration(c.QueueTimeout.D()))
	}
	return w + " The sidecar-wide limits.outboundMaxInFlight applies too."
}

func breakerWords(service string, cb *CircuitBreaker) []string {
	open := FormatDuration(cb.OpenDuration.D())
	probes := "1 probe request goes through: if it succeeds the breaker closes, if it fails it opens again for " + open + "."
	if n := *cb.HalfOpenRequests; n > 1 {
		probes = fmt.Sprintf("%d probe requests go through: %d successes in a row close it, a failure opens it again for %s.", n, n, open)
	}
	n, x := cb.WindowToTrip()
	chance := fmt.Sprintf("With %s failing at random (a path that always fails, among healthy ones), it opens by chance ",
		shareWords(FailingPathShare))
	if every := cb.RequestsBetweenOpenings(FailingPathShare); every >= QuietRequests {
		chance += "less than once in " + roughCount(QuietRequests) + " requests."
	} else {
		chance += "about once in " + roughCount(every) + " requests (see the warnings)."
	}
	return []string{
		"Counts requests, by their outcome after retries, not attempts: a request a retry saved is a success, and an " +
			"instance that fails is outlier detection's to eject. Failures: 5xx answers, connection failures, resets and " +
			"timeouts. 2xx-4xx answers are successes; the client's own cancellations and the sidecar's refusals do not count.",
		fmt.Sprintf("Opens after %s in a row, or when at least %d requests were seen in the last %s and %s or more of them failed (%d of %d).",
			plural(cb.RunToTrip(), "failed request"), n, FormatDuration(cb.Window.D()), percent(*cb.FailureRatio), x, n),
		chance,
		fmt.Sprintf("While open (%s), every request to %s is answered 503 circuit_open at once, without a call; retries stop.", open, service),
		"Then half-open: " + probes,
	}
}

// The traffic a breaker is checked against: it must not open by chance
// where a service without the sidecar would answer most requests.
const (
	// FailingPathShare is the share of requests that fail when one path
	// in ten always fails and the others succeed: retries do not save
	// them, so the breaker counts every one.
	FailingPathShare = 0.1
	// FailingInstanceShare is the share of attempts that fail when one
	// instance of three answers 503 to half its calls.
	FailingInstanceShare = 1.0 / 6
	// QuietRequests is how many requests must pass, on average, between
	// openings by chance for explain to call a breaker safe: 10^10, four
	// months at 1000 requests a second.
	QuietRequests = 1e10
)

// failingInstanceRequests is the share of GETs that fail when one
// instance of three answers 503 to half its calls: none when such a GET is
// retried (the retry goes to another instance) within the budget; what
// the budget's ratio leaves otherwise, or all of FailingInstanceShare
// without retries of 503 GETs.
func (e *Explanation) failingInstanceRequests() float64 {
	r := e.Effective.Retry
	if e.MaxAttempts < 2 || !slices.Contains(r.On, "503") || !slices.Contains(r.Methods, "GET") {
		return FailingInstanceShare
	}
	return max(0, FailingInstanceShare-*r.Budget.Ratio)
}

// shareWords writes a share of requests as "1 request in 10".
func shareWords(f float64) string {
	return "1 request in " + strconv.FormatFloat(math.Round(1/f), 'f', -1, 64)
}

// roughCount writes a count in words, to two figures: "110 thousand",
// "2.8 million", "10 billion", "10^20".
func roughCount(n float64) string {
	if n >= 1e15 {
		return "10^" + strconv.Itoa(int(math.Floor(math.Log10(n))))
	}
	unit, name := 1.0, ""
	for _, u := range []struct {
		v    float64
		name string
	}{{1e12, " trillion"}, {1e9, " billion"}, {1e6, " million"}, {1e3, " thousand"}} {
		if n >= u.v {
			unit, name = u.v, u.name
			break
		}
	}
	v := n / unit
	switch mag := int(math.Floor(math.Log10(v))); {
	case v < 1:
		v = math.Round(v*10) / 10
	case mag >= 1:
		p := math.Pow10(mag - 1)
		v = math.Round(v/p) * p
	default:
		v = math.Round(v*10) / 10
	}
	return strconv.FormatFloat(v, 'f', -1, 64) + name
}

// roughDuration writes how long n requests take at rate a second, to a
// whole unit: "19m", "7h", "3 days".
func roughDuration(n, rate float64) string {
	s := n / rate
	switch {
	case s < 1:
		return "under a second"
	case s < 60:
		return FormatDuration(time.Duration(math.Ceil(s)) * time.Second)
	case s < 3600:
		return FormatDuration(time.Duration(math.Round(s/60)) * time.Minute)
	case s < 48*3600:
		return FormatDuration(time.Duration(math.Round(s/3600)) * time.Hour)
	}
	return strconv.FormatFloat(math.Round(s/86400), 'f', -1, 64) + " days"
}

func outlierWords(service string, od *OutlierDetection) []string {
	t, pct := od.EjectionTime.D(), *od.MaxEjectionPercent
	out := []string{fmt.Sprintf("Per endpoint: an endpoint of %s failing %s in a row (5xx, connection failure, reset, timeout) "+
		"is skipped for %s; each further ejection of it lasts longer (%s, %s, ... up to %s).",
		service, plural(*od.ConsecutiveFailures, "attempt"), FormatDuration(t), FormatDuration(2*t), FormatDuration(3*t), FormatDuration(10*t))}
	switch n := MinEndpointsToEject(pct); {
	case pct == 0:
		out = append(out, "maxEjectionPercent is 0: no endpoint is ever ejected.")
	case pct == 100:
		out = append(out, "Every endpoint but the last can be ejected at once.")
	default:
		out = append(out, fmt.Sprintf("At most %d%% of the endpoints are ejected at once, and never the last one: "+
			"it takes at least %d endpoints for one to be ejected.", pct, n))
	}
	return out
}

// MinEndpointsToEject is how many endpoints a service needs for the
// outlier detector to eject one, given maxEjectionPercent: the cap
// (endpoints × percent / 100, rounded down) must reach 1 and one endpoint
// must stay. 0 when percent is 0: nothing is ever ejected.
func MinEndpointsToEject(percent int) int {
	if percent <= 0 {
		return 0
	}
	return max(2, (100+percent-1)/percent)
}

// warnings lists the combinations that do not do what they seem to, most
// consequential first. backoffs is the sum of the longest backoffs.
func (e *Explanation) warnings(backoffs time.Duration) []Warning {
	p := e.Effective
	r, cb, od := p.Retry, p.CircuitBreaker, p.OutlierDetection
	T, P, N := p.Timeout.D(), r.PerTryTimeout.D(), *r.Attempts
	out := []Warning{}
	add := func(code string, fields []string, format string, args ...any) {
		out = append(out, Warning{Code: code, Fields: fields, Message: fmt.Sprintf(format, args...)})
	}
	retries := e.MaxAttempts > 1
	ratio, floor := *r.Budget.Ratio, *r.Budget.MinPerSecond

	if N > 1 && ratio == 0 && floor == 0 {
		add("retries-off-by-budget", []string{"retry.budget.ratio", "retry.budget.minPerSecond"},
			"retry.budget allows no retry (ratio 0 and minPerSecond 0): retries are off and retry.attempts (%d) has no effect. "+
				"Set attempts: 1 to say so, or give the budget a ratio such as 0.2.", N)
	}
	if N > 1 && len(r.On) == 0 {
		add("no-retry-conditions", []string{"retry.on"},
			"retry.on is empty: nothing is ever retried and retry.attempts (%d) has no effect.", N)
	}
	// The time an attempt may take if every attempt should fit: the
	// timeout, less the backoffs, shared by the attempts.
	share := (T - backoffs) / time.Duration(max(e.MaxAttempts, 1))
	share = share.Truncate(time.Millisecond)
	switch {
	case retries && P > 0 && e.AttemptsTime.D() > T:
		fix := fmt.Sprintf("Raise timeout to %s", FormatDuration(e.AttemptsTime.D()))
		if share > 0 {
			fix += ", or lower perTryTimeout to " + FormatDuration(share)
		}
		if e.FittingAttempts > 0 {
			fix += fmt.Sprintf(", or attempts to %d", e.FittingAttempts)
		}
		add("per-try-timeout-exceeds-timeout", []string{"retry.perTryTimeout", "retry.attempts", "timeout"},
			"retry.perTryTimeout × retry.attempts does not fit in timeout: %d × %s + up to %s of backoff = %s > %s. "+
				"Only %s of a full %s %s; a later one is cut short by the timeout, or not started. %s.",
			e.MaxAttempts, FormatDuration(P), FormatDuration(backoffs), FormatDuration(e.AttemptsTime.D()), FormatDuration(T),
			plural(e.FittingAttempts, "attempt"), FormatDuration(P), verb(e.FittingAttempts, "fits", "fit"), fix)
	case retries && P == 0:
		msg := fmt.Sprintf("retry.perTryTimeout is 0: an attempt is bounded only by timeout (%s), so a slow first attempt "+
			"uses all of it and is never retried; retries happen only after fast failures.", FormatDuration(T))
		if share > 0 {
			msg += fmt.Sprintf(" Set perTryTimeout to at most %s (timeout less backoff, shared by %d attempts)", FormatDuration(share), e.MaxAttempts)
			if !slices.Contains(r.On, "timeout") {
				msg += " and add timeout to retry.on"
			}
			msg += "."
		}
		if slices.Contains(r.On, "timeout") {
			msg += " retry.on's timeout never applies without it."
		}
		add("no-per-try-timeout", []string{"retry.perTryTimeout"}, "%s", msg)
	}
	if retries && P > 0 && !slices.Contains(r.On, "timeout") {
		add("per-try-timeout-not-retried", []string{"retry.perTryTimeout", "retry.on"},
			"retry.perTryTimeout (%s) ends a slow attempt, but retry.on lacks timeout: the request then fails "+
				"instead of trying another endpoint. Add timeout to retry.on.", FormatDuration(P))
	}
	var unsafe []string
	for _, m := range r.Methods {
		if !slices.Contains(idempotentMethods, m) {
			unsafe = append(unsafe, m)
		}
	}
	var afterSend []string
	for _, c := range r.On {
		if c != "connect-failure" {
			afterSend = append(afterSend, c)
		}
	}
	if retries && len(unsafe) > 0 && len(afterSend) > 0 {
		msg := fmt.Sprintf("retry.methods includes %s, which %s not idempotent: a request that reached %s and then failed (%s) "+
			"is sent again and may take effect twice. Remove %s: a request with an Idempotency-Key header is retried whatever its method",
			strings.Join(unsafe, ", "), verb(len(unsafe), "is", "are"), e.target(), strings.Join(afterSend, ", "), verb(len(unsafe), "it", "them"))
		if slices.Contains(r.On, "connect-failure") {
			msg += ", and a connect failure (nothing was sent) is retried for every method"
		}
		add("non-idempotent-retry", []string{"retry.methods"}, "%s.", msg)
	}
	// 408 (the upstream gave up waiting for the request) is worth a
	// retry; 429 is a request for less traffic; any other 4xx refuses the
	// request itself.
	var refused []string
	has429 := false
	for _, c := range r.On {
		n, err := strconv.Atoi(c)
		switch {
		case err != nil || n < 400 || n >= 500 || n == 408:
		case n == 429:
			has429 = true
		default:
			refused = append(refused, c)
		}
	}
	if retries && (len(refused) > 0 || has429) {
		var msg []string
		if len(refused) > 0 {
			msg = append(msg, fmt.Sprintf("retry.on includes %s: a 4xx says the request itself was refused; sent again it is "+
				"usually refused again, costing up to %d attempts each.", strings.Join(refused, ", "), e.MaxAttempts))
		}
		if has429 {
			msg = append(msg, fmt.Sprintf("retry.on includes 429, a request for less traffic: retrying it adds load where there "+
				"is too much (its Retry-After is honoured, up to %s).", FormatDuration(e.RetryAfterMax.D())))
		}
		add("retry-on-4xx", []string{"retry.on"}, "%s", strings.Join(msg, " "))
	}
	C := p.ConnectTimeout.D()
	switch {
	case C >= T:
		add("connect-timeout-not-below-timeout", []string{"connectTimeout", "timeout"},
			"connectTimeout (%s) is not shorter than timeout (%s): one unreachable endpoint uses the whole request, "+
				"with no time left to try another.", FormatDuration(C), FormatDuration(T))
	case P > 0 && C > P:
		add("connect-timeout-unused", []string{"connectTimeout", "retry.perTryTimeout"},
			"connectTimeout (%s) is longer than retry.perTryTimeout (%s): connecting is cut short at %s, so connectTimeout has no effect.",
			FormatDuration(C), FormatDuration(P), FormatDuration(P))
	}
	open := FormatDuration(cb.OpenDuration.D())
	if cb.RunToTrip() == 1 {
		add("breaker-opens-on-one-failure", []string{"circuitBreaker.consecutiveFailures"},
			"circuitBreaker.consecutiveFailures is 1: a single failed request opens the breaker, and every request to %s "+
				"is refused for %s.", e.target(), open)
	}
	// A breaker must not open where a service without the sidecar would
	// answer nearly every request: a path that always fails among healthy
	// ones, an instance that fails half its calls.
	for _, c := range []struct {
		code, what string
		share      float64
	}{
		{"breaker-opens-on-failing-path", "a path that always fails, among healthy ones", FailingPathShare},
		{"breaker-opens-on-failing-instance", "one instance of three answering 503 to half its calls, which retries do not hide", e.failingInstanceRequests()},
	} {
		every := cb.RequestsBetweenOpenings(c.share)
		if every >= QuietRequests {
			continue
		}
		// Each rule that opens too often is raised until it alone opens
		// half as often as allowed, so that both together pass.
		var fields, fixes []string
		if cb.requestsBetweenRuns(c.share) < 2*QuietRequests {
			k := smallest(cb.RunToTrip(), maxCount, func(k int) bool {
				return (&CircuitBreaker{ConsecutiveFailures: &k}).requestsBetweenRuns(c.share) >= 2*QuietRequests
			})
			fields = append(fields, "circuitBreaker.consecutiveFailures")
			fixes = append(fixes, fmt.Sprintf("circuitBreaker.consecutiveFailures to at least %d", k))
		}
		if cb.requestsBetweenWindows(c.share) < 2*QuietRequests {
			m := smallest(*cb.MinRequests, 1000000, func(m int) bool {
				return (&CircuitBreaker{MinRequests: &m, FailureRatio: cb.FailureRatio}).requestsBetweenWindows(c.share) >= 2*QuietRequests
			})
			fields = append(fields, "circuitBreaker.minRequests", "circuitBreaker.failureRatio")
			if m <= 1000000 {
				fixes = append(fixes, fmt.Sprintf("circuitBreaker.minRequests to at least %d", m))
			} else {
				fixes = append(fixes, "circuitBreaker.failureRatio well above "+percent(c.share))
			}
		}
		add(c.code, fields,
			"With %s failing (%s), the breaker opens by chance about once in %s requests (at 100 requests/s: every %s), "+
				"and refuses every request to %s for %s though most would succeed. Raise %s.",
			shareWords(c.share), c.what, roughCount(every), roughDuration(every, 100), e.target(), open,
			strings.Join(fixes, " and "))
	}
	// When the service is slow, each request holds a slot for as long as
	// it may take: that caps the requests a window sees.
	slow := e.Longest.D()
	inFlight, window, minReq := *p.Concurrency.MaxInFlight, cb.Window.D(), *cb.MinRequests
	if perWindow := float64(inFlight) * window.Seconds() / slow.Seconds(); perWindow < float64(minReq) {
		add("failure-ratio-unreachable", []string{"concurrency.maxInFlight", "circuitBreaker.minRequests"},
			"concurrency.maxInFlight (%d) with requests of up to %s lets at most %d requests finish in a %s window when %s is slow, "+
				"fewer than circuitBreaker.minRequests (%d): the failure-ratio rule cannot trip on a slow service; only %s in a row open the breaker.",
			inFlight, FormatDuration(slow), int(math.Floor(perWindow)), FormatDuration(window), e.target(), minReq,
			plural(cb.RunToTrip(), "failure"))
	}
	if w := adaptiveWarning(p.Concurrency, e.Fields); w != nil {
		out = append(out, *w)
	}
	if h := p.Hedge; h.On() {
		switch {
		case e.MaxAttempts < 2:
			add("hedge-never-sent", []string{"hedge.delay", "retry.attempts", "retry.budget"},
				"hedge.delay is set but no hedge is ever sent: a hedge is an attempt, and retry.attempts, retry.on and retry.budget "+
					"allow only one. Raise retry.attempts to %d and give the budget a ratio.", 1+*h.MaxHedges)
		case P > 0 && h.Delay.D() >= P:
			add("hedge-after-per-try-timeout", []string{"hedge.delay", "retry.perTryTimeout"},
				"hedge.delay (%s) is not shorter than retry.perTryTimeout (%s): an attempt times out before its hedge is due. "+
					"A delay near the service's 95th percentile latency hedges the slowest 5%%.",
				FormatDuration(h.Delay.D()), FormatDuration(P))
		case h.Delay.D() >= T:
			add("hedge-after-timeout", []string{"hedge.delay", "timeout"},
				"hedge.delay (%s) is not shorter than timeout (%s): no hedge is ever due.", FormatDuration(h.Delay.D()), FormatDuration(T))
		}
	}
	switch pct := *od.MaxEjectionPercent; {
	case pct == 100:
		add("all-endpoints-ejectable", []string{"outlierDetection.maxEjectionPercent"},
			"outlierDetection.maxEjectionPercent is 100: every endpoint but one can be ejected at once, and the last one takes "+
				"all of this sidecar's traffic to %s. 50 or less keeps at least half of them in rotation.", e.target())
	case pct > 0 && MinEndpointsToEject(pct) > 2:
		add("ejection-needs-many-endpoints", []string{"outlierDetection.maxEjectionPercent"},
			"outlierDetection.maxEjectionPercent is %d: no endpoint is ejected unless %s has at least %d endpoints.",
			pct, e.target(), MinEndpointsToEject(pct))
	}
	return out
}

// target names the service in sentences; the "*" policy speaks of any.
func (e *Explanation) target() string {
	if e.Service == Default {
		return "the service"
	}
	return e.Service
}

// FormatDuration writes d as Go does, without zero minutes and seconds:
// "1m" rather than "1m0s", "1h30m" rather than "1h30m0s".
func FormatDuration(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}

func plural(n int, noun string) string {
	if n == 1 {
		return "1 " + noun
	}
	return strconv.Itoa(n) + " " + noun + "s"
}

func percent(f float64) string {
	return strconv.FormatFloat(f*100, 'g', 4, 64) + "%"
}

func verb(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}
