package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/sidecar-mesh/sidecar/pkg/readlimit"
	"github.com/sidecar-mesh/sidecar/pkg/simulate"
)

type simulateOptions struct {
	scenarioFile string
	files        []string
	seed         uint64
	plot         string
	out          printer
	stdin        io.Reader
	stdout       io.Writer

	scenario *simulate.Scenario
	policies []simulate.Policies
}

// simulateReport is what -o json|yaml prints: the scenario, as read with
// its defaults, and each policy's results with their timelines.
type simulateReport struct {
	Scenario *simulate.Scenario `json:"scenario"`
	Seed     uint64             `json:"seed"`
	Results  []simulate.Result  `json:"results"`
}

func newPolicySimulateCommand(stdin io.Reader, stdout io.Writer) *cobra.Command {
	o := &simulateOptions{stdin: stdin, stdout: stdout}
	cmd := &cobra.Command{
		Use:   "simulate --scenario FILE [-f POLICY]...",
		Short: "Run policies against a failure model in virtual time: what they do before they ship",
		Long: `Run the outbound policy chain, the same code as 'sidecar run' (limits,
deadlines, retries and their budget, the circuit breaker, outlier ejection,
the load balancer, hedging), against modelled instances of one service in
virtual time, and report per policy, side by side: success rate, p50, p99 and
p99.9 latency, attempts per request, retries by reason, budget exhaustion,
hedges, breaker openings and time open, ejections, requests shed, the time to
recover after the fault window, and requests not safe to repeat (POST or PATCH
without an Idempotency-Key) that an instance executed more than once.

The scenario (kind: Scenario) gives the service, the open-loop request rate,
the duration, the mix of requests and the instances: their latency (p50 and
p99, or a histogram), and a failure rate and kind (a 5xx status, reset,
refused, stall) within a window of time, or when they join and leave.

Each -f is one policy: a file of Policy documents, the service's and '*'
(without -f: the built-in defaults). Sixty simulated seconds at 1,000
requests a second take a few seconds. The same --seed gives the same numbers.
-o json and yaml add a timeline, second by second; --plot writes an SVG of
success rate and p99 per second.`,
		Example: `  sidecar policy simulate --scenario one-bad-instance.yaml
  sidecar policy simulate --scenario one-bad-instance.yaml -f default.yaml -f no-retries.yaml --plot run.svg
  sidecar policy simulate --scenario outage.yaml -f policies.yaml --seed 7 -o json`,
		Args: cobra.ArbitraryArgs,
		RunE: runE(o),
	}
	cmd.Flags().StringVar(&o.scenarioFile, "scenario", "", "the Scenario document (YAML or JSON), or - for stdin")
	cmd.Flags().StringArrayVarP(&o.files, "filename", "f", nil, "a policy to simulate: a file of Policy documents (repeat to compare several); none: the built-in defaults")
	cmd.Flags().Uint64Var(&o.seed, "seed", 1, "the seed every random draw comes from")
	cmd.Flags().StringVar(&o.plot, "plot", "", "also write an SVG plot of success rate and p99 per second to this file")
	o.out.addFlag(cmd.Flags(), "table", "one column per policy")
	return cmd
}

func (o *simulateOptions) complete(args []string) error {
	if err := noArgs("simulate", args); err != nil {
		return err
	}
	if o.scenarioFile == "" {
		return errors.New("--scenario FILE is required: the failure model to run the policies against")
	}
	var (
		data []byte
		err  error
		name = o.scenarioFile
	)
	if name == "-" {
		name = "stdin"
		data, err = readlimit.ReadAll(o.stdin, name)
	} else {
		data, err = readlimit.ReadFile(name)
	}
	switch {
	case readlimit.IsTooLarge(err):
		return err
	case err != nil:
		return fmt.Errorf("reading %s: %w", name, err)
	}
	if o.scenario, err = simulate.ParseScenario(data, name); err != nil {
		return err
	}
	if len(o.files) == 0 {
		o.policies = []simulate.Policies{{Name: "defaults"}}
		return nil
	}
	for _, f := range o.files {
		if f == "-" && o.scenarioFile == "-" {
			return errors.New("the scenario and a policy cannot both come from stdin")
		}
		in := policyInput{file: f, stdin: o.stdin}
		if err := in.read(); err != nil {
			return err
		}
		name := filepath.Base(in.name)
		for _, p := range o.policies {
			if p.Name == name {
				name = in.name
			}
		}
		o.policies = append(o.policies, simulate.Policies{Name: name, Docs: in.docs})
	}
	return nil
}

func (o *simulateOptions) validate() error { return o.out.validate() }

func (o *simulateOptions) run(context.Context) error {
	results, err := simulate.Run(o.scenario, o.policies, o.seed)
	if err != nil {
		return err
	}
	if o.plot != "" {
		if err := writePlot(o.plot, o.scenario, results); err != nil {
			return err
		}
	}
	r := simulateReport{Scenario: o.scenario, Seed: o.seed, Results: results}
	return o.out.print(o.stdout, r, func(w io.Writer) error { return simulate.WriteTable(w, o.scenario, results) })
}

// writePlot writes the SVG plot to file, whole or not at all.
func writePlot(file string, s *simulate.Scenario, results []simulate.Result) error {
	tmp, err := os.CreateTemp(filepath.Dir(file), ".plot-*.svg")
	if err != nil {
		return fmt.Errorf("--plot: %w", err)
	}
	defer os.Remove(tmp.Name())
	if err := simulate.Plot(tmp, s, results); err != nil {
		tmp.Close()
		return fmt.Errorf("--plot: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("--plot: %w", err)
	}
	if err := os.Rename(tmp.Name(), file); err != nil {
		return fmt.Errorf("--plot: %w", err)
	}
	return nil
}
