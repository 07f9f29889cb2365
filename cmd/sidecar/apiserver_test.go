package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"testing"
	"time"

	"github.com/sidecar-mesh/sidecar/internal/kubetest"
	"github.com/sidecar-mesh/sidecar/pkg/inject"
)

// assumedNamespaces exist in a cluster the manifests are applied to, though
// no manifest creates them.
var assumedNamespaces = []string{"monitoring"}

// TestKubernetesAPIServer holds the manifests and the injected output to a
// real kube-apiserver (internal/kubetest): every manifest in k8s/ and every
// golden output of pkg/inject passes a server-side dry run with strict
// field validation and no warnings. pkg/webhook's
// TestKubernetesAPIServerCallsWebhook has the API server call the webhook.
func TestKubernetesAPIServer(t *testing.T) {
	s := kubetest.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	k := &kube{t: t, s: s, ctx: ctx}

	t.Run("manifests", func(t *testing.T) {
		k := k.with(t)
		files := yamlFiles(t, "../../k8s")
		if len(files) < 6 {
			t.Fatalf("found %d YAML files under k8s/, want at least 6: %v", len(files), files)
		}
		// Namespaces for real first, so the namespaced objects have one.
		for _, f := range files {
			for _, o := range k.objects(f) {
				if kindOf(o) != "Namespace" {
					continue
				}
				if err := k.s.CreateOnce(k.ctx, o); err != nil {
					t.Fatalf("%s: %v", f, err)
				}
			}
		}
		for _, ns := range assumedNamespaces {
			if err := k.s.Namespace(k.ctx, ns, nil); err != nil {
				t.Fatal(err)
			}
		}
		total := 0
		for _, f := range files {
			for i, o := range k.objects(f) {
				if kindOf(o) != "Namespace" {
					k.dryRun(fmt.Sprintf("%s, object %d", f, i+1), o)
				}
				total++
			}
		}
		t.Logf("%d objects in %d files passed a strict server-side dry run", total, len(files))
	})

	t.Run("injected goldens", func(t *testing.T) {
		k := k.with(t)
		files, _ := filepath.Glob("../../pkg/inject/testdata/*.golden.yaml")
		if len(files) < 12 {
			t.Fatalf("found %d golden files, want at least 12", len(files))
		}
		total, sidecars, injected := 0, 0, 0
		for _, f := range files {
			data, _ := os.ReadFile(f)
			injected += bytes.Count(data, []byte(inject.AnnotationStatus+":"))
			for i, o := range k.objects(f) {
				if err := k.s.Namespace(k.ctx, namespaceOf(o), nil); err != nil {
					t.Fatal(err)
				}
				resp := k.dryRun(fmt.Sprintf("%s, object %d", filepath.Base(f), i+1), o)
				sidecars += bytes.Count(resp.Body, []byte(`"name":"sidecar","image"`))
				total++
			}
		}
		// Every injected pod template comes back with its sidecar.
		if sidecars != injected || injected < 25 {
			t.Errorf("%d sidecars came back from the dry runs, want %d (the injected pod templates of the goldens; at least 25)", sidecars, injected)
		}
		t.Logf("%d injected objects (%d sidecars) passed a strict server-side dry run", total, sidecars)
	})
}

// kube wraps the API server for one (sub)test.
type kube struct {
	t   *testing.T
	s   *kubetest.Server
	ctx context.Context
}

func (k *kube) with(t *testing.T) *kube { return &kube{t: t, s: k.s, ctx: k.ctx} }

func (k *kube) objects(file string) [][]byte {
	k.t.Helper()
	data, err := os.ReadFile(file)
	if err != nil {
		k.t.Fatal(err)
	}
	objs, err := kubetest.Objects(data)
	if err != nil {
		k.t.Fatalf("%s: %v", file, err)
	}
	return objs
}

// dryRun creates obj with dryRun=All and strict field validation; an error
// or a warning fails the test.
func (k *kube) dryRun(what string, obj []byte) *kubetest.Response {
	k.t.Helper()
	resp, err := k.s.Create(k.ctx, obj, kubetest.CreateOptions{DryRun: true})
	if err != nil {
		k.t.Fatalf("%s: server-side dry run: %v", what, err)
	}
	if len(resp.Warnings) > 0 {
		k.t.Errorf("%s: server-side dry run warned: %q", what, resp.Warnings)
	}
	return resp
}

func kindOf(obj []byte) string {
	var m struct{ Kind string }
	_ = json.Unmarshal(obj, &m)
	return m.Kind
}

func namespaceOf(obj []byte) string {
	var m struct {
		Metadata struct{ Namespace string } `json:"metadata"`
	}
	_ = json.Unmarshal(obj, &m)
	if m.Metadata.Namespace == "" {
		return "default"
	}
	return m.Metadata.Namespace
}

func yamlFiles(t *testing.T, root string) []string {
	t.Helper()
	var files []string
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() && regexp.MustCompile(`\.ya?ml$`).MatchString(path) {
			files = append(files, path)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return files
}
