// Temporary prototype (to be deleted): own HTTP/1.1 loop vs net/http in front of proxyhttp.Transport.
package main

import (
	"bufio"
	"bytes"
	"flag"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"

	"github.com/sidecar-mesh/sidecar/pkg/proxyhttp"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:28301", "")
	up := flag.String("up", "127.0.0.1:28080", "")
	mode := flag.String("mode", "own", "own|nethttp")
	flag.Parse()
	tr := proxyhttp.NewTransport(proxyhttp.TransportConfig{})
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		out := r.Clone(r.Context())
		out.URL.Scheme, out.URL.Host = "http", *up
		out.RequestURI = ""
		resp, err := tr.RoundTrip(out)
		if err != nil {
			w.WriteHeader(502)
			return
		}
		for k, v := range resp.Header {
			w.Header()[k] = v
		}
		w.WriteHeader(resp.StatusCode)
		io.Copy(w, resp.Body)
		resp.Body.Close()
	})
	ln, _ := net.Listen("tcp", *addr)
	if *mode == "nethttp" {
		http.Serve(ln, h)
		return
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go serve(c, h)
	}
}

type rw struct {
	h      http.Header
	bw     *bufio.Writer
	status int
	buf    []byte
}

func (w *rw) Header() http.Header         { return w.h }
func (w *rw) WriteHeader(s int)           { w.status = s }
func (w *rw) Write(p []byte) (int, error) { w.buf = append(w.buf, p...); return len(p), nil }

func serve(c net.Conn, h http.Handler) {
	br := bufio.NewReaderSize(c, 4096)
	bw := bufio.NewWriterSize(c, 4096)
	w := &rw{bw: bw}
	for {
		line, err := br.ReadSlice('\n')
		if err != nil {
			c.Close()
			return
		}
		parts := bytes.SplitN(bytes.TrimRight(line, "\r\n"), []byte(" "), 3)
		req := &http.Request{Method: string(parts[0]), RequestURI: string(parts[1]), Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1, Header: http.Header{}, RemoteAddr: c.RemoteAddr().String()}
		for {
			l, err := br.ReadSlice('\n')
			if err != nil {
				c.Close()
				return
			}
			l = bytes.TrimRight(l, "\r\n")
			if len(l) == 0 {
				break
			}
			k, v, _ := bytes.Cut(l, []byte(":"))
			req.Header.Add(string(k), string(bytes.TrimSpace(v)))
		}
		req.Host = req.Header.Get("Host")
		req.URL = mustURL(req.RequestURI)
		req.Body = http.NoBody
		w.h = http.Header{}
		w.status = 200
		w.buf = w.buf[:0]
		h.ServeHTTP(w, req)
		bw.WriteString("HTTP/1.1 " + strconv.Itoa(w.status) + " " + http.StatusText(w.status) + "\r\n")
		w.h.Del("Content-Length")
		w.h.Write(bw)
		bw.WriteString("Content-Length: " + strconv.Itoa(len(w.buf)) + "\r\n\r\n")
		bw.Write(w.buf)
		bw.Flush()
	}
}

func mustURL(s string) *url.URL { u, _ := url.ParseRequestURI(s); return u }
