package main

import (
	"flag"
	"os"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/sidecar-mesh/sidecar/pkg/config"
)

// configReference is the page whose key table TestConfigReference keeps
// equal to the settings table and the config file's keys.
const configReference = "../../docs/configuration.md"

var updateDocs = flag.Bool("update-docs", false, "rewrite the generated parts of docs/ (make docs)")

// fileOnly describes the config file's keys that have no flag or
// environment variable: every key of config.Config is either a setting's
// or here, with what it does and its default.
var fileOnly = map[string][2]string{
	"policies":                                          {"inline Policy documents (docs/policies.md); service `*` is the default policy", ""},
	"discovery.consul.datacenter":                       {"datacenter queried by default", "the agent's"},
	"discovery.consul.services":                         {"per service: `tags` an instance must have, `datacenter`", ""},
	"discovery.consul.waitTime":                         {"wait of Consul's blocking queries", "5m"},
	"discovery.consul.firstWait":                        {"how long a service's first request waits for Consul's first answer", "1s"},
	"discovery.consul.idleTimeout":                      {"a service unused this long is no longer watched", "10m"},
	"discovery.consul.cacheFile":                        {"file keeping the last known good endpoints across restarts", "none"},
	"discovery.consul.cacheMaxAge":                      {"how old the cache file's endpoints may be to be used", "1h"},
	"discovery.consul.register.disabled":                {"do not register the app in Consul", "false"},
	"discovery.consul.register.id":                      {"the instance's ID", "SERVICE-ADDRESS-PORT"},
	"discovery.consul.register.tags":                    {"tags of the registration", ""},
	"discovery.consul.register.meta":                    {"metadata of the registration", ""},
	"discovery.consul.register.ttl":                     {"TTL of the readiness check the sidecar feeds", "10s"},
	"discovery.consul.register.deregisterCriticalAfter": {"Consul drops an instance whose check stayed critical this long", "1m"},
}

// configKeys lists the config file's keys: a struct's fields are keys
// under its key, down to a setting's key or a value that is not a struct.
func configKeys(t reflect.Type, prefix string, isSetting func(string) bool) []string {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	var keys []string
	for i := range t.NumField() {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if !f.IsExported() || name == "-" || name == "" {
			continue
		}
		key := prefix + name
		ft := f.Type
		for ft.Kind() == reflect.Pointer {
			ft = ft.Elem()
		}
		if ft.Kind() == reflect.Struct && !isSetting(key) {
			keys = append(keys, configKeys(ft, key+".", isSetting)...)
			continue
		}
		keys = append(keys, key)
	}
	return keys
}

// keyTable is the markdown table of every key: the settings' in their
// order, then the file-only keys, then the flag-only settings.
func keyTable(t *testing.T) string {
	bySetting := map[string]setting{}
	for _, s := range settings {
		if s.key != "" {
			bySetting[s.key] = s
		}
	}
	keys := configKeys(reflect.TypeFor[config.Config](), "", func(k string) bool { _, ok := bySetting[k]; return ok })
	for k := range bySetting {
		if !slices.Contains(keys, k) {
			t.Errorf("setting --%s names key %s, which the config file does not have", bySetting[k].flag, k)
		}
	}
	for k := range fileOnly {
		if !slices.Contains(keys, k) {
			t.Errorf("fileOnly names key %s, which the config file does not have", k)
		}
	}
	cell := func(s string) string { return strings.ReplaceAll(s, "|", `\|`) }
	var b strings.Builder
	b.WriteString("| key | flag | environment | default | what it does |\n|---|---|---|---|---|\n")
	for _, s := range settings {
		if s.key == "" {
			continue
		}
		env := "`" + strings.Join(append([]string{s.envName()}, s.env...), "`, `") + "`"
		b.WriteString("| `" + s.key + "` | `--" + s.flag + "` | " + env + " | " + cell(s.def) + " | " + cell(s.usage) + " |\n")
	}
	for _, k := range keys {
		if _, ok := bySetting[k]; ok {
			continue
		}
		d, ok := fileOnly[k]
		if !ok {
			t.Errorf("config key %s has neither a setting nor a fileOnly entry", k)
			continue
		}
		b.WriteString("| `" + k + "` | | | " + cell(d[1]) + " | " + cell(d[0]) + " |\n")
	}
	for _, s := range settings {
		if s.key == "" {
			b.WriteString("| (none) | `--" + s.flag + "` | `" + s.envName() + "` | " + cell(s.def) + " | " + cell(s.usage) + " |\n")
		}
	}
	b.WriteString("| (the file) | `--config`, `-c` | `SIDECAR_CONFIG` | none | the configuration file (YAML) |\n")
	return b.String()
}

// The configuration reference's key table is generated from the settings
// table (flags, environment, defaults) and the config file's keys, so
// that it cannot drift from them; `make docs` rewrites it.
func TestConfigReference(t *testing.T) {
	const begin, end = "<!-- begin: generated by `make docs` from the settings table -->\n", "<!-- end: generated -->\n"
	data, err := os.ReadFile(configReference)
	if err != nil {
		t.Fatal(err)
	}
	page := string(data)
	i, j := strings.Index(page, begin), strings.Index(page, end)
	if i < 0 || j < i {
		t.Fatalf("%s lacks the generated table's markers %q and %q", configReference, begin, end)
	}
	want := page[:i+len(begin)] + keyTable(t) + page[j:]
	if want == page {
		return
	}
	if *updateDocs {
		if err := os.WriteFile(configReference, []byte(want), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	t.Errorf("%s's key table is not the settings table's: run `make docs`", configReference)
}
