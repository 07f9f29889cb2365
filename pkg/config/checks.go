package config

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/sidecar-mesh/sidecar/pkg/policy"
)

// The checks below are the sidecar's rules for single values, exported so
// that whatever writes the sidecar's flags (the Kubernetes injector) refuses
// what the sidecar would refuse at startup, with the same words.

// AllowNonLoopbackAdminEnv is the environment variable that lets the admin
// API listen on an address other than loopback. It is deliberately not a
// key of the config file: a file a pod's author supplies must not open the
// admin API (drain, quit, the effective config) to the network.
const AllowNonLoopbackAdminEnv = "SIDECAR_ALLOW_NON_LOOPBACK_ADMIN"

// MaxDrainWindow is the longest lifecycle.drainWindow.
const MaxDrainWindow = 10 * time.Minute

// CheckLogLevel checks log.level.
func CheckLogLevel(v string) error {
	switch v {
	case "debug", "info", "warn", "error":
		return nil
	}
	return fmt.Errorf("%s (allowed: debug, info, warn, error)", policy.Quote(v))
}

// CheckDrainWindow checks lifecycle.drainWindow.
func CheckDrainWindow(d time.Duration) error {
	if d < 0 || d > MaxDrainWindow {
		return fmt.Errorf("%s is not allowed (allowed: 0s to 10m)", policy.Duration(d))
	}
	return nil
}

// CheckConsulAddress checks the address of a Consul agent's HTTP API
// (discovery.consul.address, CONSUL_HTTP_ADDR): HOST:PORT, optionally after
// http:// or https://, where HOST is an IP address or a DNS name and PORT is
// 1 to 65535. Nothing else: no path, no user, no spaces or control
// characters.
func CheckConsulAddress(v string) error {
	hostport := v
	for _, scheme := range []string{"http://", "https://"} {
		if rest, ok := strings.CutPrefix(v, scheme); ok {
			hostport = rest
		}
	}
	if i := strings.LastIndexByte(hostport, '@'); i >= 0 {
		// Never echo what stands before the '@': it is a password.
		return fmt.Errorf("%s: credentials do not belong in the address; give the ACL token in CONSUL_HTTP_TOKEN",
			policy.Quote(strings.TrimSuffix(v, hostport)+"[redacted]@"+hostport[i+1:]))
	}
	host, port, err := net.SplitHostPort(hostport)
	if err != nil || host == "" {
		return fmt.Errorf("%s: want host:port, e.g. consul.consul:8500", policy.Quote(v))
	}
	if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 {
		return fmt.Errorf("%s: port %s out of range 1-65535", policy.Quote(v), policy.Quote(port))
	}
	if net.ParseIP(host) == nil && !hostName(host) {
		return fmt.Errorf("%s: %s is not an IP address or a DNS name", policy.Quote(v), policy.Quote(host))
	}
	return nil
}

// hostName says whether s is a DNS name: dot-separated labels of letters,
// digits, '-' and '_' (not first or last), at most 63 each, 253 in all.
func hostName(s string) bool {
	if len(s) > 253 {
		return false
	}
	for _, label := range strings.Split(strings.TrimSuffix(s, "."), ".") {
		if label == "" || len(label) > 63 || strings.IndexAny(label[:1]+label[len(label)-1:], "-_") >= 0 {
			return false
		}
		for _, r := range label {
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_') {
				return false
			}
		}
	}
	return true
}

// CheckAdminAddr checks that listeners.admin is a loopback address
// (127.0.0.0/8, ::1 or localhost) unless allowed is set (see
// AllowNonLoopbackAdminEnv). An address that is not host:port is left to
// the listener check.
func CheckAdminAddr(addr string, allowed bool) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil || allowed || strings.EqualFold(host, "localhost") {
		return nil
	}
	if ip, err := netip.ParseAddr(host); err == nil && ip.Unmap().IsLoopback() {
		return nil
	}
	return fmt.Errorf("%s is not a loopback address: the admin API serves the pod itself only; "+
		"binding it elsewhere needs %s=true, which the config file can't set "+
		"(in Kubernetes: the injector's --allow-non-loopback-admin)", policy.Quote(addr), AllowNonLoopbackAdminEnv)
}

// Validate checks a probe as the sidecar does at startup; key names it in
// the errors (e.g. probes.readiness).
func (p *Probe) Validate(key string) error {
	var errs []error
	p.validate(key, func(format string, a ...any) { errs = append(errs, fmt.Errorf(format, a...)) })
	return errors.Join(errs...)
}
