#!/usr/bin/env bash
# bench/run.sh - the `make bench` harness: throughput and latency of the sidecar
# against the origin directly, HAProxy and nginx, all on loopback, in one run.
#
# Usage:
#   bench/run.sh                                   # what `make bench` runs
#   BENCH_DURATION=2s BENCH_ROUNDS=1 bench/run.sh  # quick smoke run
#
# Environment (defaults in brackets):
#   BENCH_DURATION  wrk duration of each measured run [10s]
#   BENCH_ROUNDS    interleaved rounds per connection count [3]
#   BENCH_CONNS     connection counts, space separated [64 16]
#   BENCH_WARMUP    wrk warm-up per contestant before measuring, 0 = none [2s]
#   BENCH_SIZE      origin response body size in bytes [1024]
#   BENCH_OUT       markdown results file [bench/results.md]
#   BENCH_KEEP_TMP  1 = keep the temp dir (configs, logs, raw wrk output) [0]
#   SIDECAR_BIN     prebuilt sidecar binary to use instead of building ./cmd/sidecar;
#                   it is started exactly like the built one (see below)
#
# Steps: scripts/tools.sh bench; go build ./cmd/sidecar and ./internal/cmd/origin
# into a temp dir; start, on 127.0.0.1 only:
#   origin   :18080  origin -addr 127.0.0.1:18080 -size $BENCH_SIZE
#   sidecar  :18001  sidecar run --config FILE --log-level warn (admin on :18000)
#   haproxy  :18002  haproxy -db -f FILE (nbthread 2, http-reuse always)
#   nginx    :18003  nginx -p DIR -c FILE -e LOG (2 workers, upstream keepalive 64)
# Then, per connection count, BENCH_ROUNDS rounds of
#   wrk -t2 -c$C -d$BENCH_DURATION --latency -H 'Host: origin' URL
# against direct, sidecar, haproxy, nginx in turn (every contestant gets the
# same request; the sidecar routes on Host). A run fails the whole benchmark
# unless it has non-zero req/s, no "Non-2xx or 3xx responses" and no socket
# errors; each contestant must also answer a curl probe with 200 and a body of
# BENCH_SIZE bytes. Reported: median req/s per contestant (the lower median for
# an even round count, so it is a real run), ratios to direct and to HAProxy,
# and p50/p99 latency of that median run. Every process started is stopped on
# exit, Ctrl-C or failure. Default run: 2 x 4 x 3 x 10 s of wrk plus 8 s of
# warm-up, builds and startup: a little over 4 minutes (4m12s measured).
set -euo pipefail
shopt -s inherit_errexit

# Debian keeps haproxy and nginx in /usr/sbin, which is not on every PATH.
PATH="$PATH:/usr/sbin:/sbin"

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

BENCH_DURATION=${BENCH_DURATION:-10s}
BENCH_ROUNDS=${BENCH_ROUNDS:-3}
BENCH_CONNS=${BENCH_CONNS:-64 16}
BENCH_WARMUP=${BENCH_WARMUP:-2s}
BENCH_SIZE=${BENCH_SIZE:-1024}
BENCH_OUT=${BENCH_OUT:-$ROOT/bench/results.md}
BENCH_KEEP_TMP=${BENCH_KEEP_TMP:-0}
SIDECAR_BIN=${SIDECAR_BIN:-}

readonly HOST=127.0.0.1
readonly PORT_ADMIN=18000 PORT_SIDECAR=18001 PORT_HAPROXY=18002 PORT_NGINX=18003 PORT_ORIGIN=18080
readonly CONTESTANTS=(direct sidecar haproxy nginx)
readonly WRK_THREADS=2
readonly READY_TRIES=200 # polls, 0.1 s apart
readonly READY_SECS=20
readonly STOP_TRIES=50   # x 0.1 s

WORK=""      # temp dir: bin/, conf/, logs/, nginx/, runs/
SIDECAR=""   # sidecar binary to run
PIDS=()      # processes started, each the leader of its own process group
PID_NAMES=() # names matching PIDS
CONNS=()     # parsed BENCH_CONNS

log() { printf '[bench] %s\n' "$*" >&2; }
die() {
	log "FAIL: $*"
	exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }

# ---- processes ------------------------------------------------------------------

