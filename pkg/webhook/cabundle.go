package webhook

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"
)

// In-cluster defaults of the Kubernetes API client (the pod's service
// account, mounted by the kubelet).
const (
	serviceAccountDir   = "/var/run/secrets/kubernetes.io/serviceaccount"
	caBundleRetryMin    = time.Second
	caBundleRetryMax    = 30 * time.Second
	caBundleCallTimeout = 10 * time.Second
)

// caBundleSyncer keeps the caBundle of the webhook's
// MutatingWebhookConfiguration equal to the CA that signed the serving
// certificate, so that a deployment is "create the TLS Secret, apply the
// manifests": the API server learns the CA from the webhook, and again after
// each rotation. It needs get and patch on that one object (k8s/webhook.yaml
// grants exactly that). Safe for concurrent use.
type caBundleSyncer struct {
	name      string // the MutatingWebhookConfiguration
	caFile    string
	apiServer string // https://host:port
	tokenFile string
	client    *http.Client
	log       *slog.Logger
	// kick asks the sync loop to run again (a reloaded certificate).
	kick chan struct{}
}

// newCABundleSyncer builds the API client: apiServer, tokenFile and
// apiCAFile default to the in-cluster service account.
func newCABundleSyncer(name, caFile, apiServer, tokenFile, apiCAFile string, getenv func(string) string, log *slog.Logger) (*caBundleSyncer, error) {
	if apiServer == "" {
		host, port := getenv("KUBERNETES_SERVICE_HOST"), getenv("KUBERNETES_SERVICE_PORT")
		if host == "" || port == "" {
			return nil, errors.New("--ca-bundle-file: not running in a cluster (no KUBERNETES_SERVICE_HOST/PORT): set --kube-api-server")
		}
		apiServer = "https://" + net.JoinHostPort(host, port)
	}
	if u, err := url.Parse(apiServer); err != nil || u.Scheme != "https" || u.Host == "" {
		return nil, fmt.Errorf("--kube-api-server %q: want https://host:port", apiServer)
	}
	if tokenFile == "" {
		tokenFile = serviceAccountDir + "/token"
	}
	if apiCAFile == "" {
		apiCAFile = serviceAccountDir + "/ca.crt"
	}
	ca, err := os.ReadFile(apiCAFile)
	if err != nil {
		return nil, fmt.Errorf("the API server's CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		return nil, fmt.Errorf("the API server's CA %s: no PEM certificate", apiCAFile)
	}
	if _, err := readCABundle(caFile); err != nil {
		return nil, err
	}
	return &caBundleSyncer{
		name: name, caFile: caFile, apiServer: strings.TrimSuffix(apiServer, "/"), tokenFile: tokenFile,
		client: &http.Client{Timeout: caBundleCallTimeout, Transport: &http.Transport{
			TLSClientConfig:   &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12},
			DisableKeepAlives: true,
			Proxy:             nil,
		}},
		log:  log.With("webhookConfiguration", name),
		kick: make(chan struct{}, 1),
	}, nil
}

// Kick makes the loop sync again soon; it never blocks.
func (s *caBundleSyncer) Kick() {
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

// run syncs at once, then on every Kick, retrying failures with capped
// exponential backoff, until ctx ends.
func (s *caBundleSyncer) run(ctx context.Context) {
	backoff := caBundleRetryMin
	for {
		var retry *time.Timer
		var wait <-chan time.Time
		if err := s.sync(ctx); err != nil {
			if ctx.Err() != nil {
				return
			}
			s.log.Warn("caBundle not updated; retrying", "err", err.Error(), "in", backoff.String())
			retry = time.NewTimer(backoff)
			wait = retry.C
			backoff = min(2*backoff, caBundleRetryMax)
		} else {
			backoff = caBundleRetryMin
		}
		select {
		case <-ctx.Done():
		case <-s.kick:
		case <-wait:
		}
		if retry != nil {
			retry.Stop()
		}
		if ctx.Err() != nil {
			return
		}
	}
}

// sync sets the caBundle of every webhook of the configuration that does
// not have it yet.
func (s *caBundleSyncer) sync(ctx context.Context) error {
	bundle, err := readCABundle(s.caFile)
	if err != nil {
		return err
	}
	path := "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/" + url.PathEscape(s.name)
	body, err := s.call(ctx, http.MethodGet, path, "", nil)
	if err != nil {
		return err
	}
	var cfg struct {
		Webhooks []struct {
			Name         string `json:"name"`
			ClientConfig struct {
				CABundle []byte `json:"caBundle"`
			} `json:"clientConfig"`
		} `json:"webhooks"`
	}
	if err := json.Unmarshal(body, &cfg); err != nil {
		return fmt.Errorf("GET %s: %w", path, err)
	}
	type entry struct {
		Name         string            `json:"name"`
		ClientConfig map[string]string `json:"clientConfig"`
	}
	var patch []entry
	for _, w := range cfg.Webhooks {
		if !bytes.Equal(w.ClientConfig.CABundle, bundle) {
			patch = append(patch, entry{Name: w.Name, ClientConfig: map[string]string{
				"caBundle": base64.StdEncoding.EncodeToString(bundle)}})
		}
	}
	if len(patch) == 0 {
		s.log.Debug("caBundle up to date")
		return nil
	}
	// A strategic merge patch: webhooks merge by name.
	data, err := json.Marshal(map[string]any{"webhooks": patch})
	if err != nil {
		return err
	}
	if _, err := s.call(ctx, http.MethodPatch, path, "application/strategic-merge-patch+json", data); err != nil {
		return err
	}
	s.log.Info("caBundle updated", "webhooks", len(patch))
	return nil
}

// call sends one request with the service account's token (re-read each
// time: the kubelet rotates it).
func (s *caBundleSyncer) call(ctx context.Context, method, path, contentType string, body []byte) ([]byte, error) {
	token, err := os.ReadFile(s.tokenFile)
	if err != nil {
		return nil, fmt.Errorf("the service account token: %w", err)
	}
	var r io.Reader
	if body != nil {
		r = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, s.apiServer+path, r)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(token)))
	req.Header.Set("Accept", "application/json")
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := s.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", method, path, err)
	}
	if resp.StatusCode != http.StatusOK {
		var st struct {
			Message string `json:"message"`
		}
		_ = json.Unmarshal(data, &st)
		return nil, fmt.Errorf("%s %s: %s: %s", method, path, resp.Status, st.Message)
	}
	return data, nil
}

// readCABundle reads a PEM file of CA certificates.
func readCABundle(file string) ([]byte, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("--ca-bundle-file: %w", err)
	}
	if !x509.NewCertPool().AppendCertsFromPEM(data) {
		return nil, fmt.Errorf("--ca-bundle-file %s: no PEM certificate", file)
	}
	return data, nil
}
