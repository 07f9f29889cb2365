package inbound_test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"testing"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/downstream"
	"github.com/sidecar-mesh/sidecar/pkg/inbound"
)

// The request body's progress timeout holds on the sidecar's own request
// path as configured by default (tracing off: the Observer hands the
// request on as it is): a body that stops is answered 408 once the
// timeout passes, and one that keeps coming, however slowly, reaches the
// app whole.
func TestBodyProgressTimeoutWithoutTracing(t *testing.T) {
	app := startApp(t, func(w http.ResponseWriter, r *http.Request) {
		b, err := io.ReadAll(r.Body)
		if err != nil {
			return
		}
		io.WriteString(w, strconv.Itoa(len(b)))
	})
	limits := downstream.Limits{BodyReadTimeout: 300 * time.Millisecond}
	for name, obs := range map[string]inbound.Observer{
		"no observer": nil,
		"tracing off": inbound.NewTelemetry(nil, nil, nil, "app"),
	} {
		t.Run(name, func(t *testing.T) {
			_, addr := startInbound(t, inbound.Config{AppAddr: app.addr(), Observer: obs, Limits: limits})
			send := func(pieces int, gap time.Duration) (int, string, time.Duration) {
				c, err := net.Dial("tcp", addr)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(10 * time.Second))
				start := time.Now()
				fmt.Fprintf(c, "POST / HTTP/1.1\r\nHost: app\r\nContent-Length: 10\r\n\r\n")
				for i := 0; i < pieces; i++ {
					time.Sleep(gap)
					if _, err := io.WriteString(c, "x"); err != nil {
						break
					}
				}
				resp, err := http.ReadResponse(bufio.NewReader(c), nil)
				if err != nil {
					return 0, err.Error(), time.Since(start)
				}
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				return resp.StatusCode, string(b), time.Since(start)
			}
			// Ten bytes, one every 100 ms: each wait is under the timeout.
			if code, body, _ := send(10, 100*time.Millisecond); code != 200 || body != "10" {
				t.Errorf("a slow body that keeps coming: %d %q, want 200 and all 10 bytes at the app", code, body)
			}
			// Three bytes, then nothing.
			if code, body, took := send(3, 20*time.Millisecond); code != http.StatusRequestTimeout {
				t.Errorf("a body that stops: %d %q after %v, want 408 (the timeout is 300 ms)", code, body, took)
			}
		})
	}
}