# start_bg NAME CMD...: start CMD in the background in its own process group,
# output to $WORK/logs/NAME.log.
start_bg() {
	local name=$1
	shift
	log "starting $name: $*"
	if have setsid; then
		setsid "$@" >"$WORK/logs/$name.log" 2>&1 </dev/null &
	else
		"$@" >"$WORK/logs/$name.log" 2>&1 </dev/null &
	fi
	PIDS+=("$!")
	PID_NAMES+=("$name")
}

alive() { kill -0 "$1" 2>/dev/null; }

# group_alive PID: PID or any process of its group (nginx workers) still runs.
# A group id is not reused while the group has members, so signalling it is safe.
group_alive() { kill -0 -- "-$1" 2>/dev/null || alive "$1"; }

# signal_group SIG PID: signal PID's process group, or PID alone when it does
# not lead one.
signal_group() {
	kill "-$1" -- "-$2" 2>/dev/null || kill "-$1" "$2" 2>/dev/null || true
}

stop_all() {
	local i pid tries
	for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
		pid=${PIDS[i]}
		if group_alive "$pid"; then
			log "stopping ${PID_NAMES[i]} (pid $pid)"
			signal_group TERM "$pid"
			for ((tries = 0; tries < STOP_TRIES; tries++)); do
				group_alive "$pid" || break
				sleep 0.1
			done
			if group_alive "$pid"; then
				log "${PID_NAMES[i]} ignored SIGTERM for $((STOP_TRIES / 10)) s, killing it"
				signal_group KILL "$pid"
			fi
		fi
		wait "$pid" 2>/dev/null || true
	done
	PIDS=()
	PID_NAMES=()
}

