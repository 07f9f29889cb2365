package main

import (
	"encoding/json"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// Every metric the Grafana dashboard queries is one the sidecar defines:
// a renamed metric must not leave an empty panel behind.
func TestDashboardQueriesExistingMetrics(t *testing.T) {
	data, err := os.ReadFile("../../k8s/grafana-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(data, &dash); err != nil {
		t.Fatalf("dashboard JSON: %v", err)
	}
	defined := map[string]bool{"process_resident_memory_bytes": true, "process_cpu_seconds_total": true}
	name := regexp.MustCompile(`"(sidecar_[a-z_]+)"`)
	for _, root := range []string{"..", "../../pkg"} {
		err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
			if err != nil || d.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
				return err
			}
			src, err := os.ReadFile(path)
			for _, m := range name.FindAllStringSubmatch(string(src), -1) {
				defined[m[1]] = true
			}
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	used := regexp.MustCompile(`\b((?:sidecar|process)_[a-z_]+?)(?:_bucket)?\b[{(\[]`)
	n := 0
	for _, p := range dash.Panels {
		for _, tg := range p.Targets {
			for _, m := range used.FindAllStringSubmatch(tg.Expr, -1) {
				n++
				if !defined[m[1]] {
					t.Errorf("panel %q queries %s, which the sidecar does not define", p.Title, m[1])
				}
			}
		}
	}
	if n < 10 {
		t.Fatalf("found %d metric references in the dashboard, want the panels' queries", n)
	}
}
