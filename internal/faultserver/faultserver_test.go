package faultserver

import (
	"errors"
	"io"
	"net/http"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func get(t *testing.T, c *http.Client, s *Server) (int, error) {
	t.Helper()
	resp, err := c.Get("http://" + s.Addr() + "/")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	_, err = io.ReadAll(resp.Body)
	return resp.StatusCode, err
}

// Each fault does what it says, and every request is counted.
func TestFaults(t *testing.T) {
	s := New(t, Faults{})
	tr := &http.Transport{DisableKeepAlives: true}
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr, Timeout: 5 * time.Second}

	if code, err := get(t, c, s); code != 200 || err != nil {
		t.Fatalf("healthy: %d %v, want 200", code, err)
	}
	s.SetFaults(Faults{ErrorRatio: 1, ErrorStatus: 502})
	if code, err := get(t, c, s); code != 502 || err != nil {
		t.Fatalf("error ratio 1: %d %v, want 502", code, err)
	}
	s.SetFaults(Faults{ResetRatio: 1})
	if _, err := get(t, c, s); err == nil {
		t.Fatal("reset ratio 1: got a response, want a connection error")
	}
	s.SetFaults(Faults{CutBodyRatio: 1})
	if code, err := get(t, c, s); code != 200 || !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("cut body: %d %v, want 200 and an unexpected EOF in the body", code, err)
	}
	s.SetFaults(Faults{FailPath: "/"})
	if code, err := get(t, c, s); code != 503 || err != nil {
		t.Fatalf("failing path: %d %v, want 503", code, err)
	}
	s.SetFaults(Faults{})
	s.Refuse()
	if _, err := get(t, c, s); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("refusing: %v, want connection refused", err)
	}
	if err := s.Accept(); err != nil {
		t.Fatal(err)
	}
	if code, err := get(t, c, s); code != 200 || err != nil {
		t.Fatalf("accepting again: %d %v, want 200", code, err)
	}
	if s.Requests() != 6 || s.Failed() != 4 || s.RequestsWith("GET") != 6 {
		t.Fatalf("counted %d requests, %d failed, %d GETs; want 6, 4, 6", s.Requests(), s.Failed(), s.RequestsWith("GET"))
	}
}
