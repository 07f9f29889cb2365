//go:build !noinjector

package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"

	"github.com/sidecar-mesh/sidecar/pkg/inject"
	"github.com/sidecar-mesh/sidecar/pkg/readlimit"
)

// injectFlags are the injector's defaults, shared by `inject` and
// `webhook`; a pod's sidecar.mesh/* annotations override them.
type injectFlags struct {
	image       string
	pullPolicy  string
	classic     bool
	logLevel    string
	drainWindow time.Duration
	consulAddr  string
	httpProxy   bool
	noProxy     []string
	env         []string
	cpuRequest  string
	cpuLimit    string
	memRequest  string
	memLimit    string
	// allowNonLoopbackAdmin is the operator's, never a pod's: see
	// inject.Config.AllowNonLoopbackAdmin.
	allowNonLoopbackAdmin bool
}

func defaultImage() string { return "sidecar:" + version }

func (f *injectFlags) addFlags(fs *pflag.FlagSet) {
	def := inject.DefaultResources()
	quantity := func(l corev1.ResourceList, name corev1.ResourceName) string {
		if q, ok := l[name]; ok {
			return q.String()
		}
		return "none"
	}
	fs.StringVar(&f.image, "image", defaultImage(), "image of the sidecar container (annotation "+inject.AnnotationImage+")")
	fs.StringVar(&f.pullPolicy, "image-pull-policy", string(corev1.PullIfNotPresent), "Always, IfNotPresent or Never")
	fs.BoolVar(&f.classic, "classic", false, "inject a regular container instead of a native sidecar (init container with restartPolicy Always), for clusters older than 1.29 (annotation "+inject.AnnotationClassic+")")
	fs.StringVar(&f.logLevel, "sidecar-log-level", "", "the sidecar's --log-level: debug, info, warn or error; empty: its default (annotation "+inject.AnnotationLogLevel+")")
	fs.DurationVar(&f.drainWindow, "drain-window", inject.DefaultDrainWindow, "the sidecar's --drain-window; the pod's terminationGracePeriodSeconds grows by it (annotation "+inject.AnnotationDrainWindow+")")
	fs.StringVar(&f.consulAddr, "consul-addr", "", "the sidecar's --consul-addr, host:port; $(HOST_IP):8500 is the node's agent (annotation "+inject.AnnotationConsulAddr+")")
	fs.BoolVar(&f.httpProxy, "http-proxy", false, "set HTTP_PROXY and NO_PROXY (and http_proxy, no_proxy) in the app containers; NO_PROXY holds "+strings.Join(inject.NoProxyDefault, ",")+" (annotation "+inject.AnnotationHTTPProxy+")")
	fs.StringSliceVar(&f.noProxy, "no-proxy-extra", nil, "entries added to NO_PROXY with --http-proxy: IP addresses, CIDRs such as the cluster's pod and service ranges, domain names with an optional leading dot; comma-separated, repeatable (annotation "+inject.AnnotationNoProxyExtra+", which replaces them)")
	fs.StringArrayVar(&f.env, "sidecar-env", nil, "NAME=VALUE added to the sidecar container's environment, e.g. OTEL_EXPORTER_OTLP_ENDPOINT=http://jaeger:4317; repeatable")
	fs.StringVar(&f.cpuRequest, "cpu-request", quantity(def.Requests, corev1.ResourceCPU), "the sidecar's CPU request, or none (annotation "+inject.AnnotationCPURequest+")")
	fs.StringVar(&f.cpuLimit, "cpu-limit", quantity(def.Limits, corev1.ResourceCPU), "the sidecar's CPU limit, or none; sets GOMAXPROCS, rounded up to whole cores (none: GOMAXPROCS=2) (annotation "+inject.AnnotationCPULimit+")")
	fs.StringVar(&f.memRequest, "memory-request", quantity(def.Requests, corev1.ResourceMemory), "the sidecar's memory request, or none (annotation "+inject.AnnotationMemoryRequest+")")
	fs.StringVar(&f.memLimit, "memory-limit", quantity(def.Limits, corev1.ResourceMemory), "the sidecar's memory limit, or none; sets GOMEMLIMIT (annotation "+inject.AnnotationMemoryLimit+")")
	fs.BoolVar(&f.allowNonLoopbackAdmin, "allow-non-loopback-admin", false, "let a pod's config file (annotation "+inject.AnnotationConfigMap+") put the sidecar's admin API on an address other than loopback; without it the admin API stays on 127.0.0.1:15000 (no annotation sets this)")
}

