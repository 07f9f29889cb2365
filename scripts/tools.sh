#!/usr/bin/env bash
# scripts/tools.sh - idempotent installer for the tools that tests and benchmarks need.
#
# Usage:
#   scripts/tools.sh test         # what `make test` needs: consul, kube-apiserver, h2spec, jaeger,
#                                 # toxiproxy-server, grpcurl (built from Go modules), etcd (Debian
#                                 # etcd-server), the clients of docs/clients.md (Debian, npm)
#   scripts/tools.sh bench        # wrk, haproxy, nginx, curl (Debian packages), ghz, jaeger (Go)
#   scripts/tools.sh all          # everything known to this script
#   scripts/tools.sh path NAME    # print the cached binary of Go-built tool NAME
#                                 # (exit 1 when it is not built yet)
#   scripts/tools.sh help
#
# Installing a set prints, on stdout, the path of each Go-built tool in it, one
# per line (all logs go to stderr), e.g. bin=$(scripts/tools.sh test).
#
# Debian packages are installed with apt-get only when a command is missing
# (checked with `command -v`), which needs root (CI runs as root). Services are
# never started by the package scripts: a temporary /usr/sbin/policy-rc.d that
# denies starts is put in place during the install when none exists.
#
# Go-built tools (Consul; later Jaeger, ...) are built with install_go_tool
# into ${XDG_CACHE_HOME:-$HOME/.cache}/sidecar-tools/<name>-<version>/bin/<name>
# (override the root with SIDECAR_TOOLS_CACHE) and symlinked into
# <cache>/bin/<name>; an existing binary is never rebuilt. Building needs only
# `go` and the Go module proxy; a cold Consul build takes several minutes.
set -euo pipefail

# Debian keeps daemons in /usr/sbin, which is not on every user's PATH.
PATH="$PATH:/usr/sbin:/sbin"

TOOLS_CACHE="${SIDECAR_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sidecar-tools}"

# Pinned versions of the Go-built tools (see go_tool_version).
# Consul v1.16.1 is the last MPL-2.0 release; later ones are BUSL-licensed.
CONSUL_VERSION=v1.16.1
# HTTP/2 conformance (tests) and gRPC load (benchmarks).
H2SPEC_VERSION=v2.2.1+incompatible
GHZ_VERSION=v0.93.0
# Toxiproxy (TCP fault injection: latency spikes in the fault suite).
TOXIPROXY_VERSION=v2.12.0
# grpcurl, one of the clients docs/clients.md shows (its go.mod asks for go 1.25).
GRPCURL_VERSION=v1.9.4
# Jaeger v2 (the OpenTelemetry-collector based one), the trace backend of the
# tracing tests.
JAEGER_VERSION=v1.76.0
# kube-apiserver for the Kubernetes tests (server-side dry-run, admission
# webhook); its staging modules are the matching v0.x release.
KUBE_VERSION=v1.32.3
KUBE_STAGING_VERSION=v0.32.3
# The Node.js clients the tests run through the sidecar (npm registry),
# installed into <cache>/node-clients-<hash of this list>/node_modules and
# linked as <cache>/node-clients.
NODE_CLIENTS="@grpc/grpc-js@1.14.7 undici@7.30.3"

# Debian packages still to install, filled by want_cmd.
APT_MISSING=()
# Set when install_apt created /usr/sbin/policy-rc.d and must remove it.
POLICY_RC_CREATED=""
# Set by a tool set that needs the Node.js clients.
NODE_CLIENTS_WANTED=""

log() { printf 'tools.sh: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }

usage() {
	sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}

# want_cmd CMD PKG: queue apt package PKG when command CMD is missing.
# PKG may list alternatives as "a|b": the first with an install candidate wins.
want_cmd() {
	local cmd=$1 pkg=$2
	if have "$cmd"; then
		log "ok: $cmd ($(command -v "$cmd"))"
	else
		log "missing: $cmd -> apt package $pkg"
		APT_MISSING+=("$pkg")
	fi
}

# want_py_module MODULE PKG: queue apt package PKG when Debian's Python
# (/usr/bin/python3, the one Debian's python3-* packages are for) cannot
# import MODULE.
want_py_module() {
	local mod=$1 pkg=$2
	if /usr/bin/python3 -c "import $mod" >/dev/null 2>&1; then
		log "ok: python module $mod (/usr/bin/python3)"
	else
		log "missing: python module $mod for /usr/bin/python3 -> apt package $pkg"
		APT_MISSING+=("$pkg")
	fi
}

# apt_has_candidate PKG: true when apt can install PKG.
apt_has_candidate() {
	local cand
	cand=$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2; exit}')
	[[ -n $cand && $cand != "(none)" ]]
}

