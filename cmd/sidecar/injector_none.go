//go:build noinjector

package main

import (
	"errors"
	"io"

	"github.com/spf13/cobra"
)

// injectorCommands, in the per-pod build, say where inject and webhook
// are: the Kubernetes API packages they link would cost every pod's
// sidecar some 20 MB of resident executable pages.
func injectorCommands(io.Reader, io.Writer, io.Writer, func(string) string) []*cobra.Command {
	var out []*cobra.Command
	for _, name := range []string{"inject", "webhook"} {
		out = append(out, &cobra.Command{
			Use:                name,
			Short:              "Not in this build: run sidecar-injector " + name,
			DisableFlagParsing: true,
			RunE: func(*cobra.Command, []string) error {
				return errors.New(name + " is not in the per-pod build of sidecar (built with -tags noinjector): " +
					"run it with the full binary, sidecar-injector in the image, or go install ./cmd/sidecar")
			},
		})
	}
	return out
}
