package webhook

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"
)

// certReloader serves a TLS certificate and key from files and picks up new
// ones when the files change (a renewed cert-manager Secret, a rotated
// mounted Secret), with no restart: tls.Config.GetCertificate asks it on
// every handshake, and it re-reads the pair only when either file's
// identity, size or modification time changed since the last attempt. A
// pair that fails to load (a half-written rotation) is logged and the
// previous certificate stays in use until the files change again. Safe for
// concurrent use.
type certReloader struct {
	certFile, keyFile string
	log               *slog.Logger
	// onReload, if set, is called (without the lock) after a new pair was
	// loaded; it must not block.
	onReload func()

	mu       sync.Mutex // guards the fields below
	cert     *tls.Certificate
	certStat os.FileInfo // of the last load attempt
	keyStat  os.FileInfo
}

// newCertReloader loads the pair once; it fails when that fails.
func newCertReloader(certFile, keyFile string, log *slog.Logger) (*certReloader, error) {
	c := &certReloader{certFile: certFile, keyFile: keyFile, log: log}
	if err := c.reload(); err != nil {
		return nil, err
	}
	return c, nil
}

// GetCertificate is a tls.Config.GetCertificate.
func (c *certReloader) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	if err := c.reload(); err != nil {
		c.log.Warn("TLS certificate not reloaded; serving the previous one", "err", err.Error())
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cert, nil
}

// reload loads the pair when the files changed since the last attempt, and
// then calls onReload.
func (c *certReloader) reload() error {
	reloaded, err := c.load()
	if reloaded && c.onReload != nil {
		c.onReload()
	}
	return err
}

// load does reload's work under the lock; reloaded says whether a new pair
// replaced an earlier one.
func (c *certReloader) load() (reloaded bool, err error) {
	certStat, err := os.Stat(c.certFile)
	if err != nil {
		return false, fmt.Errorf("TLS certificate: %w", err)
	}
	keyStat, err := os.Stat(c.keyFile)
	if err != nil {
		return false, fmt.Errorf("TLS key: %w", err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if !changed(c.certStat, certStat) && !changed(c.keyStat, keyStat) {
		return false, nil
	}
	c.certStat, c.keyStat = certStat, keyStat
	cert, err := tls.LoadX509KeyPair(c.certFile, c.keyFile)
	if err != nil {
		return false, fmt.Errorf("loading the TLS key pair %s, %s: %w", c.certFile, c.keyFile, err)
	}
	leaf, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		return false, fmt.Errorf("parsing the TLS certificate %s: %w", c.certFile, err)
	}
	cert.Leaf = leaf
	first := c.cert == nil
	c.cert = &cert
	msg := "TLS certificate reloaded"
	if first {
		msg = "TLS certificate loaded"
	}
	c.log.Info(msg, "file", c.certFile, "subject", leaf.Subject.String(),
		"serial", leaf.SerialNumber.String(), "notAfter", leaf.NotAfter.UTC().Format(time.RFC3339))
	return !first, nil
}

// current is the certificate in use.
func (c *certReloader) current() *tls.Certificate {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cert
}

func changed(prev, cur os.FileInfo) bool {
	return prev == nil || !os.SameFile(prev, cur) || prev.Size() != cur.Size() || !prev.ModTime().Equal(cur.ModTime())
}
