package freeport

import (
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestStableHandsOutEachPortOnce(t *testing.T) {
	seen := map[int]bool{}
	for range 20 {
		ports, err := Stable(7, true)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range ports {
			if seen[p] {
				t.Fatalf("port %d handed out twice", p)
			}
			if p <= base || p >= base+blockSize {
				t.Fatalf("port %d outside this process's block %d-%d", p, base+1, base+blockSize-1)
			}
			seen[p] = true
		}
	}
}

// TestBlocksAreExclusive runs this test binary again as a second process:
// it must claim another block than this one.
func TestBlocksAreExclusive(t *testing.T) {
	if os.Getenv("FREEPORT_CHILD") != "" {
		ports, err := Stable(1, false)
		if err != nil {
			t.Fatal(err)
		}
		os.Stdout.WriteString("block=" + strconv.Itoa(base) + " port=" + strconv.Itoa(ports[0]) + "\n")
		return
	}
	if _, err := Stable(1, false); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestBlocksAreExclusive$", "-test.v")
	cmd.Env = append(os.Environ(), "FREEPORT_CHILD=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child: %v\n%s", err, out)
	}
	i := strings.Index(string(out), "block=")
	if i < 0 {
		t.Fatalf("child printed no block:\n%s", out)
	}
	var child int
	if _, err := fmt.Sscanf(string(out[i:]), "block=%d", &child); err != nil {
		t.Fatal(err)
	}
	if child == base {
		t.Fatalf("child claimed this process's block %d", base)
	}
}