# resolve_alternatives "a|b": print the first alternative apt can install.
resolve_alternatives() {
	local alt
	local -a alts
	IFS='|' read -r -a alts <<<"$1"
	for alt in "${alts[@]}"; do
		if apt_has_candidate "$alt"; then
			printf '%s\n' "$alt"
			return 0
		fi
	done
	die "no installable package among: $1"
}

require_root() {
	[[ $(id -u) -eq 0 ]] || die "installing $* needs root (run as root, as CI does, or install them yourself)"
}

block_service_start() {
	if [[ ! -e /usr/sbin/policy-rc.d ]]; then
		log "adding a temporary /usr/sbin/policy-rc.d so packages do not start services"
		printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
		chmod 0755 /usr/sbin/policy-rc.d
		POLICY_RC_CREATED=1
	fi
}

unblock_service_start() {
	if [[ -n $POLICY_RC_CREATED ]]; then
		rm -f /usr/sbin/policy-rc.d
		POLICY_RC_CREATED=""
		log "removed the temporary /usr/sbin/policy-rc.d"
	fi
}

# install_apt PKG...: apt-get update and install the packages (alternatives allowed).
install_apt() {
	(($# > 0)) || return 0
	have apt-get || die "apt-get not found; install by hand: $*"
	require_root "$@"
	export DEBIAN_FRONTEND=noninteractive
	trap unblock_service_start EXIT
	block_service_start
	log "running: apt-get update"
	apt-get update >&2
	local spec
	local -a pkgs=()
	for spec in "$@"; do
		pkgs+=("$(resolve_alternatives "$spec")")
	done
	log "running: apt-get install -y --no-install-recommends ${pkgs[*]}"
	apt-get install -y --no-install-recommends "${pkgs[@]}" >&2
	unblock_service_start
	trap - EXIT
}

# install_go_tool NAME VERSION PACKAGE GOMOD_LINES [LDFLAGS]
#
# Build Go package PACKAGE into $TOOLS_CACHE/NAME-VERSION/bin/NAME from a tiny
# wrapper module (in $TOOLS_CACHE/NAME-VERSION/src) whose go.mod holds a
# `tool PACKAGE` directive plus GOMOD_LINES (require/replace/exclude lines that
# pin the module and its siblings). Skipped when the binary already exists.
# LDFLAGS defaults to "-s -w". Extra build environment such as GONOSUMDB, or
# GO_TOOL_TIDY_FLAGS (extra `go mod tidy` flags, e.g. -e), can be given as a
# prefix; it applies to both `go mod tidy` and `go build`:
#   GONOSUMDB=github.com/x/y install_go_tool foo v1.2.3 github.com/x/foo/cmd/foo \
#       'require github.com/x/foo v1.2.3'
# Prints nothing on stdout; the binary is also linked as $TOOLS_CACHE/bin/NAME.
install_go_tool() {
	local name=$1 version=$2 pkg=$3 modlines=$4 ldflags=${5:--s -w}
	local dir="$TOOLS_CACHE/$name-$version"
	local bin="$dir/bin/$name"
	if [[ -x $bin ]]; then
		log "ok: $name $version ($bin)"
	else
		build_go_tool "$name" "$version" "$pkg" "$modlines" "$ldflags" "$dir" "$bin"
	fi
	mkdir -p "$TOOLS_CACHE/bin"
	ln -sfn "$bin" "$TOOLS_CACHE/bin/$name"
}

# build_go_tool NAME VERSION PACKAGE GOMOD_LINES LDFLAGS DIR BIN: the build
# step of install_go_tool (always builds, then moves the binary into place).
build_go_tool() {
	local name=$1 version=$2 pkg=$3 modlines=$4 ldflags=$5 dir=$6 bin=$7
	have go || die "go is needed to build $name"
	local gover start
	gover=$(go env GOVERSION)
	gover=${gover#go}
	start=$SECONDS
	log "building $name $version ($pkg) into $dir${GONOSUMDB:+ with GONOSUMDB=$GONOSUMDB}"
	mkdir -p "$dir/src" "$dir/bin"
	write_wrapper_gomod "$dir/src/go.mod" "$name" "$gover" "$pkg" "$modlines"
	(
		cd "$dir/src"
		# The wrapper is a module of its own: ignore the caller's go.work and
		# GOFLAGS (the Makefile exports GOFLAGS).
		export GOWORK=off GOFLAGS=-buildvcs=false
		local -a tidy_flags
		read -r -a tidy_flags <<<"${GO_TOOL_TIDY_FLAGS:-}"
		log "running: go mod tidy${tidy_flags[*]:+ ${tidy_flags[*]}} (in $dir/src)"
		go mod tidy "${tidy_flags[@]}" ||
			die "go mod tidy failed for $name $version (wrapper module: $dir/src/go.mod)"
		log "running: go build -trimpath -ldflags '$ldflags' -o $bin $pkg"
		if ! go build -trimpath -ldflags "$ldflags" -o "$bin.tmp.$$" "$pkg"; then
			rm -f "$bin.tmp.$$"
			die "go build failed for $name $version ($pkg, wrapper module: $dir/src/go.mod)"
		fi
	)
	mv -f "$bin.tmp.$$" "$bin"
	log "built $name $version in $((SECONDS - start)) s: $bin"
}

# write_wrapper_gomod FILE NAME GOVERSION PACKAGE GOMOD_LINES
write_wrapper_gomod() {
	cat >"$1" <<EOF
module sidecar-tools/$2

go $3

tool $4

$5
EOF
}

# go_tool_version NAME: print the pinned version of Go-built tool NAME.
go_tool_version() {
	case $1 in
	consul) printf '%s\n' "$CONSUL_VERSION" ;;
	kube-apiserver) printf '%s\n' "$KUBE_VERSION" ;;
	h2spec) printf '%s\n' "$H2SPEC_VERSION" ;;
	ghz) printf '%s\n' "$GHZ_VERSION" ;;
	toxiproxy-server) printf '%s\n' "$TOXIPROXY_VERSION" ;;
	jaeger) printf '%s\n' "$JAEGER_VERSION" ;;
	grpcurl) printf '%s\n' "$GRPCURL_VERSION" ;;
	*) die "unknown Go-built tool: '$1' (known: consul, kube-apiserver, h2spec, ghz, jaeger, toxiproxy-server, grpcurl)" ;;
	esac
}

