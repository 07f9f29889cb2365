// Command faultorigin is internal/faultserver as a process of its own: a
// real upstream that fails on purpose, for the fault suite to kill, spike
// and count from outside.
//
//	faultorigin -error-ratio 0.5 -latency 20ms
//
// It serves on a free loopback port and a control port, and prints both on
// its first line of output: "listening 127.0.0.1:PORT control 127.0.0.1:PORT".
// The control port answers GET /stats with {"requests":N,"inFlight":N,
// "failed":N,"connections":N} and takes PUT /faults with a faultserver.Faults in JSON
// (durations in nanoseconds). SIGTERM stops it.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/sidecar-mesh/sidecar/internal/faultserver"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "faultorigin:", err)
		os.Exit(1)
	}
}

func run() error {
	var f faultserver.Faults
	flag.Float64Var(&f.ErrorRatio, "error-ratio", 0, "share of requests answered -error-status")
	flag.IntVar(&f.ErrorStatus, "error-status", 503, "status of the error answers")
	flag.Float64Var(&f.ResetRatio, "reset-ratio", 0, "share of requests answered with a TCP reset")
	flag.DurationVar(&f.Latency, "latency", 0, "delay before every answer")
	flag.StringVar(&f.Body, "body", "", `body of a good answer (default "ok")`)
	flag.Parse()

	srv, err := faultserver.Start(f)
	if err != nil {
		return err
	}
	defer srv.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /stats", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]int64{"requests": srv.Requests(), "inFlight": srv.InFlight(),
			"failed": srv.Failed(), "connections": srv.Connections()})
	})
	mux.HandleFunc("PUT /faults", func(w http.ResponseWriter, r *http.Request) {
		var nf faultserver.Faults
		if err := json.NewDecoder(r.Body).Decode(&nf); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		srv.SetFaults(nf)
	})
	control := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	served := make(chan struct{}) // closed once Serve returned, after Shutdown
	go func() { defer close(served); _ = control.Serve(ln) }()
	fmt.Printf("listening %s control %s\n", srv.Addr(), ln.Addr())

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	<-ctx.Done()
	shutdown, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	err = control.Shutdown(shutdown)
	<-served
	return err
}
