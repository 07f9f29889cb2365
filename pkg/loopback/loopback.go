// Package loopback tells requests made on this host from the others: a
// loopback peer, a Host header that names this host, a browser page served
// from this host. The sidecar's own endpoints (admin API, health port) use
// it to keep their state-changing and detailed answers to the pod itself.
package loopback

import (
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strings"
)

// Peer reports whether r came from a loopback address (127.0.0.0/8, ::1,
// or an IPv4-mapped 127.0.0.0/8): a process in the pod's own network
// namespace.
func Peer(r *http.Request) bool { return Addr(r.RemoteAddr) }

// Addr reports whether remoteAddr, an "ip:port" as in
// http.Request.RemoteAddr, is a loopback address. Anything that does not
// parse is not.
func Addr(remoteAddr string) bool {
	host, _, err := net.SplitHostPort(remoteAddr)
	if err != nil {
		return false
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.Unmap().IsLoopback()
}

// Host reports whether host, a Host header with or without a port, names
// this host: "localhost" (any case), an address of 127.0.0.0/8, or [::1].
// Any other name, even one that resolves to 127.0.0.1 today, is not: that
// is how DNS rebinding reaches a loopback port from a browser.
func Host(host string) bool {
	if host == "" {
		return false
	}
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	} else if strings.HasPrefix(host, "[") && strings.HasSuffix(host, "]") {
		host = host[1 : len(host)-1]
	}
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.Unmap().IsLoopback()
}

// Origin reports whether origin, an Origin header, is a page served from
// this host: http or https with a Host that Host accepts. "null" and
// anything else are not.
func Origin(origin string) bool {
	u, err := url.Parse(origin)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.User != nil ||
		(u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" {
		return false
	}
	return Host(u.Host)
}
