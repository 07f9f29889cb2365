// Package filewatch follows the content of one file, however it is
// replaced: written in place, renamed over (write a temporary file, then
// rename it), or swapped through symlinks as Kubernetes updates a mounted
// ConfigMap (the file links to ..data/FILE and ..data is re-pointed).
//
// It watches the file's directory with fsnotify, so that every way of
// replacing the file is seen, and checks the file on a timer as well, in
// case an event is lost (a file behind a symlink to another directory, a
// directory removed and made again, a file system without notifications).
// Content is compared by SHA-256: only a real change is reported.
package filewatch

import (
	"context"
	"crypto/sha256"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/fsnotify/fsnotify"

	"github.com/sidecar-mesh/sidecar/pkg/panics"
	"github.com/sidecar-mesh/sidecar/pkg/readlimit"
)

// Config says what to watch. Zero durations take the defaults named.
type Config struct {
	// Path is the file. Its directory must exist when the watch starts.
	Path string
	// Initial is the content already in use: only content that differs
	// from it is reported.
	Initial []byte
	// Debounce is the quiet time after the last event of a burst before the
	// file is read, so a writer's steps are read once, at the end. Default
	// 100ms; the read never waits more than 10 × Debounce after the first
	// event.
	Debounce time.Duration
	// Interval is the period of the safety check (a stat, and a read if it
	// changed). Default 2s.
	Interval time.Duration
	// Logger receives state transitions (file gone, back, unreadable);
	// nil discards them.
	Logger *slog.Logger
}

// Watcher follows one file. Close stops it.
type Watcher struct {
	cfg      Config
	dir      string
	log      *slog.Logger
	fsw      *fsnotify.Watcher
	onChange func([]byte)

	cancel context.CancelFunc
	done   chan struct{}

	// Owned by the watcher's goroutine:
	last      [sha256.Size]byte // content last reported (or Initial)
	stat      os.FileInfo       // as of the last check; nil if unreadable
	failing   bool              // the last read failed
	emptyOnce bool              // the last read was empty and not yet believed
	watching  bool              // fsnotify watches dir
}

// Start begins following cfg.Path. onChange is called from the watcher's
// own goroutine, one call at a time, with the file's whole content each
// time it differs from what was reported before (or from cfg.Initial); it
// should not block for long. A file that is removed or unreadable is
// logged and not reported: whoever uses it keeps the last content. So is a
// file larger than readlimit.Max, which is never read past that.
func Start(cfg Config, onChange func(data []byte)) (*Watcher, error) {
	if cfg.Path == "" {
		return nil, errors.New("filewatch: a path is required")
	}
	if cfg.Debounce <= 0 {
		cfg.Debounce = 100 * time.Millisecond
	}
	if cfg.Interval <= 0 {
		cfg.Interval = 2 * time.Second
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	fsw, err := fsnotify.NewWatcher()
	if err != nil {
		return nil, err
	}
	w := &Watcher{
		cfg:      cfg,
		dir:      filepath.Dir(cfg.Path),
		log:      log.With("component", "filewatch", "path", cfg.Path),
		fsw:      fsw,
		onChange: onChange,
		last:     sha256.Sum256(cfg.Initial),
		done:     make(chan struct{}),
	}
	if err := fsw.Add(w.dir); err != nil {
		_ = fsw.Close()
		return nil, err
	}
	w.watching = true
	var ctx context.Context
	ctx, w.cancel = context.WithCancel(context.Background())
	go func() {
		defer close(w.done)
		defer w.fsw.Close()
		panics.Run(ctx, "filewatch", w.run)
	}()
	return w, nil
}

// Close stops the watcher and waits for its goroutine; onChange is not
// called after Close returns.
func (w *Watcher) Close() {
	w.cancel()
	<-w.done
}

func (w *Watcher) run(ctx context.Context) {
	tick := time.NewTicker(w.cfg.Interval)
	defer tick.Stop()
	quiet := time.NewTimer(time.Hour)
	quiet.Stop()
	defer quiet.Stop()
	var burstStart time.Time // zero: no burst pending

	// Whatever happened between reading Initial and the watch starting.
	w.check()
	for {
		select {
		case <-ctx.Done():
			return
		case ev, ok := <-w.fsw.Events:
			if !ok {
				return
			}
			if ev.Name == w.dir && ev.Has(fsnotify.Remove|fsnotify.Rename) {
				w.watching = false // the timer re-adds it once the directory is back
			}
			// Any event in the directory may concern the file: under a
			// ConfigMap mount only ..data's symlink moves.
			now := time.Now()
			if burstStart.IsZero() {
				burstStart = now
			}
			quiet.Reset(min(w.cfg.Debounce, burstStart.Add(10*w.cfg.Debounce).Sub(now)))
		case err, ok := <-w.fsw.Errors:
			if !ok {
				return
			}
			// An overflowed event queue loses events: read the file anyway.
			w.log.Warn("file notifications failed; checking the file", "err", err.Error())
			w.check()
		case <-quiet.C:
			burstStart = time.Time{}
			if w.check() {
				burstStart = time.Now()
				quiet.Reset(w.cfg.Debounce)
			}
		case <-tick.C:
			if !w.watching && w.fsw.Add(w.dir) == nil {
				w.watching = true
			}
			if w.statChanged() && burstStart.IsZero() {
				// Read after the quiet time, as for an event: the file may
				// be in the middle of a write.
				burstStart = time.Now()
				quiet.Reset(w.cfg.Debounce)
			}
		}
	}
}

// statChanged reports whether the file looks different from the last check:
// another file, size or modification time, or gone or back.
func (w *Watcher) statChanged() bool {
	fi, err := os.Stat(w.cfg.Path)
	switch {
	case err != nil:
		return !w.failing
	case w.stat == nil:
		return true
	}
	return !os.SameFile(fi, w.stat) || fi.Size() != w.stat.Size() || !fi.ModTime().Equal(w.stat.ModTime())
}

// check reads the file and reports it if its content changed. It returns
// true when it wants to read again after the quiet time: an empty read of
// a file that had content is most often a write caught between its
// truncation and its data, so it is reported only when the next read
// agrees.
func (w *Watcher) check() (again bool) {
	fi, _ := os.Stat(w.cfg.Path)
	data, err := readlimit.ReadFile(w.cfg.Path)
	if err != nil {
		w.stat = nil
		if !w.failing {
			w.failing = true
			w.log.Warn("file unreadable; keeping its last content", "err", err.Error())
		}
		return
	}
	w.stat = fi
	if w.failing {
		w.failing = false
		w.log.Info("file readable again")
	}
	sum := sha256.Sum256(data)
	if sum == w.last {
		w.emptyOnce = false
		return false
	}
	if len(data) == 0 && !w.emptyOnce {
		w.emptyOnce = true
		return true
	}
	w.emptyOnce = false
	w.last = sum
	w.onChange(data)
	return false
}
