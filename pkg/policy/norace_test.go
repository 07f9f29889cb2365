//go:build !race

package policy

// raceSlowdown is how much slower the race detector makes parsing: time
// limits of tests are multiplied by it.
const raceSlowdown = 1
