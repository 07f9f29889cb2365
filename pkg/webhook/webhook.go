// Package webhook serves sidecar injection as a Kubernetes mutating
// admission webhook, over HTTPS only (the API server calls webhooks over
// nothing else):
//
//	POST /inject   AdmissionReview v1 -> AdmissionReview v1 (JSON Patch)
//	GET  /healthz  200 "ok"
//
// The patch is what pkg/inject computes for the pod, as `sidecar inject`
// does; a pod with an invalid sidecar.mesh/* annotation is refused with a
// message naming it (handler.go).
//
// It protects itself, so that the API server, which creates pods without
// the sidecar when the webhook fails it (failurePolicy Ignore), is always
// answered:
//
//   - Bounded requests: 64 KiB of header, 4 MiB of body (a pod is at most
//     about 1.5 MB in etcd), read and write timeouts of 15 s, and 3 s to
//     read a review's body once its headers are in.
//   - Bounded memory: a review's body is charged to a budget of review
//     bytes read and worked on at once as it arrives, since a review takes
//     up to about 80 times its size decoded; one whose caller gives up
//     waiting for room is answered 503 (reviewBudget).
//   - Bounded connections, in all and per source address; over a bound an
//     idle or stalled connection (its requests waiting 500 ms for the
//     client's bytes) is closed to make room, so connections left idle or
//     trickling on purpose can't keep the API server out, and no one
//     source can hold every place (connGuard, conns.go).
//   - The certificate and key are re-read when their files change (a
//     renewed, mounted Secret), without a restart; a pair that fails to
//     load leaves the last good one in use (certReloader, tls.go).
//
// Optionally it keeps the caBundle of its MutatingWebhookConfiguration
// equal to the CA that signed its certificate, at start and after every
// certificate reload (caBundleSyncer, cabundle.go).
package webhook

import (
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/inject"
)

// Default bounds of the connections (Config.MaxConns, MaxConnsPerClient).
// The API server speaks HTTP/2 to webhooks: one connection per API server
// carries all its calls, and it opens another only past 250 reviews in
// flight on it (the server's stream limit). 32 per source address leaves
// room for several API servers behind one address (a NAT, a Konnectivity
// agent) and for the connections they replace, while it takes 16
// addresses to fill the 512: a few sources holding connections busy
// can't keep the API server out.
const (
	DefaultMaxConns          = 512
	DefaultMaxConnsPerClient = 32
)

// Limits of the webhook's HTTPS server. The API server posts one
// AdmissionReview per request, with a timeout of its own (at most 30 s);
// pods are at most about 1.5 MB in etcd, and an AdmissionReview carries one.
const (
	maxBody           = 4 << 20
	maxHeaderBytes    = 64 << 10
	readHeaderTimeout = 5 * time.Second
	readTimeout       = 15 * time.Second
	writeTimeout      = 15 * time.Second
	idleTimeout       = 90 * time.Second
	shutdownTimeout   = 10 * time.Second
	// bodyTimeout bounds the read of a review's body, from when the
	// handler starts on it. The API server sends the body at once, and a
	// review of at most 3 MiB takes milliseconds on a cluster's network; a
	// connection whose body trickles in a byte now and then is not stalled
	// long enough to be closed to make room, and without this bound it
	// would hold its place for the whole readTimeout.
	bodyTimeout = 3 * time.Second
	// reviewBytes bounds the bytes of the reviews worked on at once
	// (reviewBudget): a review takes up to about 80 times its size in
	// memory (a pod of many tiny containers, decoded).
	reviewBytes = 4 << 20
)

// Config configures the webhook. Injector, Addr, CertFile and KeyFile are
// required; the zero value of any other field means its default.
type Config struct {
	// Injector computes the patch of each pod.
	Injector *inject.Injector
	// Addr is the host:port of the HTTPS listener.
	Addr string
	// CertFile and KeyFile are the PEM certificate (chain) of the webhook's
	// server name and its private key, re-read when either file changes.
	CertFile, KeyFile string
	// MaxConns bounds the connections open at once, and MaxConnsPerClient
	// those from one source address (at most MaxConns); see connGuard.
	// Zero: DefaultMaxConns, DefaultMaxConnsPerClient.
	MaxConns, MaxConnsPerClient int
	// CABundle, when set, keeps a MutatingWebhookConfiguration's caBundle
	// equal to a CA file. Nil: the caBundle is left alone.
	CABundle *CABundleConfig
	// Logger gets the webhook's logs (component=webhook): what it serves,
	// each admission, certificate loads, caBundle updates, connections
	// over their bounds. Nil: discarded.
	Logger *slog.Logger
}

