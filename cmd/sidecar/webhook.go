package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/spf13/cobra"

	"github.com/sidecar-mesh/sidecar/pkg/config"
	"github.com/sidecar-mesh/sidecar/pkg/inject"
)

// Limits of the webhook's HTTPS server. The API server posts one
// AdmissionReview per request, with a timeout of its own (at most 30 s);
// pods are at most about 1.5 MB in etcd, and an AdmissionReview carries one.
// The API server speaks HTTP/2 to webhooks: one connection per API server
// carries all its calls.
const (
	webhookMaxBody           = 4 << 20
	webhookMaxHeaderBytes    = 64 << 10
	webhookMaxConns          = 512
	webhookMaxConnsPerClient = 128
	webhookReadHeaderTimeout = 5 * time.Second
	webhookReadTimeout       = 15 * time.Second
	webhookWriteTimeout      = 15 * time.Second
	webhookIdleTimeout       = 90 * time.Second
	webhookShutdownTimeout   = 10 * time.Second
	// webhookReviewBytes bounds the bytes of the reviews worked on at once
	// (reviewBudget): a review takes up to about 80 times its size in
	// memory (a pod of many tiny containers, decoded).
	webhookReviewBytes = 4 << 20
)

// webhookOptions are the inputs of `sidecar webhook`.
type webhookOptions struct {
	addr      string
	certFile  string
	keyFile   string
	logLevel  string
	logFormat string
	flags     injectFlags
	// maxConns and maxConnsPerClient bound the connections (connGuard).
	maxConns, maxConnsPerClient int
	// caBundle management (optional): see caBundleSyncer.
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
	o.log = newLogger(o.stderr, config.Log{Level: o.logLevel, Format: o.logFormat}).With("component", "webhook")
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

// run serves until ctx ends, then shuts down gracefully.
func (o *webhookOptions) run(ctx context.Context) error {
	var syncer *caBundleSyncer
	if o.caBundleFile != "" {
		var err error
		syncer, err = newCABundleSyncer(o.webhookConfig, o.caBundleFile, o.kubeAPIServer, o.kubeTokenFile, o.kubeCAFile, o.getenv, o.log)
		if err != nil {
			return err
		}
	}
	certs, err := newCertReloader(o.certFile, o.keyFile, o.log)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", o.addr)
	if err != nil {
		return fmt.Errorf("webhook listener on %s: %w", o.addr, err)
	}
	guard := newConnGuard(o.maxConns, o.maxConnsPerClient, o.log)
	srv := &http.Server{
		Handler:           newWebhookHandler(o.injector, o.log, newReviewBudget(webhookReviewBytes)),
		ConnState:         guard.ConnState,
		TLSConfig:         &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: certs.GetCertificate},
		ReadHeaderTimeout: webhookReadHeaderTimeout,
		ReadTimeout:       webhookReadTimeout,
		WriteTimeout:      webhookWriteTimeout,
		IdleTimeout:       webhookIdleTimeout,
		MaxHeaderBytes:    webhookMaxHeaderBytes,
		ErrorLog:          slog.NewLogLogger(o.log.Handler(), slog.LevelDebug),
	}
	o.log.Info("webhook serving", "addr", ln.Addr().String(), "image", o.flags.image, "version", version)
	errc := make(chan error, 1)
	go func() { errc <- srv.ServeTLS(guard.Listener(ln), "", "") }()
	syncDone := make(chan struct{})
	syncCtx, stopSync := context.WithCancel(ctx)
	defer func() { stopSync(); <-syncDone }()
	if syncer != nil {
		// A rotated certificate may come with a new CA.
		certs.onReload = syncer.Kick
		go func() { defer close(syncDone); syncer.run(syncCtx) }()
	} else {
		close(syncDone)
	}
	select {
	case err := <-errc:
		return fmt.Errorf("webhook server: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), webhookShutdownTimeout)
	defer cancel()
	err = srv.Shutdown(sctx)
	<-errc // ServeTLS returned ErrServerClosed
	o.log.Info("webhook stopped")
	return err
}

// newWebhookHandler answers:
//
//	POST /inject   AdmissionReview v1 -> AdmissionReview v1 (JSON Patch)
//	GET  /healthz  200 "ok"
//
// Reviews wait for their share of budget (their size) before they are read;
// one that waits until its caller gives up is answered 503.
func newWebhookHandler(in *inject.Injector, log *slog.Logger, budget *reviewBudget) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = io.WriteString(w, "ok\n")
	})
	mux.HandleFunc("POST /inject", func(w http.ResponseWriter, r *http.Request) {
		if mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type")); err != nil || mt != "application/json" {
			http.Error(w, "want Content-Type: application/json", http.StatusUnsupportedMediaType)
			return
		}
		size := r.ContentLength
		if size < 0 || size > webhookMaxBody {
			size = webhookMaxBody
		}
		release, err := budget.acquire(r.Context(), size)
		if err != nil {
			http.Error(w, "busy with other reviews", http.StatusServiceUnavailable)
			return
		}
		defer release()
		body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, webhookMaxBody))
		if err != nil {
			var tooBig *http.MaxBytesError
			if errors.As(err, &tooBig) {
				http.Error(w, fmt.Sprintf("AdmissionReview larger than %d bytes", tooBig.Limit), http.StatusRequestEntityTooLarge)
				return
			}
			http.Error(w, "reading the request: "+err.Error(), http.StatusBadRequest)
			return
		}
		review, d, err := in.Review(body)
		if err != nil {
			log.Warn("bad admission request", "remote", r.RemoteAddr, "err", err.Error())
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		out, err := json.Marshal(review)
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		attrs := []any{"uid", d.UID, "namespace", d.Namespace, "pod", d.Name, "operation", d.Operation, "injected", d.Injected, "proto", r.Proto}
		switch {
		case d.Denied != "":
			attrs = append(attrs, "denied", d.Denied)
		case d.Skipped != "":
			attrs = append(attrs, "skipped", d.Skipped)
		default:
			attrs = append(attrs, "patchOps", d.Patch)
		}
		if len(d.Warnings) > 0 {
			attrs = append(attrs, "warnings", d.Warnings)
		}
		log.Info("admission", attrs...)
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(out)
	})
	return mux
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
	fs.IntVar(&o.maxConns, "max-conns", webhookMaxConns, "most connections open at once; over it, the longest idle one is closed for a new one, or the new one refused when none is idle")
	fs.IntVar(&o.maxConnsPerClient, "max-conns-per-client", webhookMaxConnsPerClient, "most connections open at once from one source address, with the same rule")
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

