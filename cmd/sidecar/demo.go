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
	"sync/atomic"
	"time"

	"github.com/spf13/cobra"

	"github.com/sidecar-mesh/sidecar/pkg/config"
)

// demoUpstreams are the example instances of user-service that `sidecar
// demo` starts and routes to; the last one fails half its calls
// (flakyRun).
var demoUpstreams = []string{"127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"}

// flakyRun is how the demo's third instance fails half its calls: it
// answers flakyRun calls with 503, then flakyRun normally, and so on. Five
// failures in a row is what outlier detection ejects an instance for by
// default, so the demo shows retries (a GET that met a failure is sent to
// another instance), ejection, and the failures a retry cannot hide (a POST
// is not retried).
const flakyRun = 5

// newDemoCommand runs the sidecar with user-service's static endpoints at
// the three example upstreams it starts.
func newDemoCommand(stdout, stderr io.Writer, getenv func(string) string) *cobra.Command {
	o := newRunOptions(stdout, stderr, getenv)
	o.base = func() *config.Config {
		return &config.Config{Discovery: config.Discovery{Static: map[string][]string{"user-service": slices.Clone(demoUpstreams)}}}
	}
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Run the sidecar with three example upstreams of user-service (127.0.0.1:9001-9003)",
		Long: `Start three small example upstreams of the service "user-service" on
127.0.0.1:9001, :9002 and :9003, the third failing half its calls (five
answered 503 in a row, then five answered), run the sidecar with them as
user-service's static endpoints (no Consul), and print commands to try.
Takes the same flags as "run"; a --config file replaces the demo's
configuration.`,
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
				s, err := startExampleUpstream(addr, fmt.Sprintf("user-service-%d", i+1), i == len(demoUpstreams)-1, &serving)
				if err != nil {
					return err
				}
				servers = append(servers, s)
			}
			out, adm := o.cfg.Listeners.Outbound, o.cfg.Listeners.Admin
			fmt.Fprintf(stdout, `sidecar demo: user-service has three instances, on %[3]s;
the last one fails half its calls.
Try, from another terminal:

  curl -x http://%[1]s http://user-service/users/1        # as an HTTP proxy
  curl -H 'Host: user-service' http://%[1]s/users/1       # by Host header (run it again: round robin)
  curl -N -H 'Host: user-service' http://%[1]s/stream     # a streamed response
  curl -i -H 'Host: nope' http://%[1]s/                   # 503 unknown_service
  curl -s -X POST -H 'Host: user-service' 'http://%[1]s/users?n=[1-30]' -w '%%{http_code} ' -o /dev/null
                                                          # 30 calls: a POST is not retried
  sidecar why user-service --admin %[2]s                  # why those calls failed, attempt by attempt
  sidecar tap --admin %[2]s                               # every request live, as it finishes
  open http://%[2]s/                                      # the status page: ejections, breakers, failures

Ctrl-C stops it.
`, out, adm, strings.Join(demoUpstreams, ", "))
			return o.run(cmd.Context())
		},
	}
	o.addFlags(cmd.Flags())
	return cmd
}

// startExampleUpstream serves a tiny JSON API that says which instance
// answered, until the server is closed; serving is done when it stopped.
// A flaky one answers half its calls with 503, flakyRun in a row.
func startExampleUpstream(addr, name string, flaky bool, serving *sync.WaitGroup) (*http.Server, error) {
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
	var calls atomic.Int64
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if n := calls.Add(1) - 1; flaky && n/flakyRun%2 == 0 {
			http.Error(w, name+": failing on purpose (half of this instance's calls)", http.StatusServiceUnavailable)
			return
		}
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
