//go:build !linux

package consultest

import "testing"

// Freeze skips the test: stopping the agent and seeing it stopped needs
// Linux's /proc.
func (a *Agent) Freeze(t testing.TB) {
	t.Skip("consultest: Freeze needs Linux")
}
