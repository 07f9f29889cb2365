package simulate

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"reflect"
	"runtime/debug"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

// Virtual time is testing/synctest's: inside a bubble, time.Now, timers,
// time.Sleep and context deadlines run on a clock of the bubble's own,
// which moves only when every goroutine of the bubble is blocked, and then
// straight to the next timer. Sixty seconds of a service under load take
// as long as the work they hold, not sixty seconds, and the chain under
// simulation is the real one: its breaker, deadlines, budget and backoff
// read the bubble's clock without knowing it.
//
// synctest offers bubbles to tests only (synctest.Test takes a *testing.T).
// A command gets one the way a test binary does: testing.MainStart with
// one test, whose body is the bubble. The test dependencies below are the
// least MainStart asks for; the toolchain is pinned (go.mod, GOTOOLCHAIN),
// and TestBubble holds this to it.

// bubbleMu runs one bubble at a time: testing's runner is process-wide.
var bubbleMu sync.Mutex

// inBubble runs f in a synctest bubble and returns its error. A panic in f
// is returned as an error, with its stack; so is a deadlock of the bubble
// (every goroutine blocked and no timer to wake one), which synctest
// reports as a failure.
func inBubble(f func() error) (err error) {
	bubbleMu.Lock()
	defer bubbleMu.Unlock()
	if testing.Testing() {
		// In a test binary the runner is the test's own: a bubble inside
		// the running test would share its flags, profiles and output.
		// Tests of the simulation call run in their own synctest.Test.
		return errors.New("simulate: inBubble is for commands; a test runs the simulation in synctest.Test")
	}
	ran := false
	body := func(t *testing.T) {
		defer func() {
			// synctest panics when the bubble's goroutines are left
			// blocked: the simulation failed, not the command.
			if p := recover(); p != nil && err == nil {
				err = fmt.Errorf("simulate: %v", p)
			}
		}()
		synctest.Test(t, func(t *testing.T) {
			defer func() {
				if p := recover(); p != nil {
					err = fmt.Errorf("simulation panicked: %v\n%s", p, debug.Stack())
				}
			}()
			ran = true
			err = f()
		})
	}
	if !flag.Parsed() {
		// The command's flags are its own (cobra's): the testing flags
		// keep their defaults, os.Args is not theirs to read.
		_ = flag.CommandLine.Parse(nil)
	}
	// The runner says PASS or FAIL on standard output: not the command's.
	stdout := os.Stdout
	if null, oerr := os.Open(os.DevNull); oerr == nil {
		os.Stdout = null
		defer func() { os.Stdout = stdout; _ = null.Close() }()
	}
	m := testing.MainStart(runnerDeps{}, []testing.InternalTest{{Name: "simulation", F: body}}, nil, nil, nil)
	if code := m.Run(); code != 0 && err == nil {
		if !ran {
			return fmt.Errorf("simulate: the virtual-time runner did not run (exit code %d)", code)
		}
		return errors.New("simulate: the simulation's goroutines deadlocked (every one blocked, no timer to wake them)")
	}
	return err
}

// runnerDeps is what testing.MainStart needs of a test binary's
// dependencies, for one test and nothing else: every name matches, no
// profiles, no fuzzing, no coverage.
type runnerDeps struct{}

func (runnerDeps) ImportPath() string                          { return "" }
func (runnerDeps) ModulePath() string                          { return "" }
func (runnerDeps) MatchString(string, string) (bool, error)    { return true, nil }
func (runnerDeps) SetPanicOnExit0(bool)                        {}
func (runnerDeps) StartCPUProfile(io.Writer) error             { return nil }
func (runnerDeps) StopCPUProfile()                             {}
func (runnerDeps) StartTestLog(io.Writer)                      {}
func (runnerDeps) StopTestLog() error                          { return nil }
func (runnerDeps) WriteProfileTo(string, io.Writer, int) error { return nil }
func (runnerDeps) CoordinateFuzzing(time.Duration, int64, time.Duration, int64, int, []corpusEntry, []reflect.Type, string, string) error {
	return errors.New("no fuzzing")
}
func (runnerDeps) RunFuzzWorker(func(corpusEntry) error) error { return errors.New("no fuzzing") }
func (runnerDeps) ReadCorpus(string, []reflect.Type) ([]corpusEntry, error) {
	return nil, nil
}
func (runnerDeps) CheckCorpus([]any, []reflect.Type) error { return nil }
func (runnerDeps) ResetCoverage()                          {}
func (runnerDeps) SnapshotCoverage()                       {}
func (runnerDeps) InitRuntimeCoverage() (string, func(string, string) (string, error), func() float64) {
	return "", nil, nil
}

// corpusEntry is testing's fuzz corpus entry, an alias of this struct.
type corpusEntry = struct {
	Parent     string
	Path       string
	Data       []byte
	Values     []any
	Generation int
	IsSeed     bool
}
