package upstream

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// h2Unprocessed knows x/net/http2's errors for a request it did not send
// by their text (x/net does not export them): each text is still one of
// x/net's errors, in the x/net this module builds with.
func TestH2UnprocessedKnowsXNetErrors(t *testing.T) {
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "golang.org/x/net").Output()
	if err != nil {
		t.Fatalf("go list golang.org/x/net: %v", err)
	}
	dir := filepath.Join(strings.TrimSpace(string(out)), "http2")
	files, _ := filepath.Glob(filepath.Join(dir, "*.go"))
	var src strings.Builder
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		src.Write(b)
	}
	for _, text := range []string{h2GotGoAway, h2ConnUnusable, h2ConnNotEstablished} {
		if !strings.Contains(src.String(), "errors.New("+strconv.Quote(text)+")") {
			t.Errorf("x/net/http2 in %s has no error %q any more: h2Unprocessed would not see it", dir, text)
		}
	}
}
