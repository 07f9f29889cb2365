package policy

import (
	"fmt"
	"strings"
	"time"
)

// The adaptive concurrency limit (concurrency.adaptive) is a gradient
// controller, as Envoy's adaptive_concurrency filter computes it: the
// limit moves by the ratio of the latency the service has with nothing
// queued (its minimum round-trip time, minRTT, plus a buffer) to the
// latency it has now (sampleRTT):
//
//	gradient = clamp(AdaptiveTarget(minRTT) / sampleRTT, 0.5, 2)
//	limit'   = limit × gradient + √(limit × gradient)
//
// within [AdaptiveFloor, concurrency.maxInFlight]. sampleRTT is the median
// of the attempts' times to response headers over a window of at least
// AdaptiveWindow and AdaptiveWindowSamples answers. A rise of the limit is
// smoothed (AdaptiveSmoothing of the step, as Netflix's Gradient2
// smooths), and there is none while at most half the limit was in use:
// an idle service earns no headroom it never tested. A fall acts at once:
// a queue at the service costs every request its wait.
//
// minRTT is measured with nothing queued: the limit drops to the floor
// until AdaptiveProbeSamples attempts started since have answered, and
// their median is minRTT; then the limit goes back to where it was. That
// happens when the limit starts, and again whenever minRTT went
// unconfirmed (no window's median within AdaptiveConfirm of it) for
// AdaptiveProbeInterval, plus up to AdaptiveProbeJitter of it so that the
// sidecars of a fleet do not all probe at once: a service that runs with
// no queue confirms minRTT all the time and is never probed again; one
// that runs with a standing queue is, since its latency cannot tell the
// queue from the service. A limit held at the floor for AdaptivePinned
// takes its windows' median as minRTT at once: at the floor this sidecar
// queues nothing, so the latency it sees there is the service's own (or
// its own, when it is the sidecar's CPU that is short), and a service that
// got slower for good, or a sidecar short of CPU, is not held at the
// floor until the next probe. The √limit term is the queue the limit allows
// on purpose: enough to keep the service busy between windows, small
// beside the limit.
const (
	// AdaptiveFloor is the lowest the limit goes (concurrency.maxInFlight
	// if lower), and the limit while minRTT is measured: Envoy's
	// min_concurrency.
	AdaptiveFloor = 3
	// AdaptiveInitial is the limit once the first minRTT is measured
	// (concurrency.maxInFlight if lower); from there it doubles per window
	// at most while latency stays near minRTT.
	AdaptiveInitial = 20
	// AdaptiveWindow is the shortest window over which latency is
	// sampled before the limit moves (Envoy's concurrency_update_interval),
	// and AdaptiveWindowSamples the fewest answers in it.
	AdaptiveWindow        = 100 * time.Millisecond
	AdaptiveWindowSamples = 5
	// AdaptiveBuffer is the share of minRTT that latency may rise by
	// before the limit falls (Envoy's buffer, 25%), and AdaptiveSlack the
	// least it may rise by: a service that answers in a fraction of a
	// millisecond sees its latency jump by more whenever the sidecar's
	// process waits for a CPU, which fewer requests in flight would not
	// help.
	AdaptiveBuffer = 0.25
	AdaptiveSlack  = time.Millisecond
	// AdaptiveSmoothing is the share of a computed rise the limit takes.
	AdaptiveSmoothing = 0.5
	// AdaptiveConfirm is how close to minRTT (above it) a window's median
	// confirms it.
	AdaptiveConfirm = 0.1
	// AdaptiveProbeInterval is how long minRTT may go unconfirmed before
	// it is measured again, AdaptiveProbeJitter the share of it added at
	// random, AdaptiveProbeSamples the answers it is measured from
	// (Envoy measures every 60s, from 50, whether confirmed or not).
	AdaptiveProbeInterval = 30 * time.Second
	AdaptiveProbeJitter   = 0.15
	AdaptiveProbeSamples  = 20
	// AdaptivePinned is how long the limit stays at the floor before the
	// latency there is taken as minRTT: ten windows, enough to tell a
	// lasting rise from a burst.
	AdaptivePinned = time.Second
	// AdaptiveRetryAfter is the Retry-After of a request the adaptive
	// limit sheds: the header counts whole seconds, and one is the
	// shortest wait it can ask for.
	AdaptiveRetryAfter = time.Second
)

// AdaptiveTarget is the latency an adaptive limit holds a service to, the
// latency with nothing queued being minRTT: minRTT plus AdaptiveBuffer of
// it, and at least AdaptiveSlack more.
func AdaptiveTarget(minRTT time.Duration) time.Duration {
	return minRTT + max(time.Duration(float64(minRTT)*AdaptiveBuffer), AdaptiveSlack)
}

// IsAdaptive reports whether the limit is adaptive.
func (c *Concurrency) IsAdaptive() bool { return c != nil && c.Adaptive != nil && *c.Adaptive }

// Floor is the lowest an adaptive limit goes: AdaptiveFloor, or
// MaxInFlight when lower. MaxInFlight must be set, as it is in an
// effective policy.
func (c *Concurrency) Floor() int { return min(AdaptiveFloor, *c.MaxInFlight) }

// adaptiveWords says how an adaptive limit behaves, for Explain.
func adaptiveWords(service string, c *Concurrency) string {
	return fmt.Sprintf("The limit on requests to %s in flight from this sidecar (each pod's sidecar counts its own) is adaptive: "+
		"it follows the service's latency, between %d and %d (concurrency.maxInFlight). "+
		"It starts at %d while it measures the latency with nothing queued (minRTT, the median of %d answers), then at %d; "+
		"every %s (and %d answers) it moves by minRTT+%d%% (+%s at least) over the median latency of the window, "+
		"at most halved or doubled, plus a queue of its square root: it falls as soon as latency rises past that, "+
		"and rises, smoothed, while latency stays under it and more than half of it is in use. "+
		"minRTT is measured again, at the floor, when no window confirmed it for %s, and taken from the windows "+
		"when the limit stayed at the floor for %s. "+
		"A request over the limit is answered 503 overloaded at once, with Retry-After: %d; "+
		"concurrency.maxQueued and queueTimeout do not apply. The sidecar-wide limits.outboundMaxInFlight applies too.",
		service, c.Floor(), *c.MaxInFlight, c.Floor(), AdaptiveProbeSamples, min(AdaptiveInitial, *c.MaxInFlight),
		FormatDuration(AdaptiveWindow), AdaptiveWindowSamples, int(AdaptiveBuffer*100), FormatDuration(AdaptiveSlack),
		FormatDuration(AdaptiveProbeInterval), FormatDuration(AdaptivePinned), int(AdaptiveRetryAfter/time.Second))
}

// adaptiveWarning warns that a line set by a document (not a default) does
// nothing under an adaptive limit; nil when there is nothing to say.
func adaptiveWarning(c *Concurrency, fields []Field) *Warning {
	if !c.IsAdaptive() {
		return nil
	}
	var set []string
	for _, f := range fields {
		if (f.Path == "concurrency.maxQueued" || f.Path == "concurrency.queueTimeout") && f.Origin != FromDefault {
			set = append(set, f.Path)
		}
	}
	if len(set) == 0 {
		return nil
	}
	return &Warning{Code: "adaptive-limit-has-no-line", Fields: set, Message: fmt.Sprintf(
		"concurrency.adaptive is on: a request over the limit is refused at once (503 overloaded, Retry-After: %d), "+
			"so %s has no effect.", int(AdaptiveRetryAfter/time.Second), strings.Join(set, " and "))}
}
