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
// A review's body is charged to the budget as it arrives (readBody); one
// that waits for room until its caller gives up is answered 503.
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
		// A body that trickles in is cut off (ErrNotSupported only outside
		// a server, in tests).
		_ = http.NewResponseController(w).SetReadDeadline(time.Now().Add(bodyTimeout))
		charge := budget.charge()
		defer charge.release()
		body, err := readBody(r.Context(), http.MaxBytesReader(w, r.Body, maxBody), r.ContentLength, charge)
		if err != nil {
			var tooBig *http.MaxBytesError
			switch {
			case errors.As(err, &tooBig):
				http.Error(w, fmt.Sprintf("AdmissionReview larger than %d bytes", tooBig.Limit), http.StatusRequestEntityTooLarge)
			case errors.Is(err, os.ErrDeadlineExceeded):
				http.Error(w, fmt.Sprintf("AdmissionReview not read within %v", bodyTimeout), http.StatusRequestTimeout)
			case errors.Is(err, errNoBudget):
				http.Error(w, "busy with other reviews", http.StatusServiceUnavailable)
			default:
				http.Error(w, "reading the request: "+err.Error(), http.StatusBadRequest)
			}
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

// readBody reads r, a body of declared length size (-1: unknown) and at
// most maxBody bytes, into a buffer that grows as bytes arrive, each growth
// charged to c before it is made: a body holds about what it has sent
// (at most twice), never what it declares. A wait for room ends with ctx,
// as errNoBudget.
func readBody(ctx context.Context, r io.Reader, size int64, c *charge) ([]byte, error) {
	limit := int64(maxBody)
	if size >= 0 && size < limit {
		limit = size
	}
	var buf []byte
	for {
		if len(buf) == cap(buf) {
			if int64(cap(buf)) >= limit {
				// As long as declared: read on to see the end, or an
				// excess that MaxBytesReader refuses.
				var one [1]byte
				n, err := r.Read(one[:])
				if n > 0 {
					return nil, fmt.Errorf("body longer than its Content-Length %d", size)
				}
				if err == io.EOF {
					return buf, nil
				}
				if err != nil {
					return nil, err
				}
				continue
			}
			grow := min(max(2*int64(cap(buf)), firstRead), limit) - int64(cap(buf))
			if err := c.grow(ctx, grow); err != nil {
				return nil, err
			}
			buf = append(make([]byte, 0, int64(cap(buf))+grow), buf...)
		}
		n, err := r.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if err == io.EOF {
			return buf, nil
		}
		if err != nil {
			return nil, err
		}
	}
}

// firstRead is the size of a body's buffer before its first byte.
const firstRead = 512

var errNoBudget = errors.New("no room in the review budget")

// reviewBudget bounds the bytes of the AdmissionReviews being read and
// worked on at once. Each review costs memory in proportion to its pod, so
// a burst of large pods takes turns instead of taking the webhook past its
// memory limit (a restart would let the API server create pods without
// the sidecar); pods of ordinary size never wait.
//
// A review is charged as its body arrives (readBody), not for the length
// it declares: a connection trickling its body in holds what it has sent,
// so any number of them leave the budget to the API server, which sends a
// review (at most 3 MiB) at once. Reserving the declared length up front
// let 32 connections of one address, each declaring 4 MiB and sending a
// byte a second, take turns holding all of it; capping what one address
// may reserve can't go below an honest review, so two addresses would do;
// and a first-come-first-served queue would still serve them first.
//
// Charging by parts could deadlock: two large reviews each holding half
// and waiting for the rest. So when there is no room, one charge at a time
// may go past the budget, by at most one body (maxBody), and keeps that
// overdraft until the budget is under its size again: memory stays under
// size+maxBody, and a review waits only for those that are running.
// Safe for concurrent use.
type reviewBudget struct {
	size int64

	mu    sync.Mutex // guards the fields below
	used  int64
	peak  int64         // the most used at once (for tests)
	over  *charge       // the charge allowed past size, or nil
	freed chan struct{} // closed (and replaced) whenever bytes are released
}

func newReviewBudget(size int64) *reviewBudget {
	return &reviewBudget{size: size, freed: make(chan struct{})}
}

// charge is one review's share of a reviewBudget, empty at first. Not safe
// for concurrent use.
type charge struct {
	b *reviewBudget
	n int64
}

func (b *reviewBudget) charge() *charge { return &charge{b: b} }

// grow adds n bytes to the charge, waiting for room until ctx ends.
func (c *charge) grow(ctx context.Context, n int64) error {
	b := c.b
	for {
		b.mu.Lock()
		if b.used+n > b.size && b.over == nil {
			b.over = c
		}
		if b.used+n <= b.size || b.over == c {
			b.used += n
			c.n += n
			b.peak = max(b.peak, b.used)
			b.mu.Unlock()
			return nil
		}
		freed := b.freed
		b.mu.Unlock()
		select {
		case <-freed:
		case <-ctx.Done():
			return fmt.Errorf("%w: %w", errNoBudget, ctx.Err())
		}
	}
}

// release gives the charge's bytes back; it may be called again.
func (c *charge) release() {
	b := c.b
	b.mu.Lock()
	defer b.mu.Unlock()
	b.used -= c.n
	c.n = 0
	if b.over == c || b.used <= b.size {
		b.over = nil
	}
	close(b.freed)
	b.freed = make(chan struct{})
}

// maxUsed is the most the budget has had charged at once.
func (b *reviewBudget) maxUsed() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.peak
}
