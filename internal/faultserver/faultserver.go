// Package faultserver is a real HTTP/1.1 upstream on a loopback port that
// fails on purpose: error statuses at a ratio or on one path, latency,
// connection resets, bodies cut short, refused connections. Tests put it
// behind the sidecar and count what it executed.
package faultserver

import (
	"cmp"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Faults says how the server misbehaves. The ratios are independent draws
// per request, checked in the order Reset, CutBody, Error; whatever is left
// is answered 200 with Body. A request to FailPath fails before any draw.
// The zero value is a healthy server.
type Faults struct {
	// Latency delays every answer (the client's cancellation ends it).
	Latency time.Duration
	// Workers, when set, is how many requests the server works on at once,
	// each for Latency: the others wait for a worker, first come first
	// served, and are worked on even when their client went away
	// meanwhile, as a thread pool serves its queue. It gives the server a
	// capacity, Workers/Latency requests per second, past which its
	// latency grows with its queue. 0: no limit.
	Workers int
	// StallRatio of requests wait Stall more before they are answered (the
	// client's cancellation ends the wait): a pause, as a garbage
	// collection or a slow disk makes one.
	StallRatio float64
	Stall      time.Duration
	// ResetRatio of requests get a TCP reset and no response.
	ResetRatio float64
	// CutBodyRatio of requests get a 200 whose body stops halfway and the
	// connection closed.
	CutBodyRatio float64
	// ErrorRatio of requests are answered ErrorStatus (default 503).
	ErrorRatio  float64
	ErrorStatus int
	// FailPath, when set, is a path every request to which is answered
	// ErrorStatus: a broken path among healthy ones.
	FailPath string
	// RetryAfter, when set, goes with error answers.
	RetryAfter string
	// Body of a good answer; default "ok".
	Body string
}

// Server is the faulty upstream. Safe for concurrent use.
type Server struct {
	addr string

	mu      sync.Mutex // guards faults, ln, srv, stop, workers
	faults  Faults
	ln      net.Listener
	srv     *http.Server
	stop    chan struct{} // closed when srv stops: requests waiting for a worker give up
	workers chan struct{} // one token per busy worker; cap Faults.Workers
	served  sync.WaitGroup

	requests    atomic.Int64
	inFlight    atomic.Int64
	failed      atomic.Int64
	connections atomic.Int64
	stalls      atomic.Int64 // requests stalled (Faults.StallRatio)
	// stallsServed are the stalled requests whose client waited the
	// stall out.
	stallsServed atomic.Int64
	byMethod     sync.Map // method -> *atomic.Int64
	arrivals     atomic.Pointer[func(*http.Request)]
}

// Start starts a server with faults on a free loopback port; Close stops it.
func Start(f Faults) (*Server, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	s := &Server{addr: ln.Addr().String(), faults: f}
	s.serve(ln)
	return s, nil
}

// New starts a server for a test and closes it when the test ends.
func New(t testing.TB, f Faults) *Server {
	t.Helper()
	s, err := Start(f)
	if err != nil {
		t.Fatalf("faultserver: %v", err)
	}
	t.Cleanup(s.Close)
	return s
}

// Addr is the server's host:port; it stays the same across Refuse/Accept.
func (s *Server) Addr() string { return s.addr }

// SetFaults changes the faults for requests from now on.
func (s *Server) SetFaults(f Faults) {
	s.mu.Lock()
	s.faults = f
	s.mu.Unlock()
}

// OnRequest sets a function called with every request as it arrives,
// before any fault (nil: none).
func (s *Server) OnRequest(fn func(*http.Request)) {
	if fn == nil {
		s.arrivals.Store(nil)
		return
	}
	s.arrivals.Store(&fn)
}

// Requests is how many requests reached the handler (executions).
func (s *Server) Requests() int64 { return s.requests.Load() }

// Stalls returns how many requests were stalled (Faults.StallRatio), and
// how many of them were answered after the whole stall rather than given up
// by their client.
func (s *Server) Stalls() (stalled, served int64) { return s.stalls.Load(), s.stallsServed.Load() }

// InFlight is how many requests are in the handler now.
func (s *Server) InFlight() int64 { return s.inFlight.Load() }

// Failed is how many requests were answered with a fault.
func (s *Server) Failed() int64 { return s.failed.Load() }

// Connections is how many connections were accepted.
func (s *Server) Connections() int64 { return s.connections.Load() }

// RequestsWith is how many requests with method reached the handler.
func (s *Server) RequestsWith(method string) int64 {
	if n, ok := s.byMethod.Load(method); ok {
		return n.(*atomic.Int64).Load()
	}
	return 0
}

// Refuse stops listening and closes open connections: new connections are
// refused (the port is closed) until Accept.
func (s *Server) Refuse() {
	s.mu.Lock()
	srv := s.srv
	s.srv, s.ln = nil, nil
	if srv != nil {
		close(s.stop)
	}
	s.mu.Unlock()
	if srv != nil {
		_ = srv.Close()
		s.served.Wait()
	}
}

// Accept listens again on the same address after Refuse.
func (s *Server) Accept() error {
	ln, err := net.Listen("tcp", s.addr)
	if err != nil {
		return err
	}
	s.serve(ln)
	return nil
}

// Close stops the server.
func (s *Server) Close() { s.Refuse() }

func (s *Server) serve(ln net.Listener) {
	srv := &http.Server{
		Handler:           http.HandlerFunc(s.handle),
		ReadHeaderTimeout: 10 * time.Second,
		ConnState: func(_ net.Conn, st http.ConnState) {
			if st == http.StateNew {
				s.connections.Add(1)
			}
		},
	}
	s.mu.Lock()
	s.ln, s.srv, s.stop = ln, srv, make(chan struct{})
	s.mu.Unlock()
	s.served.Add(1)
	go func() {
		defer s.served.Done()
		_ = srv.Serve(ln)
	}()
}

func (s *Server) handle(w http.ResponseWriter, r *http.Request) {
	s.requests.Add(1)
	s.inFlight.Add(1)
	defer s.inFlight.Add(-1)
	n, _ := s.byMethod.LoadOrStore(r.Method, new(atomic.Int64))
	n.(*atomic.Int64).Add(1)
	if fn := s.arrivals.Load(); fn != nil {
		(*fn)(r)
	}
	s.mu.Lock()
	f, stop := s.faults, s.stop
	if f.Workers > 0 && cap(s.workers) != f.Workers {
		s.workers = make(chan struct{}, f.Workers)
	}
	workers := s.workers
	s.mu.Unlock()
	_, _ = io.Copy(io.Discard, r.Body)

	if f.Workers > 0 {
		if !work(workers, f.Latency, stop) {
			return
		}
	} else if f.Latency > 0 {
		t := time.NewTimer(f.Latency)
		select {
		case <-t.C:
		case <-r.Context().Done():
			t.Stop()
			return
		}
	}
	if draw(f.StallRatio) {
		s.stalls.Add(1)
		t := time.NewTimer(f.Stall)
		select {
		case <-t.C:
			s.stallsServed.Add(1)
		case <-r.Context().Done():
			t.Stop()
			return
		}
	}
	switch {
	case f.FailPath != "" && r.URL.Path == f.FailPath:
		s.failed.Add(1)
		w.WriteHeader(cmp.Or(f.ErrorStatus, http.StatusServiceUnavailable))
	case draw(f.ResetRatio):
		s.failed.Add(1)
		reset(w)
	case draw(f.CutBodyRatio):
		s.failed.Add(1)
		cutBody(w)
	case draw(f.ErrorRatio):
		s.failed.Add(1)
		status := f.ErrorStatus
		if status == 0 {
			status = http.StatusServiceUnavailable
		}
		if f.RetryAfter != "" {
			w.Header().Set("Retry-After", f.RetryAfter)
		}
		w.WriteHeader(status)
	default:
		body := f.Body
		if body == "" {
			body = "ok"
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		_, _ = io.WriteString(w, body)
	}
}

func draw(ratio float64) bool { return ratio > 0 && rand.Float64() < ratio }

// work waits for a worker and holds it for d, whatever the client does;
// false if the server stopped first.
func work(workers chan struct{}, d time.Duration, stop <-chan struct{}) bool {
	select {
	case workers <- struct{}{}:
	case <-stop:
		return false
	}
	defer func() { <-workers }()
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-stop:
		return false
	}
}

// reset closes the connection with a TCP RST (SO_LINGER 0) before any byte
// of a response.
func reset(w http.ResponseWriter) {
	c, _, err := http.NewResponseController(w).Hijack()
	if err != nil {
		panic(err)
	}
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	_ = c.Close()
}

// cutBody promises 1000 bytes, sends 10 and closes the connection.
func cutBody(w http.ResponseWriter) {
	c, bw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		panic(err)
	}
	_, _ = bw.WriteString("HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
	_ = bw.Flush()
	_ = c.Close()
}
