package simulate

import (
	"fmt"
	"math"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/policy"
)

// Limits of a scenario: a run is at most maxScenarioRequests requests, to
// at most maxScenarioInstances instances, so that a simulation finishes in
// seconds of real time.
const (
	maxScenarioRate      = 100000
	maxScenarioRequests  = 2000000
	maxScenarioInstances = 1000
	maxScenarioDuration  = time.Hour
	maxScenarioLatency   = 10 * time.Minute
	maxScenarioBody      = 1 << 20
	maxScenarioBuckets   = 100
)

// ParseScenario decodes one Scenario document (YAML or JSON) strictly,
// validates it and fills its defaults (SetDefaults). file names the source
// in errors. An unknown key is an error naming its path and the keys
// allowed there; every invalid value is one, naming its path, the value and
// what is allowed:
//
//	scenario.yaml: instances[1].failureRate: 1.5 is not allowed (allowed: 0 to 1)
//
// All problems are returned together, as a *policy.Problems; errors.As
// finds each *policy.FieldError through it.
func ParseScenario(data []byte, file string) (*Scenario, error) {
	var s Scenario
	if err := policy.DecodeStrict(data, file, &s); err != nil {
		return nil, err
	}
	if reflect.ValueOf(s).IsZero() {
		return nil, fmt.Errorf("%s: empty (want a Scenario document, YAML or JSON)", file)
	}
	if err := s.Validate(); err != nil {
		ps := err.(*policy.Problems)
		for i, e := range ps.Errs {
			ps.Errs[i] = fmt.Errorf("%s: %w", file, e)
		}
		return nil, ps
	}
	s.SetDefaults()
	return &s, nil
}

// SetDefaults fills what s leaves to a default: apiVersion sidecar/v1,
// requests GET only (methods {GET: 1}), an instance group's failure 503 and
// latency p99 its p50. It keeps a valid scenario valid.
func (s *Scenario) SetDefaults() {
	if s.APIVersion == "" {
		s.APIVersion = APIVersion
	}
	if s.Requests == nil {
		s.Requests = &Requests{}
	}
	if len(s.Requests.Methods) == 0 {
		s.Requests.Methods = map[string]float64{"GET": 1}
	}
	for i := range s.Instances {
		g := &s.Instances[i]
		if g.Failure == "" {
			g.Failure = "503"
		}
		if g.Latency.P99 == 0 && len(g.Latency.Histogram) == 0 {
			g.Latency.P99 = g.Latency.P50
		}
	}
}

// scenarioMethodRE is what a method of requests.methods looks like, as
// policy's retry.methods.
var scenarioMethodRE = regexp.MustCompile(`^[A-Z]{1,20}$`)

// scenarioFailures are the failure kinds besides an HTTP status.
var scenarioFailures = []string{FailReset, FailRefused, FailStall}

// Validate checks every field of s and returns its problems as a
// *policy.Problems: a *policy.FieldError for each invalid value, naming
// its path, the value and what is allowed, and an error for each required
// field missing. Past policy.MaxProblems problems are only counted.
func (s *Scenario) Validate() error {
	var ps policy.Problems
	addErr := func(err error) {
		if len(ps.Errs) >= policy.MaxProblems {
			ps.More++
			return
		}
		ps.Errs = append(ps.Errs, err)
	}
	add := func(path, value, allowed string) {
		addErr(&policy.FieldError{Path: path, Value: value, Allowed: allowed})
	}
	missing := func(path, allowed string) {
		addErr(fmt.Errorf("%s: missing (allowed: %s)", path, allowed))
	}
	// Written so that NaN (YAML's .nan), unlike everything, fails.
	floatIn := func(path string, v, lo, hi float64, loOpen bool) bool {
		if v >= lo && v <= hi && !(loOpen && v == lo) {
			return true
		}
		r := fmt.Sprintf("%g to %g", lo, hi)
		if loOpen {
			r = fmt.Sprintf("more than %g, at most %g", lo, hi)
		}
		add(path, fieldFloat(v), r)
		return false
	}

	if s.APIVersion != "" && s.APIVersion != APIVersion {
		add("apiVersion", policy.Quote(s.APIVersion), APIVersion)
	}
	switch s.Kind {
	case Kind:
	case "":
		missing("kind", Kind)
	default:
		add("kind", policy.Quote(s.Kind), Kind)
	}
	const serviceAllowed = "a service name: lower-case letters, digits and '-', at most 63"
	switch {
	case s.Service == "":
		missing("service", serviceAllowed)
	case !policy.ValidServiceName(s.Service):
		add("service", policy.Quote(s.Service), serviceAllowed)
	}
	rateOK := floatIn("rate", s.Rate, 0, maxScenarioRate, true)
	durOK := false
	switch d := s.Duration.D(); {
	case d == 0:
		missing("duration", fmt.Sprintf("%v to %v", time.Second, maxScenarioDuration))
	case d < time.Second || d > maxScenarioDuration:
		add("duration", s.Duration.String(), fmt.Sprintf("%v to %v", time.Second, maxScenarioDuration))
	default:
		durOK = true
	}
	if rateOK && durOK {
		if n := s.Rate * s.Duration.D().Seconds(); n > maxScenarioRequests {
			most := math.Floor(maxScenarioRequests/s.Duration.D().Seconds()*10) / 10
			add("rate", fieldFloat(s.Rate), fmt.Sprintf("at most %s per second for duration %v (%d requests in all)",
				fieldFloat(most), s.Duration, maxScenarioRequests))
		}
	}

	if r := s.Requests; r != nil {
		methods := make([]string, 0, len(r.Methods))
		for m := range r.Methods {
			methods = append(methods, m)
		}
		slices.Sort(methods)
		for _, m := range methods {
			path := "requests.methods." + m
			if !scenarioMethodRE.MatchString(m) {
				add("requests.methods", policy.Quote(m), "an upper-case HTTP method such as GET")
				continue
			}
			if v := r.Methods[m]; !(v > 0) || math.IsInf(v, 0) {
				add(path, fieldFloat(v), "a share more than 0")
			}
		}
		floatIn("requests.idempotencyKey", r.IdempotencyKey, 0, 1, false)
		if r.BodyBytes < 0 || r.BodyBytes > maxScenarioBody {
			add("requests.bodyBytes", strconv.Itoa(r.BodyBytes), fmt.Sprintf("0 to %d (1 MiB)", maxScenarioBody))
		}
	}

	if len(s.Instances) == 0 {
		missing("instances", "one or more groups of instances, each with a count and a latency")
	}
	total := 0
	for i := range s.Instances {
		g := &s.Instances[i]
		at := fmt.Sprintf("instances[%d].", i)
		if g.Count < 1 || g.Count > maxScenarioInstances {
			add(at+"count", strconv.Itoa(g.Count), fmt.Sprintf("1 to %d", maxScenarioInstances))
		} else {
			total += g.Count
		}
		s.validateLatency(at+"latency", &g.Latency, add, missing)
		floatIn(at+"failureRate", g.FailureRate, 0, 1, false)
		if !validFailure(g.Failure) {
			add(at+"failure", policy.Quote(g.Failure), "an HTTP status 500-599, "+strings.Join(scenarioFailures, ", "))
		}
		window := func(fromName, toName string, from, to policy.Duration) {
			if durOK && from > s.Duration {
				add(at+fromName, from.String(), fmt.Sprintf("0s to duration (%v)", s.Duration))
			}
			if to == 0 {
				return
			}
			switch {
			case to <= from && durOK:
				add(at+toName, to.String(), fmt.Sprintf("more than %s (%v), at most duration (%v), or 0 for the end", fromName, from, s.Duration))
			case to <= from:
				add(at+toName, to.String(), fmt.Sprintf("more than %s (%v), or 0 for the end", fromName, from))
			case durOK && to > s.Duration:
				add(at+toName, to.String(), fmt.Sprintf("at most duration (%v), or 0 for the end", s.Duration))
			}
		}
		window("from", "to", g.From, g.To)
		window("join", "leave", g.Join, g.Leave)
	}
	if total > maxScenarioInstances {
		add("instances", fmt.Sprintf("%d instances", total), fmt.Sprintf("at most %d in all", maxScenarioInstances))
	}
	if ps.Len() == 0 {
		return nil
	}
	return &ps
}

