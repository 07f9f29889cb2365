// Command openloop is the open-loop HTTP/1.1 load generator of `make bench`:
// requests go out on a fixed schedule, whatever the target answers, and
// latency counts from each request's scheduled send time.
//
//	openloop -addr 127.0.0.1:18001 -host origin -rate 1000 -duration 20s -out run.json
//
// Request n (from 0) is due at start + n/rate. A pool of -conns keep-alive
// connections serves the schedule: the next due request goes out on any
// free connection at its time; when every connection is busy, due requests
// wait for one, and that wait is counted. Latency runs from the scheduled
// time, never from the moment a connection got free, so a slow target
// cannot hide its backlog (no coordinated omission).
//
// -threads threads (2 by default, as wrk here) each run an epoll loop over
// their share of the connections and of the schedule (request n goes to
// loop n mod threads), with non-blocking sockets, woken for each send time
// by a timerfd (microsecond precision, where Go's timers wake up
// to a millisecond late), so the generator stays on schedule and costs the
// machine little per request: at several times 10 000 requests per second
// on a 2-core machine, where a Go HTTP client (vegeta) falls behind. The
// send lag it reports says how far behind the schedule it was. Linux only.
//
// It prints (or writes to -out) one JSON object: counts by status, the
// 503s carrying "x-sidecar-error: overloaded" (shed), errors, goodput (2xx
// per second of the run: from the first scheduled send to the last answer,
// which is longer than the schedule when the target fell behind), latency percentiles of all answers and of the
// 2xx ones, points of the latency-by-percentile curve, and the send lag.
// Responses are parsed just enough to frame them (Content-Length or
// chunked) and are discarded. The exit status is 2 when it could not run
// at all, 1 with -strict when a request got no 2xx answer, else 0: errors
// of the target are data.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math"
	"os"
	"slices"
	"strconv"
	"time"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "openloop:", err)
		os.Exit(2)
	}
}

type config struct {
	addr, host, path, out string
	rate                  float64
	duration, timeout     time.Duration
	conns, threads        int
}

func run() error {
	var c config
	flag.StringVar(&c.addr, "addr", "127.0.0.1:18080", "target host:port")
	flag.StringVar(&c.host, "host", "origin", "Host header of every request")
	flag.StringVar(&c.path, "path", "/", "request path")
	flag.Float64Var(&c.rate, "rate", 1000, "requests per second")
	flag.DurationVar(&c.duration, "duration", 10*time.Second, "length of the schedule")
	flag.IntVar(&c.conns, "conns", 64, "keep-alive connections (the most requests in flight)")
	flag.IntVar(&c.threads, "threads", 2, "event loops (OS threads), each with its share of connections and schedule")
	flag.DurationVar(&c.timeout, "timeout", 5*time.Second, "longest wait for one response; longer is an error")
	flag.StringVar(&c.out, "out", "", "write the JSON result here instead of stdout")
	strict := flag.Bool("strict", false, "exit 1 (after writing the result) unless every request got a 2xx answer")
	flag.Parse()
	if c.rate <= 0 || c.duration <= 0 || c.conns <= 0 || c.threads <= 0 || c.timeout <= 0 {
		return errors.New("-rate, -duration, -conns, -threads and -timeout must be positive")
	}
	res, err := attack(c)
	if err != nil {
		return err
	}
	b, err := json.MarshalIndent(res, "", "  ")
	if err != nil {
		return err
	}
	b = append(b, '\n')
	if c.out == "" {
		_, err = os.Stdout.Write(b)
	} else {
		err = os.WriteFile(c.out, b, 0o644)
	}
	if err != nil {
		return err
	}
	if *strict && res.OK != res.Scheduled {
		fmt.Fprintf(os.Stderr, "openloop: %d of %d requests did not get a 2xx answer: statuses %v, errors %v\n",
			res.Scheduled-res.OK, res.Scheduled, res.Statuses, res.ErrorKinds)
		os.Exit(1)
	}
	return nil
}

// Result is what one run found. Latencies are in microseconds.
type Result struct {
	Target      string         `json:"target"`
	Rate        float64        `json:"rate"`
	DurationSec float64        `json:"durationSeconds"` // the schedule's
	ElapsedSec  float64        `json:"elapsedSeconds"`  // the run's: schedule, backlog and last answers
	Conns       int            `json:"conns"`
	Scheduled   int64          `json:"scheduled"`
	Sent        int64          `json:"sent"`
	Answered    int64          `json:"answered"`
	OK          int64          `json:"ok"`   // 2xx
	Shed        int64          `json:"shed"` // 503 with x-sidecar-error: overloaded
	Errors      int64          `json:"errors"`
	ErrorKinds  map[string]int `json:"errorKinds,omitempty"`
	Statuses    map[string]int `json:"statuses"`
	Reasons     map[string]int `json:"sidecarErrors,omitempty"` // x-sidecar-error values
	GoodputRPS  float64        `json:"goodputRps"`              // 2xx per second of the run (ElapsedSec)
	AnsweredRPS float64        `json:"answeredRps"`
	Latency     Percentiles    `json:"latencyUs"`   // every answer
	LatencyOK   Percentiles    `json:"latencyOkUs"` // 2xx answers
	SendLag     Percentiles    `json:"sendLagUs"`   // actual send minus scheduled
	// Curve is the latency of every answer by percentile, for plots:
	// pairs of [percentile, microseconds].
	Curve [][2]float64 `json:"curve"`
}