// injector builds the injector the flags describe.
func (f *injectFlags) injector() (*inject.Injector, error) {
	cfg := inject.Config{
		Image:                 f.image,
		ImagePullPolicy:       corev1.PullPolicy(f.pullPolicy),
		Version:               version,
		Classic:               f.classic,
		LogLevel:              f.logLevel,
		DrainWindow:           f.drainWindow,
		ConsulAddr:            f.consulAddr,
		HTTPProxy:             f.httpProxy,
		NoProxyExtra:          f.noProxy,
		AllowNonLoopbackAdmin: f.allowNonLoopbackAdmin,
		Resources: corev1.ResourceRequirements{
			Requests: corev1.ResourceList{},
			Limits:   corev1.ResourceList{},
		},
	}
	var errs []error
	for _, q := range []struct {
		flag, v string
		list    corev1.ResourceList
		name    corev1.ResourceName
	}{
		{"--cpu-request", f.cpuRequest, cfg.Resources.Requests, corev1.ResourceCPU},
		{"--cpu-limit", f.cpuLimit, cfg.Resources.Limits, corev1.ResourceCPU},
		{"--memory-request", f.memRequest, cfg.Resources.Requests, corev1.ResourceMemory},
		{"--memory-limit", f.memLimit, cfg.Resources.Limits, corev1.ResourceMemory},
	} {
		if q.v == "none" {
			continue
		}
		v, err := resource.ParseQuantity(q.v)
		if err != nil || v.Sign() <= 0 {
			errs = append(errs, fmt.Errorf("%s: %q is not a positive quantity such as 100m or 128Mi (or none)", q.flag, q.v))
			continue
		}
		q.list[q.name] = v
	}
	for _, kv := range f.env {
		name, value, ok := strings.Cut(kv, "=")
		if !ok || name == "" {
			errs = append(errs, fmt.Errorf("--sidecar-env: %q: want NAME=VALUE", kv))
			continue
		}
		cfg.Env = append(cfg.Env, corev1.EnvVar{Name: name, Value: value})
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	in, err := inject.New(cfg)
	if err != nil {
		return nil, fmt.Errorf("injection settings: %w", err)
	}
	return in, nil
}

// settableAnnotations are the annotations a user sets (not the status the
// injector writes).
func settableAnnotations() []string {
	var out []string
	for _, a := range inject.KnownAnnotations() {
		if a != inject.AnnotationStatus {
			out = append(out, a)
		}
	}
	return out
}

// injectOptions are the inputs of `sidecar inject`.
type injectOptions struct {
	// files are the inputs as named: files, directories, - for standard
	// input; -f first, then the arguments.
	files   []string
	verbose bool
	flags   injectFlags
	// maxTotal caps the inputs together, in bytes. Zero: readlimit.Max.
	maxTotal int64

	stdin          io.Reader
	stdout, stderr io.Writer

	injector *inject.Injector // set by complete
}

func (o *injectOptions) complete(args []string) (err error) {
	o.files = append(o.files, args...)
	if o.maxTotal == 0 {
		o.maxTotal = readlimit.Max
	}
	o.injector, err = o.flags.injector()
	return err
}

func (o *injectOptions) validate() error {
	if len(o.files) == 0 {
		return errors.New("no manifests: name files or directories, with -f or as arguments, or - for standard input")
	}
	stdin := 0
	for _, f := range o.files {
		if f == "-" {
			stdin++
		}
	}
	if stdin > 1 {
		return errors.New("-: standard input can be read once")
	}
	return nil
}

// manifestExts are the files of a directory that are read, as kubectl
// apply -f DIR reads them.
var manifestExts = []string{".json", ".yaml", ".yml"}

// inputs expands the named inputs into the files read, in order: a
// directory gives its files with a manifest extension, in name order, not
// its subdirectories.
func (o *injectOptions) inputs() ([]string, error) {
	var out []string
	for _, name := range o.files {
		if name == "-" {
			out = append(out, name)
			continue
		}
		fi, err := os.Stat(name)
		if err != nil {
			return nil, err
		}
		if !fi.IsDir() {
			out = append(out, name)
			continue
		}
		entries, err := os.ReadDir(name) // sorted by name
		if err != nil {
			return nil, err
		}
		n := len(out)
		for _, e := range entries {
			p := filepath.Join(name, e.Name())
			if !slices.Contains(manifestExts, filepath.Ext(p)) {
				continue
			}
			if fi, err := os.Stat(p); err != nil {
				return nil, err
			} else if !fi.IsDir() {
				out = append(out, p)
			}
		}
		if len(out) == n {
			return nil, fmt.Errorf("%s: no .json, .yaml or .yml files in the directory", name)
		}
	}
	return out, nil
}

// run injects every input in order; the output is written only when every
// document of every input is good. Each input is read up to readlimit.Max,
// and all of them together up to maxTotal: regular files are measured
// before anything is read, so that one past the total is refused at once,
// and standard input (or a pipe) is read no further than what they leave.
func (o *injectOptions) run() error {
	files, err := o.inputs()
	if err != nil {
		return err
	}
	tooMuch := func(label string) error {
		limit := fmt.Sprintf("%d bytes", o.maxTotal)
		if o.maxTotal%(1<<20) == 0 {
			limit = fmt.Sprintf("%d MiB", o.maxTotal>>20)
		}
		return fmt.Errorf("%s: with the inputs before it, more than %s, the most sidecar inject reads in one run", label, limit)
	}
	left := o.maxTotal
	sizes := make([]int64, len(files)) // -1: not a regular file
	for i, name := range files {
		sizes[i] = -1
		if fi, err := os.Stat(name); name != "-" && err == nil && fi.Mode().IsRegular() {
			sizes[i] = fi.Size()
			if sizes[i] > readlimit.Max {
				return &readlimit.TooLargeError{Name: name, Limit: readlimit.Max}
			}
			if left -= sizes[i]; left < 0 {
				return tooMuch(name)
			}
		}
	}
	var out, doc bytes.Buffer
	for i, name := range files {
		label := name
		var data []byte
		switch {
		case sizes[i] >= 0:
			data, err = readlimit.ReadFile(name)
			left -= int64(len(data)) - sizes[i] // it may have changed since
		case name == "-":
			label = "<stdin>"
			data, err = readlimit.ReadAll(io.LimitReader(o.stdin, left+1), "stdin")
			left -= int64(len(data))
		default:
			data, err = readSpecial(name, left+1)
			left -= int64(len(data))
		}
		if err != nil {
			return err
		}
		if left < 0 {
			return tooMuch(label)
		}
		doc.Reset()
		notices, err := o.injector.DocumentBytes(data, &doc)
		for _, n := range notices {
			if o.verbose || strings.HasPrefix(n.Text, "warning: ") {
				fmt.Fprintf(o.stderr, "%s: %s\n", label, n)
			}
		}
		if err != nil {
			return fmt.Errorf("%s: %w", label, err)
		}
		// The inputs are joined as documents of one stream. kubectl reads
		// a stream that starts with "{" as JSON to its end, so when there
		// are several inputs, one that starts so gets a separator first.
		first := bytes.TrimLeft(doc.Bytes(), " \t\r\n")
		if doc.Len() > 0 && !bytes.HasPrefix(doc.Bytes(), []byte("---")) &&
			(out.Len() > 0 || len(files) > 1 && bytes.HasPrefix(first, []byte("{"))) {
			out.WriteString("---\n")
		}
		out.Write(doc.Bytes())
	}
	_, err = o.stdout.Write(out.Bytes())
	return err
}

// readSpecial reads a file that is no regular file (a pipe, a device) up
// to limit bytes, and up to readlimit.Max.
func readSpecial(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return readlimit.ReadAll(io.LimitReader(f, limit), path)
}

func newInjectCommand(stdin io.Reader, stdout, stderr io.Writer) *cobra.Command {
	o := &injectOptions{stdin: stdin, stdout: stdout, stderr: stderr}
	cmd := &cobra.Command{
		Use:   "inject [-f] FILE|DIR|- ...",
		Short: "Add the sidecar to the pods of Kubernetes manifests",
		Long: `Read Kubernetes manifests (multi-document YAML) and write them to standard output
with the sidecar added to every pod template: Pods, Deployments, StatefulSets,
DaemonSets, ReplicaSets, ReplicationControllers, Jobs and CronJobs, also inside
a List. Other documents, and pods that opted out or already have the sidecar,
are written exactly as read, so injecting twice equals injecting once.

Manifests come from the files named with -f, then those named as arguments,
in order; a directory gives its .json, .yaml and .yml files in name order (as
kubectl apply -f DIR does, without subdirectories); - is standard input. At
most 64 MiB are read of each, and of all together. Nothing is written unless
every document of every input is good.

The sidecar is a native sidecar (the first init container, restartPolicy
Always, with a startupProbe, so the app starts only once the proxy serves and
Jobs complete); --classic adds a regular container for clusters before 1.29.
The app container's HTTP, TCP and gRPC probes move to the sidecar, which runs
them; the kubelet asks the sidecar's /app-health/* endpoints instead.

Per pod, annotations override the flags: ` + strings.Join(settableAnnotations(), ", ") + `.`,
		Example: `  sidecar inject deploy.yaml | kubectl apply -f -
  sidecar inject -f manifests/ -f extra.yaml | kubectl apply -f -
  kubectl get deploy web -o yaml | sidecar inject -f - --http-proxy | kubectl apply -f -`,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := o.complete(args); err != nil {
				return err
			}
			if err := o.validate(); err != nil {
				return err
			}
			return o.run()
		},
	}
	cmd.Flags().StringArrayVarP(&o.files, "filename", "f", nil, "file of manifests, directory (its .json, .yaml and .yml files in name order, not its subdirectories), or - for standard input; repeatable, read before the arguments")
	cmd.Flags().BoolVarP(&o.verbose, "verbose", "v", false, "also say on standard error which pods were not injected and why")
	o.flags.addFlags(cmd.Flags())
	return cmd
}
