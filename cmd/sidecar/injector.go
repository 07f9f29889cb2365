//go:build !noinjector

package main

import (
	"io"

	"github.com/spf13/cobra"
)

// injectorCommands are the commands that put the sidecar into pods:
// inject and webhook. They link Kubernetes' API packages, which the
// per-pod build (-tags noinjector) leaves out.
func injectorCommands(stdin io.Reader, stdout, stderr io.Writer, getenv func(string) string) []*cobra.Command {
	return []*cobra.Command{newInjectCommand(stdin, stdout, stderr), newWebhookCommand(stdout, stderr, getenv)}
}