// Percentiles of a latency distribution, in microseconds.
type Percentiles struct {
	N    int     `json:"n"`
	P50  float64 `json:"p50"`
	P90  float64 `json:"p90"`
	P99  float64 `json:"p99"`
	P999 float64 `json:"p999"`
	Max  float64 `json:"max"`
}

// curvePoints are the percentiles of Result.Curve: dense where tails live.
var curvePoints = []float64{0, 10, 20, 30, 40, 50, 60, 70, 75, 80, 85, 90, 92.5, 95, 96, 97, 98, 98.5,
	99, 99.25, 99.5, 99.6, 99.7, 99.8, 99.85, 99.9, 99.93, 99.95, 99.97, 99.99, 100}

// recorder collects what a run measured. Not safe for concurrent use: the
// engine records from its one loop.
type recorder struct {
	lat, latOK, lag []int64 // ns: every answer, 2xx answers, send lag
	sent, ok, shed  int64
	errs            map[string]int
	status          map[int]int
	reasons         map[string]int
}

func newRecorder(total int64) *recorder {
	return &recorder{lat: make([]int64, 0, total), latOK: make([]int64, 0, total), lag: make([]int64, 0, total),
		errs: map[string]int{}, status: map[int]int{}, reasons: map[string]int{}}
}

// sentAt records a request written lag ns after its scheduled time.
func (r *recorder) sentAt(lag int64) {
	r.sent++
	r.lag = append(r.lag, lag)
}

// answer records a response that came latency ns after its scheduled time.
func (r *recorder) answer(latency int64, status int, reason string) {
	r.lat = append(r.lat, latency)
	r.status[status]++
	if reason != "" {
		r.reasons[reason]++
	}
	switch {
	case status >= 200 && status < 300:
		r.ok++
		r.latOK = append(r.latOK, latency)
	case status == 503 && reason == "overloaded":
		r.shed++
	}
}

// failed records a request that got no answer.
func (r *recorder) failed(kind string) { r.errs[kind]++ }

// merge adds what o recorded.
func (r *recorder) merge(o *recorder) {
	r.lat, r.latOK, r.lag = append(r.lat, o.lat...), append(r.latOK, o.latOK...), append(r.lag, o.lag...)
	r.sent, r.ok, r.shed = r.sent+o.sent, r.ok+o.ok, r.shed+o.shed
	for k, n := range o.errs {
		r.errs[k] += n
	}
	for k, n := range o.status {
		r.status[k] += n
	}
	for k, n := range o.reasons {
		r.reasons[k] += n
	}
}

// summarize makes the result of a run that took elapsed from its first
// scheduled send.
func summarize(c config, total int64, rec *recorder, elapsed time.Duration) *Result {
	// A target that fell behind stretched the run past its schedule: rates
	// count over the time it really took.
	secs := max(elapsed, c.duration).Seconds()
	r := &Result{Target: c.addr, Rate: c.rate, DurationSec: c.duration.Seconds(), ElapsedSec: secs, Conns: c.conns, Scheduled: total,
		Sent: rec.sent, OK: rec.ok, Shed: rec.shed,
		ErrorKinds: map[string]int{}, Statuses: map[string]int{}, Reasons: rec.reasons}
	for k, n := range rec.errs {
		r.ErrorKinds[k] += n
		r.Errors += int64(n)
	}
	for s, n := range rec.status {
		r.Statuses[strconv.Itoa(s)] += n
	}
	lat, latOK, lag := rec.lat, rec.latOK, rec.lag
	r.Answered = int64(len(lat))
	r.GoodputRPS = float64(r.OK) / secs
	r.AnsweredRPS = float64(r.Answered) / secs
	r.Latency = percentiles(lat)
	r.LatencyOK = percentiles(latOK)
	r.SendLag = percentiles(lag)
	if len(lat) > 0 {
		for _, p := range curvePoints {
			r.Curve = append(r.Curve, [2]float64{p, us(at(lat, p))})
		}
	}
	return r
}

// percentiles sorts v and reads its percentiles.
func percentiles(v []int64) Percentiles {
	slices.Sort(v)
	if len(v) == 0 {
		return Percentiles{}
	}
	return Percentiles{N: len(v), P50: us(at(v, 50)), P90: us(at(v, 90)), P99: us(at(v, 99)),
		P999: us(at(v, 99.9)), Max: us(v[len(v)-1])}
}

// at is the p-th percentile of sorted v (nearest rank).
func at(v []int64, p float64) int64 {
	i := int(math.Ceil(p/100*float64(len(v)))) - 1
	return v[min(max(i, 0), len(v)-1)]
}

func us(ns int64) float64 { return float64(ns/100) / 10 }
