//go:build !noinjector

package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"

	"github.com/spf13/cobra"

	"github.com/sidecar-mesh/sidecar/pkg/config"
	"github.com/sidecar-mesh/sidecar/pkg/inject"
	"github.com/sidecar-mesh/sidecar/pkg/webhook"
)

// webhookOptions are the inputs of `sidecar webhook`.
type webhookOptions struct {
	addr      string
	certFile  string
	keyFile   string
	logLevel  string
	logFormat string
	flags     injectFlags
	// maxConns and maxConnsPerClient bound the connections.
	maxConns, maxConnsPerClient int
	// caBundle management (optional): see webhook.CABundleConfig.
	caBundleFile  string
	webhookConfig string
	kubeAPIServer string
	kubeTokenFile string
	kubeCAFile    string

	stdout, stderr io.Writer
	getenv         func(string) string

	injector *inject.Injector // set by complete
	log      *slog.Logger
}

func (o *webhookOptions) complete() (err error) {
	o.log = newLogger(o.stderr, config.Log{Level: o.logLevel, Format: o.logFormat})
	o.injector, err = o.flags.injector()
	return err
}

func (o *webhookOptions) validate() error {
	var errs []error
	if o.certFile == "" || o.keyFile == "" {
		errs = append(errs, errors.New("--tls-cert-file and --tls-key-file are required: the API server calls webhooks over HTTPS only"))
	}
	if _, _, err := net.SplitHostPort(o.addr); err != nil {
		errs = append(errs, fmt.Errorf("--addr %q: want host:port", o.addr))
	}
	if o.maxConns < 1 || o.maxConnsPerClient < 1 || o.maxConnsPerClient > o.maxConns {
		errs = append(errs, fmt.Errorf("--max-conns %d, --max-conns-per-client %d: want 1 <= per client <= max", o.maxConns, o.maxConnsPerClient))
	}
	if err := config.CheckLogLevel(o.logLevel); err != nil {
		errs = append(errs, fmt.Errorf("--log-level %w", err))
	}
	switch o.logFormat {
	case "json", "text":
	default:
		errs = append(errs, fmt.Errorf("--log-format %q (allowed: json, text)", o.logFormat))
	}
	return errors.Join(errs...)
}

// run binds the webhook and serves it until ctx ends, then shuts it down
// gracefully.
func (o *webhookOptions) run(ctx context.Context) error {
	cfg := webhook.Config{
		Injector:          o.injector,
		Addr:              o.addr,
		CertFile:          o.certFile,
		KeyFile:           o.keyFile,
		MaxConns:          o.maxConns,
		MaxConnsPerClient: o.maxConnsPerClient,
		Logger:            o.log,
	}
	if o.caBundleFile != "" {
		cfg.CABundle = &webhook.CABundleConfig{
			File:          o.caBundleFile,
			WebhookConfig: o.webhookConfig,
			APIServer:     o.kubeAPIServer,
			TokenFile:     o.kubeTokenFile,
			CAFile:        o.kubeCAFile,
			Getenv:        o.getenv,
		}
	}
	srv, err := webhook.New(cfg)
	if err != nil {
		return err
	}
	o.log.Info("webhook serving", "component", "webhook", "addr", srv.Addr().String(), "image", o.flags.image, "version", version)
	return srv.Run(ctx)
}

func newWebhookCommand(stdout, stderr io.Writer, getenv func(string) string) *cobra.Command {
	o := &webhookOptions{stdout: stdout, stderr: stderr, getenv: getenv}
	cmd := &cobra.Command{
		Use:   "webhook --tls-cert-file FILE --tls-key-file FILE",
		Short: "Serve sidecar injection as a Kubernetes mutating admission webhook",
		Long: `Serve POST /inject over HTTPS: the API server sends an AdmissionReview (v1) for
each Pod created in a namespace labelled sidecar.mesh/inject=enabled (see
k8s/webhook.yaml), and gets back a JSON Patch that adds the sidecar, computed
by the same code as 'sidecar inject'. A pod with an invalid sidecar.mesh/*
annotation is refused with a message naming it. GET /healthz answers 200.

The certificate and key are re-read when their files change (a renewed,
mounted Secret), without a restart. Connections are bounded in all and per
source address; over a bound, an idle connection (one that sends nothing)
is closed to make room, so idle connections can't keep the API server out.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := o.complete(); err != nil {
				return err
			}
			if err := o.validate(); err != nil {
				return err
			}
			return o.run(cmd.Context())
		},
	}
	fs := cmd.Flags()
	fs.StringVar(&o.addr, "addr", "0.0.0.0:9443", "address of the HTTPS listener")
	fs.IntVar(&o.maxConns, "max-conns", webhook.DefaultMaxConns, "most connections open at once; over it, the longest idle one is closed for a new one, or the new one refused when none is idle")
	fs.IntVar(&o.maxConnsPerClient, "max-conns-per-client", webhook.DefaultMaxConnsPerClient, "most connections open at once from one source address, with the same rule")
	fs.StringVar(&o.certFile, "tls-cert-file", "", "PEM certificate (chain) of the webhook's server name; reloaded when it changes")
	fs.StringVar(&o.keyFile, "tls-key-file", "", "PEM private key of --tls-cert-file; reloaded when it changes")
	fs.StringVar(&o.logLevel, "log-level", "info", "the webhook's log level: debug, info, warn or error")
	fs.StringVar(&o.logFormat, "log-format", "json", "the webhook's log format: json or text")
	fs.StringVar(&o.caBundleFile, "ca-bundle-file", "", "PEM CA that signed --tls-cert-file: when set, the webhook keeps the caBundle of --webhook-config equal to it (at start and after each certificate reload)")
	fs.StringVar(&o.webhookConfig, "webhook-config", "sidecar-injector", "the MutatingWebhookConfiguration whose caBundle --ca-bundle-file manages")
	fs.StringVar(&o.kubeAPIServer, "kube-api-server", "", "https URL of the Kubernetes API for --ca-bundle-file; default: in-cluster (KUBERNETES_SERVICE_HOST/PORT)")
	fs.StringVar(&o.kubeTokenFile, "kube-token-file", "", "bearer token file for --kube-api-server; default: the pod's service account token")
	fs.StringVar(&o.kubeCAFile, "kube-ca-file", "", "CA of --kube-api-server; default: the pod's service account ca.crt")
	o.flags.addFlags(fs)
	return cmd
}
