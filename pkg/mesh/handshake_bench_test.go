package mesh_test

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/sidecar-mesh/sidecar/internal/consultest"
	"github.com/sidecar-mesh/sidecar/internal/logtest"
	"github.com/sidecar-mesh/sidecar/pkg/discovery"
	"github.com/sidecar-mesh/sidecar/pkg/mesh"
)

// BenchmarkHandshake is what a new mesh connection costs: web dials api
// over loopback TCP with ClientTLS, api accepts with ServerTLS (both
// identities from a real agent, P-256 leaves of Consul's built-in CA), and
// one byte goes there and back, which in TLS 1.3 is also when the client
// takes the session ticket. full: every handshake is a full one (no session
// cache); resumed: every handshake resumes web's session with api. Each
// op is one connection, both sides on this machine's cores; the difference
// between the two is what resumption saves, and a pooled connection pays
// it once. A resumed TLS 1.3 handshake still makes a key exchange (Go's
// default key share, X25519MLKEM768), and on both sides VerifyConnection
// verifies the peer's chain again, so it saves less than a TLS 1.2 one.
func BenchmarkHandshake(b *testing.B) {
	a := consultest.Start(b)
	cfg := api.DefaultConfig()
	cfg.Address = a.Addr()
	c, err := api.NewClient(cfg)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(cfg.Transport.CloseIdleConnections)
	web := benchIdentity(b, c, "web")
	addr := echoTLS(b, benchIdentity(b, c, "api").ServerTLS())

	for _, v := range []uint16{tls.VersionTLS13, tls.VersionTLS12} {
		for _, resumed := range []bool{false, true} {
			name := tls.VersionName(v) + "/full"
			if resumed {
				name = tls.VersionName(v) + "/resumed"
			}
			b.Run(name, func(b *testing.B) {
				cc := web.ClientTLS("api")
				cc.MinVersion, cc.MaxVersion = v, v
				if !resumed {
					cc.ClientSessionCache = nil
				}
				// A first connection leaves a session to resume.
				if _, err := handshakeOnce(addr, cc); err != nil {
					b.Fatalf("web dials api (%s): %v", name, err)
				}
				for b.Loop() {
					did, err := handshakeOnce(addr, cc)
					if err != nil {
						b.Fatalf("web dials api (%s): %v", name, err)
					}
					if did != resumed {
						b.Fatalf("web dials api (%s): resumed %v, want %v", name, did, resumed)
					}
				}
			})
		}
	}
}

// handshakeOnce dials addr with cfg, makes the handshake and a one-byte
// round trip, closes the connection and says whether the session resumed.
func handshakeOnce(addr string, cfg *tls.Config) (bool, error) {
	raw, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return false, err
	}
	conn := tls.Client(raw, cfg)
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	if err := conn.Handshake(); err != nil {
		return false, err
	}
	var buf [1]byte
	if _, err := conn.Write([]byte{'x'}); err != nil {
		return false, err
	}
	if _, err := io.ReadFull(conn, buf[:]); err != nil {
		return false, err
	}
	return conn.ConnectionState().DidResume, nil
}

// benchIdentity runs the identity of service until b ends, and waits
// until it holds a leaf and roots.
func benchIdentity(b *testing.B, c *api.Client, service string) *mesh.Identity {
	b.Helper()
	log, _ := logtest.New()
	id, err := mesh.NewIdentity(discovery.NewMeshAgent(c), service, log)
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		id.Run(ctx)
	}()
	b.Cleanup(func() {
		cancel()
		<-done
	})
	wctx, wcancel := context.WithTimeout(ctx, 10*time.Second)
	defer wcancel()
	if err := id.WaitReady(wctx); err != nil {
		b.Fatalf("identity of %s: %v (status %+v)", service, err, id.Status())
	}
	return id
}

// echoTLS accepts TLS connections with cfg on loopback and echoes what
// each sends, until b ends; it returns the address.
func echoTLS(b *testing.B, cfg *tls.Config) string {
	b.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex // guards conns
		conns = map[net.Conn]bool{}
	)
	wg.Go(func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns[conn] = true
			mu.Unlock()
			wg.Go(func() {
				defer func() {
					conn.Close()
					mu.Lock()
					delete(conns, conn)
					mu.Unlock()
				}()
				_ = conn.SetDeadline(time.Now().Add(time.Minute))
				tc := tls.Server(conn, cfg)
				_, _ = io.Copy(tc, tc)
			})
		}
	})
	b.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for conn := range conns {
			conn.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return ln.Addr().String()
}