// reviewBudget bounds the bytes of the AdmissionReviews being worked on at
// once. Each review costs memory in proportion to its pod, so a burst of
// large pods takes turns instead of taking the webhook past its memory
// limit (a restart would let the API server create pods without the
// sidecar); pods of ordinary size never wait. A review larger than the
// whole budget runs alone. Safe for concurrent use.
type reviewBudget struct {
	size int64

	mu    sync.Mutex // guards the fields below
	used  int64
	freed chan struct{} // closed (and replaced) whenever bytes are released
}

func newReviewBudget(size int64) *reviewBudget {
	return &reviewBudget{size: size, freed: make(chan struct{})}
}

// acquire waits until n bytes (at most the whole budget) are free or ctx
// ends, and returns the function that gives them back.
func (b *reviewBudget) acquire(ctx context.Context, n int64) (release func(), err error) {
	n = min(n, b.size)
	for {
		b.mu.Lock()
		if b.used+n <= b.size {
			b.used += n
			b.mu.Unlock()
			var once sync.Once
			return func() { once.Do(func() { b.release(n) }) }, nil
		}
		freed := b.freed
		b.mu.Unlock()
		select {
		case <-freed:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

func (b *reviewBudget) release(n int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.used -= n
	close(b.freed)
	b.freed = make(chan struct{})
}
