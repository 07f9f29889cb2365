#!/usr/bin/env bash
# scripts/tools.sh - idempotent installer for the tools that tests and benchmarks need.
#
# Usage:
#   scripts/tools.sh bench   # wrk, haproxy, nginx, curl (Debian packages)
#   scripts/tools.sh all     # everything known to this script
#   scripts/tools.sh help
#
# Debian packages are installed with apt-get only when a command is missing
# (checked with `command -v`), which needs root (CI runs as root). Services are
# never started by the package scripts: a temporary /usr/sbin/policy-rc.d that
# denies starts is put in place during the install when none exists.
#
# Go-built tools (for later: Consul, Jaeger, ...) are built with install_go_tool
# into ${XDG_CACHE_HOME:-$HOME/.cache}/sidecar-tools/<name>-<version>/bin/<name>
# (override the root with SIDECAR_TOOLS_CACHE) and symlinked into
# <cache>/bin/<name>; an existing binary is never rebuilt.
set -euo pipefail

# Debian keeps daemons in /usr/sbin, which is not on every user's PATH.
PATH="$PATH:/usr/sbin:/sbin"

TOOLS_CACHE="${SIDECAR_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sidecar-tools}"

# Debian packages still to install, filled by want_cmd.
APT_MISSING=()
# Set when install_apt created /usr/sbin/policy-rc.d and must remove it.
POLICY_RC_CREATED=""

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
	apt-get update
	local spec
	local -a pkgs=()
	for spec in "$@"; do
		pkgs+=("$(resolve_alternatives "$spec")")
	done
	log "running: apt-get install -y --no-install-recommends ${pkgs[*]}"
	apt-get install -y --no-install-recommends "${pkgs[@]}"
	unblock_service_start
	trap - EXIT
}

# install_go_tool NAME VERSION PACKAGE GOMOD_LINES [LDFLAGS]
#
# Build Go package PACKAGE into $TOOLS_CACHE/NAME-VERSION/bin/NAME from a tiny
# wrapper module (in $TOOLS_CACHE/NAME-VERSION/src) whose go.mod holds a
# `tool PACKAGE` directive plus GOMOD_LINES (require/replace/exclude lines that
# pin the module and its siblings). Skipped when the binary already exists.
# Extra build environment such as GONOSUMDB can be given as a prefix:
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
		have go || die "go is needed to build $name"
		local gover
		gover=$(go env GOVERSION)
		gover=${gover#go}
		log "building $name $version ($pkg) into $dir"
		mkdir -p "$dir/src" "$dir/bin"
		cat >"$dir/src/go.mod" <<EOF
module sidecar-tools/$name

go $gover

tool $pkg

$modlines
EOF
		(
			cd "$dir/src"
			log "running: go mod tidy (in $dir/src)"
			go mod tidy
			log "running: go build -trimpath -ldflags '$ldflags' -o $bin $pkg"
			go build -trimpath -ldflags "$ldflags" -o "$bin.tmp" "$pkg"
		)
		mv -f "$bin.tmp" "$bin"
	fi
	mkdir -p "$TOOLS_CACHE/bin"
	ln -sfn "$bin" "$TOOLS_CACHE/bin/$name"
}

# ---- tool sets ----------------------------------------------------------------

set_bench() {
	want_cmd curl curl
	want_cmd wrk wrk
	want_cmd haproxy haproxy
	want_cmd nginx 'nginx-light|nginx'
}

set_all() {
	set_bench
	# Go-built tools go here, e.g.:
	#   GONOSUMDB=... install_go_tool consul v1.16.1 github.com/hashicorp/consul '...'
}

main() {
	local set=${1:-}
	case $set in
	bench) set_bench ;;
	all) set_all ;;
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
	log "done: $set"
}

main "$@"
