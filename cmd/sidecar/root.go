package main

import (
	"io"

	"github.com/spf13/cobra"
)

// newRootCommand builds the CLI with injected standard streams and
// environment, so tests drive it in-process.
func newRootCommand(stdin io.Reader, stdout, stderr io.Writer, getenv func(string) string) *cobra.Command {
	root := &cobra.Command{
		Use:   "sidecar",
		Short: "A per-pod resilience proxy: service discovery, retries, timeouts, circuit breaking, tracing",
		Long: `sidecar runs beside an application. The app sends its calls to 127.0.0.1:15001
naming the service it wants (as an HTTP proxy, by Host header, or as a gRPC
authority); the sidecar picks a healthy instance, applies the service's
resilience policy, and forwards the call.`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetIn(stdin)
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.AddCommand(
		newRunCommand(stdout, stderr, getenv),
		newDemoCommand(stdout, stderr, getenv),
		newVersionCommand(stdout),
		newPolicyCommand(stdin, stdout, stderr, getenv), newStatusCommand(stdout, getenv),
		newWhyCommand(stdout, getenv), newTapCommand(stdout, getenv),
	)
	root.AddCommand(injectorCommands(stdin, stdout, stderr, getenv)...)
	root.AddCommand(newHookCommand(stderr))
	root.AddCommand(newIptablesCommand(stdout))
	root.AddCommand(newMeshCommand(stdout, stderr, getenv))
	return root
}