// validateLatency checks one latency distribution at path: p50 and p99,
// or a histogram.
func (s *Scenario) validateLatency(path string, l *Latency, add func(path, value, allowed string), missing func(path, allowed string)) {
	upTo := fmt.Sprintf("more than 0s, at most %v", maxScenarioLatency)
	quantiles := l.P50 != 0 || l.P99 != 0
	switch {
	case quantiles && len(l.Histogram) > 0:
		add(path, "p50/p99 and a histogram", "p50 (and p99), or a histogram, not both")
		return
	case !quantiles && len(l.Histogram) == 0:
		missing(path, "p50 (and p99), or a histogram")
		return
	case quantiles:
		if l.P50 == 0 {
			missing(path+".p50", upTo)
		} else if l.P50.D() > maxScenarioLatency {
			add(path+".p50", l.P50.String(), upTo)
		}
		if l.P50 != 0 && l.P99 != 0 && (l.P99 < l.P50 || l.P99.D() > maxScenarioLatency) {
			add(path+".p99", l.P99.String(), fmt.Sprintf("p50 (%v) to %v, or 0 for p50", l.P50, maxScenarioLatency))
		}
		return
	}
	if len(l.Histogram) > maxScenarioBuckets {
		add(path+".histogram", fmt.Sprintf("%d buckets", len(l.Histogram)), fmt.Sprintf("1 to %d buckets", maxScenarioBuckets))
		return
	}
	var (
		sum      float64
		sharesOK = true
		prev     policy.Duration
	)
	for i, b := range l.Histogram {
		at := fmt.Sprintf("%s.histogram[%d].", path, i)
		switch {
		case b.UpTo == 0:
			missing(at+"upTo", upTo)
		case b.UpTo.D() > maxScenarioLatency:
			add(at+"upTo", b.UpTo.String(), upTo)
		case i > 0 && b.UpTo <= prev:
			add(at+"upTo", b.UpTo.String(), fmt.Sprintf("more than histogram[%d].upTo (%v), at most %v", i-1, prev, maxScenarioLatency))
		}
		if b.UpTo > prev {
			prev = b.UpTo
		}
		if !(b.Share > 0 && b.Share <= 1) {
			add(at+"share", fieldFloat(b.Share), "more than 0, at most 1")
			sharesOK = false
		}
		sum += b.Share
	}
	if sharesOK && math.Abs(sum-1) > 1e-6 {
		add(path+".histogram", "shares summing to "+fieldFloat(sum), "shares summing to 1")
	}
}

// validFailure reports whether f is a failure kind: "" (503), an HTTP
// status 500-599, reset, refused or stall.
func validFailure(f string) bool {
	if f == "" || slices.Contains(scenarioFailures, f) {
		return true
	}
	return len(f) == 3 && f[0] == '5' && f[1] >= '0' && f[1] <= '9' && f[2] >= '0' && f[2] <= '9'
}

func fieldFloat(v float64) string { return strconv.FormatFloat(v, 'g', -1, 64) }
