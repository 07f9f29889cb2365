package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"

	"github.com/sidecar-mesh/sidecar/pkg/config"
)

// demoUpstreams are the example instances of user-service that `sidecar
// demo` starts and routes to.
var demoUpstreams = []string{"127.0.0.1:9001", "127.0.0.1:9002"}

// newDemoCommand runs the sidecar with user-service's static endpoints at
// the two example upstreams it starts.
func newDemoCommand(stdout, stderr io.Writer, getenv func(string) string) *cobra.Command {
	o := newRunOptions(stdout, stderr, getenv)
	o.base = func() *config.Config {
		return &config.Config{Discovery: config.Discovery{Static: map[string][]string{"user-service": slices.Clone(demoUpstreams)}}}
	}
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Run the sidecar with two example upstreams of user-service (127.0.0.1:9001, :9002)",
		Long: `Start two small example upstreams of the service "user-service" on 127.0.0.1:9001
and 127.0.0.1:9002, run the sidecar with them as user-service's static
endpoints (no Consul), and print commands to try. Takes the same flags as
"run"; a --config file replaces the demo's configuration.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := o.complete(); err != nil {
				return err
			}
			if err := o.validate(); err != nil {
				return err
			}
			var servers []*http.Server
			var serving sync.WaitGroup
			defer func() {
				for _, s := range servers {
					_ = s.Close()
				}
				serving.Wait()
			}()
			for i, addr := range demoUpstreams {
				s, err := startExampleUpstream(addr, fmt.Sprintf("user-service-%d", i+1), &serving)
				if err != nil {
					return err
				}
				servers = append(servers, s)
			}
			out, adm := o.cfg.Listeners.Outbound, o.cfg.Listeners.Admin
			fmt.Fprintf(stdout, `sidecar demo: user-service has two instances, on %[3]s.
Try, from another terminal:

  curl -x http://%[1]s http://user-service/users/1        # as an HTTP proxy
  curl -H 'Host: user-service' http://%[1]s/users/1       # by Host header (run it twice: round robin)
  curl -N -H 'Host: user-service' http://%[1]s/stream     # a streamed response
  curl -i -H 'Host: nope' http://%[1]s/                   # 503 unknown_service
  curl http://%[2]s/endpoints                             # admin API

Ctrl-C stops it.
`, out, adm, strings.Join(demoUpstreams, " and "))
			return o.run(cmd.Context())
		},
	}
	o.addFlags(cmd.Flags())
	return cmd
}

// startExampleUpstream serves a tiny JSON API that says which instance
// answered, until the server is closed; serving is done when it stopped.
func startExampleUpstream(addr, name string, serving *sync.WaitGroup) (*http.Server, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("example upstream %s: %w", name, err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/stream", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		rc := http.NewResponseController(w)
		for i := range 5 {
			fmt.Fprintf(w, "%s: event %d\n", name, i+1)
			_ = rc.Flush()
			select {
			case <-r.Context().Done():
				return
			case <-time.After(300 * time.Millisecond):
			}
		}
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{
			"instance": name, "method": r.Method, "path": r.URL.Path, "host": r.Host,
			"forwardedFor": r.Header.Get("X-Forwarded-For"),
		})
	})
	s := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	serving.Go(func() { _ = s.Serve(ln) })
	return s, nil
}