// CABundleConfig says which caBundle to keep up to date, from which CA, and
// how to reach the Kubernetes API. The zero value of the API fields means
// the pod's own service account, in cluster. Errors about File and
// APIServer name the flags of `sidecar webhook` that set them
// (--ca-bundle-file, --kube-api-server).
type CABundleConfig struct {
	// File is the PEM CA that signed Config.CertFile. Required.
	File string
	// WebhookConfig is the name of the MutatingWebhookConfiguration whose
	// webhooks get the caBundle. Required.
	WebhookConfig string
	// APIServer is the https URL of the Kubernetes API. Empty: in cluster,
	// from KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT.
	APIServer string
	// TokenFile holds the bearer token, re-read for every call. Empty: the
	// pod's service account token.
	TokenFile string
	// CAFile is the PEM CA of the API server. Empty: the pod's service
	// account ca.crt.
	CAFile string
	// Getenv reads the in-cluster environment. Nil: os.Getenv.
	Getenv func(string) string
}

// Server is the webhook, bound to its address. Run serves it and must be
// called once: it owns the listener. Addr is safe for concurrent use.
type Server struct {
	log    *slog.Logger
	ln     net.Listener
	srv    *http.Server
	guard  *connGuard
	budget *reviewBudget
	syncer *caBundleSyncer // nil without Config.CABundle
}

// New checks cfg, builds the caBundle's API client, loads the certificate
// and binds the listener: it fails when any of these fails, and then holds
// nothing. Nothing is served until Run.
func New(cfg Config) (*Server, error) {
	cfg.MaxConns = cmp.Or(cfg.MaxConns, DefaultMaxConns)
	cfg.MaxConnsPerClient = cmp.Or(cfg.MaxConnsPerClient, DefaultMaxConnsPerClient)
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	log := slog.New(slog.DiscardHandler)
	if cfg.Logger != nil {
		log = cfg.Logger
	}
	log = log.With("component", "webhook")
	s := &Server{log: log}
	if c := cfg.CABundle; c != nil {
		getenv := c.Getenv
		if getenv == nil {
			getenv = os.Getenv
		}
		var err error
		s.syncer, err = newCABundleSyncer(c.WebhookConfig, c.File, c.APIServer, c.TokenFile, c.CAFile, getenv, log)
		if err != nil {
			return nil, err
		}
	}
	certs, err := newCertReloader(cfg.CertFile, cfg.KeyFile, log)
	if err != nil {
		return nil, err
	}
	if s.syncer != nil {
		// A rotated certificate may come with a new CA.
		certs.onReload = s.syncer.Kick
	}
	s.ln, err = net.Listen("tcp", cfg.Addr)
	if err != nil {
		return nil, fmt.Errorf("webhook listener on %s: %w", cfg.Addr, err)
	}
	s.guard = newConnGuard(cfg.MaxConns, cfg.MaxConnsPerClient, log)
	s.budget = newReviewBudget(reviewBytes)
	s.srv = &http.Server{
		Handler:           s.guard.Handler(newHandler(cfg.Injector, log, s.budget)),
		ConnState:         s.guard.ConnState,
		ConnContext:       s.guard.ConnContext,
		TLSConfig:         &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: certs.GetCertificate},
		ReadHeaderTimeout: readHeaderTimeout,
		ReadTimeout:       readTimeout,
		WriteTimeout:      writeTimeout,
		IdleTimeout:       idleTimeout,
		MaxHeaderBytes:    maxHeaderBytes,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelDebug),
	}
	return s, nil
}

func (c *Config) validate() error {
	var errs []error
	if c.Injector == nil {
		errs = append(errs, errors.New("webhook: no Injector"))
	}
	if c.CertFile == "" || c.KeyFile == "" {
		errs = append(errs, errors.New("webhook: CertFile and KeyFile are required"))
	}
	if c.MaxConns < 1 || c.MaxConnsPerClient < 1 || c.MaxConnsPerClient > c.MaxConns {
		errs = append(errs, fmt.Errorf("webhook: MaxConns %d, MaxConnsPerClient %d: want 1 <= per client <= max", c.MaxConns, c.MaxConnsPerClient))
	}
	return errors.Join(errs...)
}

// Addr is the address the webhook listens on.
func (s *Server) Addr() net.Addr { return s.ln.Addr() }

// Run serves until ctx ends, then shuts down gracefully: it stops
// accepting and gives the reviews in flight up to 10 s. It returns the
// shutdown's error, or the server's if it failed first. With a caBundle to
// keep, Run syncs it at once and after every certificate reload, and waits
// for the sync to stop before it returns.
func (s *Server) Run(ctx context.Context) error {
	errc := make(chan error, 1)
	go func() { errc <- s.srv.ServeTLS(s.guard.Listener(s.ln), "", "") }()
	syncDone := make(chan struct{})
	syncCtx, stopSync := context.WithCancel(ctx)
	defer func() { stopSync(); <-syncDone }()
	if s.syncer != nil {
		go func() { defer close(syncDone); s.syncer.run(syncCtx) }()
	} else {
		close(syncDone)
	}
	select {
	case err := <-errc:
		return fmt.Errorf("webhook server: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	err := s.srv.Shutdown(sctx)
	<-errc // ServeTLS returned ErrServerClosed
	s.log.Info("webhook stopped")
	return err
}