show_logs() {
	local f
	[[ -n $WORK && -d $WORK/logs ]] || return 0
	for f in "$WORK"/logs/*.log "$WORK"/nginx/error.log; do
		[[ -s $f ]] || continue
		log "---- last lines of $(basename "$f") ----"
		tail -n 20 "$f" >&2
	done
}

cleanup() {
	local rc=$?
	trap - EXIT
	trap '' INT TERM # a second Ctrl-C must not skip stopping the servers
	stop_all
	if ((rc != 0)); then
		show_logs
	fi
	if [[ -n $WORK && -d $WORK ]]; then
		if [[ $BENCH_KEEP_TMP == 1 ]]; then
			log "kept temp dir $WORK"
		else
			rm -rf "$WORK"
		fi
	fi
	exit "$rc"
}

# ---- checks -----------------------------------------------------------------------

port_in_use() { (: >"/dev/tcp/$HOST/$1") 2>/dev/null; }

require_free_port() {
	if port_in_use "$1"; then
		die "$HOST:$1 is already in use; stop whatever listens there first"
	fi
}

# curl_probe URL: print "HTTP_CODE BYTES" of one GET with Host: origin.
curl_probe() {
	curl --noproxy '*' -sS -o /dev/null --max-time 1 -H 'Host: origin' \
		-w '%{http_code} %{size_download}' "$1" 2>/dev/null || true
}

# wait_ready NAME PID URL: poll URL until it answers 200, for at most
# READY_TRIES tries and READY_SECS seconds.
wait_ready() {
	local name=$1 pid=$2 url=$3 i got="" deadline=$((SECONDS + READY_SECS))
	for ((i = 0; i < READY_TRIES && SECONDS < deadline; i++)); do
		alive "$pid" || die "$name exited during startup"
		got=$(curl_probe "$url")
		if [[ $got == "200 "* ]]; then
			log "$name is up ($url)"
			return 0
		fi
		sleep 0.1
	done
	die "$name did not answer 200 on $url within $READY_SECS s (last: '${got}')"
}

# check_contestant NAME: the exact response every contestant must give.
check_contestant() {
	local name=$1 url got
	url=$(url_of "$name")
	got=$(curl_probe "$url")
	[[ $got == "200 $BENCH_SIZE" ]] ||
		die "$name: expected '200 $BENCH_SIZE' (status, body bytes) from $url, got '${got}'"
}

# ---- contestants ----------------------------------------------------------------

url_of() {
	case $1 in
	direct) echo "http://$HOST:$PORT_ORIGIN/" ;;
	sidecar) echo "http://$HOST:$PORT_SIDECAR/" ;;
	haproxy) echo "http://$HOST:$PORT_HAPROXY/" ;;
	nginx) echo "http://$HOST:$PORT_NGINX/" ;;
	*) die "unknown contestant $1" ;;
	esac
}

write_sidecar_config() {
	cat >"$WORK/conf/sidecar.yaml" <<EOF
listeners: {outbound: $HOST:$PORT_SIDECAR, admin: $HOST:$PORT_ADMIN}
discovery:
  static:
    origin: [$HOST:$PORT_ORIGIN]
EOF
}

write_haproxy_config() {
	cat >"$WORK/conf/haproxy.cfg" <<EOF
global
    nbthread 2
    maxconn 4096

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-request 10s
    timeout http-keep-alive 60s

frontend bench
    bind $HOST:$PORT_HAPROXY
    default_backend origin

backend origin
    http-reuse always
    server origin $HOST:$PORT_ORIGIN
EOF
}

write_nginx_config() {
	local p=$WORK/nginx
	mkdir -p "$p/tmp"
	cat >"$p/nginx.conf" <<EOF
worker_processes 2;
daemon off;
pid $p/nginx.pid;
error_log $p/error.log warn;

events {
    worker_connections 4096;
}

http {
    access_log off;
    client_body_temp_path $p/tmp/client_body;
    proxy_temp_path $p/tmp/proxy;
    fastcgi_temp_path $p/tmp/fastcgi;
    uwsgi_temp_path $p/tmp/uwsgi;
    scgi_temp_path $p/tmp/scgi;

    # Like HAProxy and Go, do not close client connections every 1000 requests.
    keepalive_requests 1000000;
    keepalive_timeout 60s;

    upstream origin {
        server $HOST:$PORT_ORIGIN;
        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout 60s;
    }

    server {
        listen $HOST:$PORT_NGINX;
        location / {
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
}

start_origin() {
	require_free_port "$PORT_ORIGIN"
	start_bg origin "$WORK/bin/origin" -addr "$HOST:$PORT_ORIGIN" -size "$BENCH_SIZE"
	wait_ready origin "${PIDS[-1]}" "$(url_of direct)"
}

start_sidecar() {
	require_free_port "$PORT_SIDECAR"
	require_free_port "$PORT_ADMIN"
	write_sidecar_config
	start_bg sidecar "$SIDECAR" run --config "$WORK/conf/sidecar.yaml" --log-level warn
	wait_ready sidecar "${PIDS[-1]}" "$(url_of sidecar)"
}

start_haproxy() {
	require_free_port "$PORT_HAPROXY"
	write_haproxy_config
	haproxy -c -q -f "$WORK/conf/haproxy.cfg" || die "haproxy rejects $WORK/conf/haproxy.cfg"
	start_bg haproxy haproxy -db -f "$WORK/conf/haproxy.cfg"
	wait_ready haproxy "${PIDS[-1]}" "$(url_of haproxy)"
}

start_nginx() {
	local p=$WORK/nginx
	require_free_port "$PORT_NGINX"
	write_nginx_config
	nginx -t -q -p "$p/" -c "$p/nginx.conf" -e "$p/error.log" ||
		die "nginx rejects $p/nginx.conf"
	start_bg nginx nginx -p "$p/" -c "$p/nginx.conf" -e "$p/error.log"
	wait_ready nginx "${PIDS[-1]}" "$(url_of nginx)"
}

# ---- wrk ----------------------------------------------------------------------------

# check_wrk_output NAME FILE: fail loudly on errors, print req/s.
check_wrk_output() {
	local name=$1 f=$2 rps non2xx sockerr
	rps=$(awk '/^Requests\/sec:/ {print $2; exit}' "$f")
	non2xx=$(awk -F: '/Non-2xx or 3xx responses:/ {gsub(/[ \t]/, "", $2); print $2; exit}' "$f")
	sockerr=$(grep -m1 'Socket errors:' "$f" || true)
	if [[ -n $non2xx && $non2xx != 0 ]]; then
		cat "$f" >&2
		die "$name: $non2xx non-2xx/3xx responses (see wrk output above)"
	fi
	if [[ -n $sockerr ]]; then
		cat "$f" >&2
		die "$name: wrk reported socket errors:${sockerr#*:}"
	fi
	if [[ -z $rps ]] || ! awk -v r="$rps" 'BEGIN { exit !(r > 0) }'; then
		cat "$f" >&2
		die "$name: no requests/s in wrk output"
	fi
	printf '%s\n' "$rps"
}

# latency_ms FILE PCT: wrk's --latency percentile PCT (50, 99) in milliseconds.
latency_ms() {
	local v
	v=$(awk -v p="$2%" '$1 == p {
		v = $2
		if (v ~ /us$/)      { sub(/us$/, "", v); v = v / 1000 }
		else if (v ~ /ms$/) { sub(/ms$/, "", v); v = v + 0 }
		else if (v ~ /s$/)  { sub(/s$/, "", v); v = v * 1000 }
		else if (v ~ /m$/)  { sub(/m$/, "", v); v = v * 60000 }
		else if (v ~ /h$/)  { sub(/h$/, "", v); v = v * 3600000 }
		else                { exit }
		printf "%.3f\n", v
		exit
	}' "$1")
	[[ -n $v ]] || die "no $2% latency in $1"
	printf '%s\n' "$v"
}

# run_wrk NAME CONNS DURATION FILE: one checked wrk run; prints req/s.
run_wrk() {
	local name=$1 c=$2 d=$3 f=$4
	check_contestant "$name"
	wrk -t"$WRK_THREADS" -c"$c" -d"$d" --latency -H 'Host: origin' "$(url_of "$name")" >"$f" 2>&1 ||
		{
			cat "$f" >&2
			die "$name: wrk failed"
		}
	check_wrk_output "$name" "$f"
}

warm_up() {
	local name
	[[ $BENCH_WARMUP != 0 && $BENCH_WARMUP != 0s ]] || return 0
	for name in "${CONTESTANTS[@]}"; do
		log "warm-up $name (${BENCH_WARMUP}, ${CONNS[0]} connections)"
		run_wrk "$name" "${CONNS[0]}" "$BENCH_WARMUP" "$WORK/runs/warmup-$name.txt" >/dev/null
	done
}

# measure: all interleaved runs; one line per run in $WORK/runs.tsv:
# conns contestant round req/s p50_ms p99_ms
measure() {
	local c r name f rps p50 p99
	: >"$WORK/runs.tsv"
	for c in "${CONNS[@]}"; do
		for ((r = 1; r <= BENCH_ROUNDS; r++)); do
			for name in "${CONTESTANTS[@]}"; do
				f=$WORK/runs/$name-c$c-r$r.txt
				rps=$(run_wrk "$name" "$c" "$BENCH_DURATION" "$f")
				p50=$(latency_ms "$f" 50)
				p99=$(latency_ms "$f" 99)
				printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$c" "$name" "$r" "$rps" "$p50" "$p99" >>"$WORK/runs.tsv"
				log "c=$c round $r/$BENCH_ROUNDS $name: $rps req/s, p50 ${p50} ms, p99 ${p99} ms"
			done
		done
	done
}

# median_run CONNS NAME: the runs.tsv line of the median run (lower median).
median_run() {
	awk -F'\t' -v c="$1" -v n="$2" '$1 == c && $2 == n' "$WORK/runs.tsv" |
		sort -t $'\t' -k4,4g |
		awk -v k=$(((BENCH_ROUNDS + 1) / 2)) 'NR == k'
}

# all_rps CONNS NAME: every round's req/s, rounded, in run order.
all_rps() {
	awk -F'\t' -v c="$1" -v n="$2" '$1 == c && $2 == n { printf "%s%.0f", sep, $4; sep = ", " }' \
		"$WORK/runs.tsv"
}

report() {
	local c name line rps p50 p99 direct haproxy
	local -a med
	echo "| contestant | connections | req/s (median) | ratio to direct | ratio to HAProxy |"
	echo "|---|---:|---:|---:|---:|"
	for c in "${CONNS[@]}"; do
		direct=$(median_run "$c" direct | cut -f4)
		haproxy=$(median_run "$c" haproxy | cut -f4)
		for name in "${CONTESTANTS[@]}"; do
			rps=$(median_run "$c" "$name" | cut -f4)
			awk -v n="$name" -v c="$c" -v r="$rps" -v d="$direct" -v h="$haproxy" \
				'BEGIN { printf "| %s | %s | %.0f | %.2f | %.2f |\n", n, c, r, r / d, r / h }'
		done
	done
	echo
	echo "Latency of the median run (wrk --latency), and req/s of every round:"
	echo
	echo "| contestant | connections | p50 (ms) | p99 (ms) | req/s per round |"
	echo "|---|---:|---:|---:|---|"
	for c in "${CONNS[@]}"; do
		for name in "${CONTESTANTS[@]}"; do
			line=$(median_run "$c" "$name")
			IFS=$'\t' read -r -a med <<<"$line"
			p50=${med[4]}
			p99=${med[5]}
			printf '| %s | %s | %s | %s | %s |\n' "$name" "$c" "$p50" "$p99" "$(all_rps "$c" "$name")"
		done
	done
}

header() {
	local wrkv
	wrkv=$(wrk -v 2>&1 | head -n1 | awk '{print $2}' || true)
	echo "# sidecar benchmark"
	echo
	echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ), host: $(uname -sr), cpus: $(nproc 2>/dev/null || echo '?')"
	echo "- wrk ${wrkv} -t$WRK_THREADS -d$BENCH_DURATION --latency, connections: ${CONNS[*]}," \
		"$BENCH_ROUNDS interleaved round(s), median req/s; GET with Host: origin, $BENCH_SIZE-byte bodies"
	echo "- sidecar $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '(no commit)'), $(go env GOVERSION);" \
		"$(haproxy -v | head -n1 | awk '{print "HAProxy " $3}'); $(nginx -v 2>&1 | sed 's/.*: //')"
	echo "- everything (wrk, origin, proxies) shares this machine's CPUs, on loopback"
	echo
}

# ---- main -----------------------------------------------------------------------------

parse_settings() {
	[[ $BENCH_ROUNDS =~ ^[1-9][0-9]*$ ]] || die "BENCH_ROUNDS must be a positive integer, got '$BENCH_ROUNDS'"
	[[ $BENCH_SIZE =~ ^[0-9]+$ ]] || die "BENCH_SIZE must be a non-negative integer, got '$BENCH_SIZE'"
	read -r -a CONNS <<<"$BENCH_CONNS"
	((${#CONNS[@]} > 0)) || die "BENCH_CONNS is empty"
	local c
	for c in "${CONNS[@]}"; do
		[[ $c =~ ^[0-9]+$ ]] && ((c >= WRK_THREADS)) ||
			die "BENCH_CONNS entries must be integers >= $WRK_THREADS, got '$c'"
	done
	case $BENCH_OUT in
	/*) ;;
	*) BENCH_OUT=$PWD/$BENCH_OUT ;;
	esac
}

build() {
	log "building origin"
	go build -o "$WORK/bin/origin" ./internal/cmd/origin || die "building ./internal/cmd/origin failed"
	if [[ -n $SIDECAR_BIN ]]; then
		[[ -x $SIDECAR_BIN ]] || die "SIDECAR_BIN=$SIDECAR_BIN is not an executable file"
		SIDECAR=$SIDECAR_BIN
		log "using prebuilt sidecar $SIDECAR"
	else
		log "building sidecar"
		go build -o "$WORK/bin/sidecar" ./cmd/sidecar ||
			die "building ./cmd/sidecar failed (SIDECAR_BIN=/path/to/sidecar uses a prebuilt one)"
		SIDECAR=$WORK/bin/sidecar
	fi
}

main() {
	parse_settings
	cd "$ROOT"
	trap cleanup EXIT
	trap 'log "interrupted"; exit 130' INT
	trap 'log "terminated"; exit 143' TERM

	scripts/tools.sh bench
	have go || die "go is not on PATH"

	WORK=$(mktemp -d "${TMPDIR:-/tmp}/sidecar-bench.XXXXXX")
	# nginx workers drop to an unprivileged user when started as root.
	chmod 0755 "$WORK"
	mkdir -p "$WORK/bin" "$WORK/conf" "$WORK/logs" "$WORK/runs"
	log "temp dir $WORK"

	build
	start_origin
	start_sidecar
	start_haproxy
	start_nginx

	local secs
	secs=$(awk -v d="$BENCH_DURATION" 'BEGIN { n = d + 0; if (d ~ /m$/) n *= 60; if (d ~ /h$/) n *= 3600; print n }')
	log "measuring: ${#CONNS[@]} connection count(s) x $BENCH_ROUNDS round(s) x ${#CONTESTANTS[@]} contestants x $BENCH_DURATION (~$((secs * ${#CONNS[@]} * BENCH_ROUNDS * ${#CONTESTANTS[@]})) s)"
	warm_up
	measure

	local out
	out=$(
		header
		report
	)
	mkdir -p "$(dirname "$BENCH_OUT")"
	printf '%s\n' "$out" >"$BENCH_OUT.tmp"
	mv -f "$BENCH_OUT.tmp" "$BENCH_OUT"
	echo
	printf '%s\n' "$out"
	echo
	log "results written to $BENCH_OUT"
}

main "$@"