# cmd_path NAME: print the cached binary of NAME at its pinned version; fail
# when it is not built yet.
cmd_path() {
	local name=${1:-} version bin
	[[ -n $name ]] || die "usage: $0 path NAME"
	version=$(go_tool_version "$name")
	bin="$TOOLS_CACHE/$name-$version/bin/$name"
	[[ -x $bin ]] || die "$name $version is not installed ($bin missing); run: scripts/tools.sh test"
	printf '%s\n' "$bin"
}

# ---- tool sets ----------------------------------------------------------------

set_bench() {
	want_cmd curl curl
	want_cmd wrk wrk
	want_cmd haproxy haproxy
	want_cmd nginx 'nginx-light|nginx'
	install_ghz
	# The benchmarked sidecar exports its sampled spans to a real Jaeger
	# (cached: the test set builds the same version).
	install_jaeger
}

# Go-built tools installed by this run; their paths are printed at the end.
GO_TOOLS_DONE=()

# install_consul: the Consul agent that tests run against. The sibling-module
# pins and the go-msgpack excludes are what v1.16.1 needs to resolve and build
# from the Go module proxy alone; the checksum database lacks entries for the
# two GONOSUMDB prefixes.
install_consul() {
	local modlines
	modlines=$(
		cat <<EOF
require (
	github.com/hashicorp/consul $CONSUL_VERSION
	github.com/hashicorp/consul/api v1.24.0
	github.com/hashicorp/consul/envoyextensions v0.4.1
	github.com/hashicorp/consul/proto-public v0.4.1
	github.com/hashicorp/consul/sdk v0.14.1
	github.com/hashicorp/consul/troubleshoot v0.3.1
)

exclude (
	github.com/hashicorp/go-msgpack v1.1.5
	github.com/hashicorp/go-msgpack v1.1.6
)
EOF
	)
	GONOSUMDB=github.com/hashicorp/consul/envoyextensions,github.com/hashicorp/hcp-sdk-go \
		install_go_tool consul "$CONSUL_VERSION" github.com/hashicorp/consul "$modlines" '-s -w'
	GO_TOOLS_DONE+=(consul)
}

