package webhook

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/inject"
)

// newHandler answers:
//
//	POST /inject   AdmissionReview v1 -> AdmissionReview v1 (JSON Patch)
//	GET  /healthz  200 "ok"
//
// Reviews wait for their share of budget (their size) before they are read;
// one that waits until its caller gives up is answered 503.
func newHandler(in *inject.Injector, log *slog.Logger, budget *reviewBudget) http.Handler {
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
		if size < 0 || size > maxBody {
			size = maxBody
		}
		release, err := budget.acquire(r.Context(), size)
		if err != nil {
			http.Error(w, "busy with other reviews", http.StatusServiceUnavailable)
			return
		}
		defer release()
		// A body that trickles in is cut off (ErrNotSupported only outside
		// a server, in tests).
		_ = http.NewResponseController(w).SetReadDeadline(time.Now().Add(bodyTimeout))
		body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
		if err != nil {
			var tooBig *http.MaxBytesError
			if errors.As(err, &tooBig) {
				http.Error(w, fmt.Sprintf("AdmissionReview larger than %d bytes", tooBig.Limit), http.StatusRequestEntityTooLarge)
				return
			}
			if errors.Is(err, os.ErrDeadlineExceeded) {
				http.Error(w, fmt.Sprintf("AdmissionReview not read within %v", bodyTimeout), http.StatusRequestTimeout)
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