# install_kube_apiserver: the Kubernetes API server the inject/webhook tests
# run against (with etcd from Debian). k8s.io/kubernetes requires its staging
# modules at v0.0.0 (its own replace directives point into its tree and are
# ignored in a dependency), so every one is replaced by its published
# v0.x release; k8s.io/sample-cli-plugin v0.32.3 is refused by the module
# proxy and nothing kube-apiserver builds imports it, so it is replaced by an
# empty local stub module. The ldflags set what /version reports.
install_kube_apiserver() {
	local dir="$TOOLS_CACHE/kube-apiserver-$KUBE_VERSION" m modlines
	local -a staging=(api apiextensions-apiserver apimachinery apiserver cli-runtime
		client-go cloud-provider cluster-bootstrap code-generator component-base
		component-helpers controller-manager cri-api cri-client csi-translation-lib
		dynamic-resource-allocation endpointslice externaljwt kms kube-aggregator
		kube-controller-manager kube-proxy kube-scheduler kubectl kubelet metrics
		mount-utils pod-security-admission sample-apiserver sample-controller)
	mkdir -p "$dir/src/stub/sample-cli-plugin"
	printf 'module k8s.io/sample-cli-plugin\n' >"$dir/src/stub/sample-cli-plugin/go.mod"
	modlines="godebug default=go1.23"$'\n\n'"require k8s.io/kubernetes $KUBE_VERSION"$'\n\n'"replace ("$'\n'
	for m in "${staging[@]}"; do
		modlines+=$'\t'"k8s.io/$m => k8s.io/$m $KUBE_STAGING_VERSION"$'\n'
	done
	modlines+=$'\t'"k8s.io/sample-cli-plugin => ./stub/sample-cli-plugin"$'\n'")"
	local v=$KUBE_VERSION minor=${KUBE_VERSION#v1.}
	minor=${minor%%.*}
	GONOSUMDB=k8s.io install_go_tool kube-apiserver "$KUBE_VERSION" \
		k8s.io/kubernetes/cmd/kube-apiserver "$modlines" \
		"-s -w -X k8s.io/component-base/version.gitVersion=$v -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
	GO_TOOLS_DONE+=(kube-apiserver)
}

# install_h2spec: the HTTP/2 conformance suite the h2c listeners are tested
# with (a module without go.mod, hence +incompatible).
install_h2spec() {
	install_go_tool h2spec "$H2SPEC_VERSION" github.com/summerwind/h2spec/cmd/h2spec \
		"require github.com/summerwind/h2spec $H2SPEC_VERSION"
	GO_TOOLS_DONE+=(h2spec)
}

# install_jaeger: Jaeger v2 (cmd/jaeger) for the tracing tests. Its sarama
# dependency must be held at v1.33.0 to build; the checksum database lacks
# entries under the two GONOSUMDB prefixes.
install_jaeger() {
	GONOSUMDB=github.com/open-telemetry/opentelemetry-collector-contrib,go.opentelemetry.io/collector \
		install_go_tool jaeger "$JAEGER_VERSION" github.com/jaegertracing/jaeger/cmd/jaeger \
		"require github.com/jaegertracing/jaeger $JAEGER_VERSION"$'\n\n'"replace github.com/Shopify/sarama => github.com/Shopify/sarama v1.33.0"
	GO_TOOLS_DONE+=(jaeger)
}

# install_toxiproxy: the TCP proxy the fault suite adds latency spikes with
# (driven through its HTTP API; no client library in the main module).
install_toxiproxy() {
	install_go_tool toxiproxy-server "$TOXIPROXY_VERSION" github.com/Shopify/toxiproxy/v2/cmd/server \
		"require github.com/Shopify/toxiproxy/v2 $TOXIPROXY_VERSION"
	GO_TOOLS_DONE+=(toxiproxy-server)
}

# install_grpcurl: the gRPC command-line client of the client guide.
install_grpcurl() {
	install_go_tool grpcurl "$GRPCURL_VERSION" github.com/fullstorydev/grpcurl/cmd/grpcurl \
		"require github.com/fullstorydev/grpcurl $GRPCURL_VERSION" "-s -w -X main.version=$GRPCURL_VERSION"
	GO_TOOLS_DONE+=(grpcurl)
}

# install_ghz: gRPC load generator for `make bench`.
install_ghz() {
	install_go_tool ghz "$GHZ_VERSION" github.com/bojand/ghz/cmd/ghz "require github.com/bojand/ghz $GHZ_VERSION"
	GO_TOOLS_DONE+=(ghz)
}

# set_test: what `make test` needs.
set_test() {
	install_h2spec
	install_toxiproxy
	install_jaeger
	install_consul
	install_kube_apiserver
	want_cmd etcd etcd-server
	# Transparent interception tests: network namespaces, the redirect
	# rules, and an unmodified client (curl) run as another user (setpriv).
	want_cmd ip iproute2
	want_cmd iptables iptables
	want_cmd ip6tables iptables
	want_cmd curl curl
	want_cmd setpriv util-linux
	# Real servers and clients the sidecar is tried with: Python's
	# http.server (HTTP/2 fallback), Node.js with grpc-js and undici
	# (CONNECT tunnels).
	want_cmd python3 python3
	want_cmd node nodejs
	want_cmd npm npm
	NODE_CLIENTS_WANTED=1
	# The other clients of docs/clients.md, whose examples TestClientGuide
	# runs: wget, grpcurl, a JDK (single-file source programs need javac's
	# module), and requests and grpcio for Debian's Python.
	want_cmd wget wget
	want_cmd javac 'default-jdk-headless|openjdk-17-jdk-headless'
	want_py_module requests python3-requests
	want_py_module grpc python3-grpcio
	# A real browser for the admin status page: headless Chromium loads
	# it from a running sidecar (TestStatusPageInBrowser).
	want_cmd chromium chromium
	install_grpcurl
}

# install_node_clients: the npm packages of NODE_CLIENTS, once per list.
install_node_clients() {
	local dir
	dir="$TOOLS_CACHE/node-clients-$(printf '%s' "$NODE_CLIENTS" | sha256sum | cut -c1-12)"
	if [[ -d $dir/node_modules/undici && -d $dir/node_modules/@grpc/grpc-js ]]; then
		log "ok: node clients ($dir)"
	else
		have npm || die "npm not found; it comes with the nodejs and npm packages"
		log "installing node clients: $NODE_CLIENTS"
		rm -rf "$dir.tmp"
		mkdir -p "$dir.tmp"
		# shellcheck disable=SC2086 # NODE_CLIENTS is a list of packages
		(cd "$dir.tmp" && npm init -y >/dev/null && npm install --no-audit --no-fund --save-exact $NODE_CLIENTS >&2)
		rm -rf "$dir"
		mv "$dir.tmp" "$dir"
	fi
	ln -sfn "$dir" "$TOOLS_CACHE/node-clients"
}

set_all() {
	set_bench
	set_test
}

main() {
	local set=${1:-}
	case $set in
	test) set_test ;;
	bench) set_bench ;;
	all) set_all ;;
	path)
		cmd_path "${2:-}"
		return 0
		;;
	-h | --help | help)
		usage
		return 0
		;;
	*)
		usage >&2
		die "unknown or missing tool set: '${set}'"
		;;
	esac
	if ((${#APT_MISSING[@]} > 0)); then
		install_apt "${APT_MISSING[@]}"
	else
		log "nothing to install from apt for '$set'"
	fi
	if [[ -n ${NODE_CLIENTS_WANTED:-} ]]; then
		install_node_clients
	fi
	log "done: $set"
	local name
	for name in "${GO_TOOLS_DONE[@]}"; do
		cmd_path "$name"
	done
}

main "$@"
