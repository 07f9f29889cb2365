#!/usr/bin/env bash
# bench/run.sh - the `make bench` harness: the sidecar against the origin
# directly, HAProxy and nginx, all on loopback, in one run: closed loop
# (throughput), open loop (latency at a fixed rate), CPU and memory of every
# proxy, and overload.
#
# Usage:
#   bench/run.sh                                   # what `make bench` runs
#   BENCH_DURATION=2s BENCH_ROUNDS=1 BENCH_OPEN_DURATION=3s \
#     BENCH_OVERLOAD_DURATION=3s bench/run.sh      # quick smoke run
#   BENCH_PHASES=mesh bench/run.sh                 # plaintext vs mutual TLS only
#
# Environment (defaults in brackets):
#   BENCH_PHASES      which phases to run, in this order [open closed overload
#                     mesh; mesh only when the Consul binary is built (scripts/
#                     tools.sh test builds it), else it is skipped with a notice]
#   BENCH_ROUNDS      interleaved rounds per closed and open-loop load [3]
#   BENCH_DURATION    wrk duration of each closed-loop run [10s]
#   BENCH_CONNS       wrk connection counts, space separated [64 16]
#   BENCH_WARMUP      wrk warm-up per contestant before the closed loop [2s]
#   BENCH_OPEN_RATE   open-loop rate, requests per second [1000]
#   BENCH_OPEN_DURATION  length of each open-loop run [20s]
#   BENCH_OPEN_CONNS  openloop's keep-alive connections at that rate [32]
#   BENCH_OVERLOAD_DURATION  length of the steady and the overload run [10s]
#   BENCH_OVERLOAD_LIMIT     concurrency.maxInFlight of the overload sidecar's
#                            policy for every service ("*") [32]
#   BENCH_OVERLOAD_CONNS     openloop's connections in the overload phase [64]
#   BENCH_OVERLOAD_QUEUE     concurrency.maxQueued of the queued sidecar [32]
#   BENCH_OVERLOAD_QUEUE_TIMEOUT  its concurrency.queueTimeout [5ms]
#   BENCH_CAPACITY    sidecar capacity (req/s) for the overload phase when the
#                     closed phase does not run [measured: the sidecar's median
#                     req/s at the first of BENCH_CONNS]
#   BENCH_SIZE        origin response body size in bytes [1024]
#   BENCH_OUT         markdown results file [bench/results.md]
#   BENCH_PLOT        SVG latency plot [bench/latency.svg]
#   BENCH_KEEP_TMP    1 = keep the temp dir (configs, logs, raw outputs) [0; kept on failure]
#   SIDECAR_BIN       prebuilt sidecar binary instead of building ./cmd/sidecar
#
# Contestants, all on 127.0.0.1, each answering GET / with the origin's body:
#   direct        :18080  origin -size $BENCH_SIZE (Go net/http, fixed body)
#   sidecar       :18001  sidecar run: its default policy, request metrics on,
#                         tracing at 1% (parentbased_traceidratio 0.01) over OTLP
#                         gRPC to a real Jaeger (v2, memory storage) on :18317
#   sidecar-loops :18111  as sidecar, with outboundEngine: loops (the event-loop engine)
#   sidecar-bare  :18011  the same binary with tracing off and --request-metrics=false
#   sidecar-1cpu  :18041  the sidecar as above (tracing, metrics) with GOMAXPROCS=1:
#                         what one Go scheduler thread costs and serves
#   haproxy       :18002  haproxy -db (nbthread 2, http-reuse always)
#   nginx         :18003  nginx (2 workers, upstream keepalive 64)
#   loop-bare     :18004  internal/cmd/loopfwd: a bare forwarder on event loops
#                         (one per CPU, epoll, no goroutine per connection), no
#                         policy chain, no telemetry: what the engine alone
#                         costs in Go, beside the sidecar's whole request path
# and for the overload phase only:
#   sidecar-overload :18031  the sidecar (tracing and metrics as above) with
#                            concurrency.maxInFlight: $BENCH_OVERLOAD_LIMIT and no
#                            line (maxQueued: 0)
#   sidecar-queued   :18051  the same with a line: concurrency.maxQueued:
#                            $BENCH_OVERLOAD_QUEUE, queueTimeout:
#                            $BENCH_OVERLOAD_QUEUE_TIMEOUT
#   sidecar-adaptive :18061  the sidecar with concurrency.adaptive: true and
#                            nothing tuned by hand (maxInFlight at its
#                            default, 1024, is the limit's ceiling)
#   sidecar-defaults :18071  the sidecar on its default policy (maxInFlight
#                            1024, a line of 1024 waiting up to 1s): what a
#                            user who set nothing gets
# and for the mesh phase only, two hops each, both pairs in front of the same
# origin (every sidecar on its default policy, request metrics on, no tracing):
#   consul           :18500  consul agent -dev (HTTP API; serf and server RPC on
#                            18501-18503; no DNS, no gRPC), the mesh's CA
#   mesh-plaintext   :18201  sidecar A (static endpoint: B's inbound) -> sidecar
#                            B's plaintext inbound :18212 -> origin; mesh off
#   mesh-mtls        :18231  sidecar A (service bench-client, mesh consul-connect,
#                            origin found in Consul) -> mutual TLS -> sidecar B's
#                            mesh inbound :18243 (service origin, mesh
#                            consul-connect) -> origin
#
# Phases:
#   open      per round, each contestant in turn: openloop (internal/cmd/openloop)
#             at BENCH_OPEN_RATE for BENCH_OPEN_DURATION; latency counts from each
#             request's scheduled send time. Runs first, on fresh processes, so
#             that the peak RSS at this rate is not the closed loop's.
#   closed    per connection count and round, each contestant in turn: wrk -t2
#             -c$C -d$BENCH_DURATION --latency.
#   overload  the overload sidecar, fresh: openloop at half the capacity (steady
#             state), then at twice the capacity, BENCH_OVERLOAD_CONNS connections;
#             then the queued sidecar, fresh, at twice the capacity; then the
#             adaptive sidecar the same way (its warm-up is not -strict: the
#             limit starts at its floor, 3, while it measures the latency).
#   mesh      the Consul agent and the two pairs, fresh; measuring starts once
#             mesh-mtls's B counts an inbound handshake that A made (so A
#             routes over the mesh); then per connection count and round, each
#             pair in turn: wrk as in the closed phase. CPU and memory are
#             both sidecars' of the pair; the handshakes of each run are B's
#             sidecar_mesh_handshakes_total{direction="inbound",result="ok"}
#             growth. Its table is appended to BENCH_OUT (a mesh-only run
#             writes the header and that table). About 3 minutes by default.
# Around every run the contestant's processes are sampled: CPU time (utime +
# stime from /proc/PID/stat, summed over the process group: nginx's workers
# too) and peak RSS (VmHWM from /proc/PID/status, reset before the run by
# writing 5 to /proc/PID/clear_refs; summed over the group) and private RSS
# (RssAnon at the end of the run). The generator's
# own CPU time is recorded too. A closed or open-loop run fails the benchmark
# unless every request got a 2xx answer (wrk: no non-2xx, no socket errors);
# every contestant must also answer a curl probe with 200 and a body of
# BENCH_SIZE bytes before each run. internal/cmd/benchreport turns the raw runs
# into BENCH_OUT and BENCH_PLOT. Every process started is stopped on exit,
# Ctrl-C or failure. The default run takes about 15 minutes.
set -euo pipefail
shopt -s inherit_errexit

# Debian keeps haproxy and nginx in /usr/sbin, which is not on every PATH.
PATH="$PATH:/usr/sbin:/sbin"

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

BENCH_PHASES_GIVEN=${BENCH_PHASES:+1}
BENCH_PHASES=${BENCH_PHASES:-open closed overload mesh}
BENCH_ROUNDS=${BENCH_ROUNDS:-3}
BENCH_DURATION=${BENCH_DURATION:-10s}
BENCH_CONNS=${BENCH_CONNS:-64 16}
BENCH_WARMUP=${BENCH_WARMUP:-2s}
BENCH_OPEN_RATE=${BENCH_OPEN_RATE:-1000}
BENCH_OPEN_DURATION=${BENCH_OPEN_DURATION:-20s}
BENCH_OPEN_CONNS=${BENCH_OPEN_CONNS:-32}
BENCH_OVERLOAD_DURATION=${BENCH_OVERLOAD_DURATION:-10s}
BENCH_OVERLOAD_LIMIT=${BENCH_OVERLOAD_LIMIT:-32}
BENCH_OVERLOAD_CONNS=${BENCH_OVERLOAD_CONNS:-64}
BENCH_OVERLOAD_QUEUE=${BENCH_OVERLOAD_QUEUE:-32}
BENCH_OVERLOAD_QUEUE_TIMEOUT=${BENCH_OVERLOAD_QUEUE_TIMEOUT:-5ms}
BENCH_CAPACITY=${BENCH_CAPACITY:-}
BENCH_SIZE=${BENCH_SIZE:-1024}
BENCH_OUT=${BENCH_OUT:-$ROOT/bench/results.md}
BENCH_PLOT=${BENCH_PLOT:-$ROOT/bench/latency.svg}
BENCH_KEEP_TMP=${BENCH_KEEP_TMP:-0}
SIDECAR_BIN=${SIDECAR_BIN:-}

readonly HOST=127.0.0.1
readonly PORT_ORIGIN=18080 PORT_HAPROXY=18002 PORT_NGINX=18003 PORT_LOOP=18004
# Each sidecar: outbound, admin, metrics, health.
readonly PORTS_SIDECAR=(18001 18000 18090 18020)
readonly PORTS_BARE=(18011 18010 18091 18021)
readonly PORTS_1CPU=(18041 18040 18093 18023)
readonly PORTS_OVERLOAD=(18031 18030 18092 18022)
readonly PORTS_QUEUED=(18051 18050 18094 18024)
readonly PORTS_ADAPTIVE=(18061 18060 18095 18025)
readonly PORTS_DEFAULTS=(18071 18070 18096 18026)
readonly PORTS_LOOPS=(18111 18110 18098 18028)
# Jaeger: OTLP gRPC, OTLP HTTP, query HTTP, query gRPC, health.
readonly PORTS_JAEGER=(18317 18318 18686 18685 18133)
# The mesh phase's Consul agent: HTTP, serf LAN, serf WAN, server RPC.
readonly PORTS_CONSUL=(18500 18501 18502 18503)
# Each mesh sidecar: outbound, admin, metrics, health, inbound, mesh inbound TLS.
readonly PORTS_PLAIN_A=(18201 18200 18290 18220 18202 18203)
readonly PORTS_PLAIN_B=(18211 18210 18291 18221 18212 18213)
readonly PORTS_MTLS_A=(18231 18230 18292 18222 18232 18233)
readonly PORTS_MTLS_B=(18241 18240 18293 18223 18242 18243)
readonly MESH_PAIRS=(mesh-plaintext mesh-mtls)
readonly TRACE_SERVICE=bench-sidecar
readonly CONTESTANTS=(direct sidecar sidecar-loops sidecar-bare sidecar-1cpu haproxy nginx loop-bare)
readonly WRK_THREADS=2
readonly READY_TRIES=200 # polls, 0.1 s apart
readonly READY_SECS=20
readonly STOP_TRIES=50 # x 0.1 s
readonly MESH_READY_SECS=60 # mesh-mtls calling over mutual TLS

WORK=""        # temp dir: bin/, conf/, logs/, nginx/, runs/
SIDECAR=""     # sidecar binary to run
JAEGER=""      # jaeger binary
CONSUL=""      # consul binary (mesh phase)
PIDS=()        # processes started, each the leader of its own process group
PID_NAMES=()   # names matching PIDS
declare -A PID_OF # contestant -> pid (process group)
CONNS=()       # parsed BENCH_CONNS
CLK_TCK=100
CAPACITY=""    # req/s the overload rates derive from
ARGS=()        # a command line, set by wrk_args and openloop_args

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
	PID_OF[$name]=$!
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

# stop NAME: stop one process started by start_bg, and forget it.
stop() {
	local i pid tries
	for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
		[[ ${PID_NAMES[i]} == "$1" ]] || continue
		pid=${PIDS[i]}
		if group_alive "$pid"; then
			log "stopping $1 (pid $pid)"
			signal_group TERM "$pid"
			for ((tries = 0; tries < STOP_TRIES; tries++)); do
				group_alive "$pid" || break
				sleep 0.1
			done
			if group_alive "$pid"; then
				log "$1 ignored SIGTERM for $((STOP_TRIES / 10)) s, killing it"
				signal_group KILL "$pid"
			fi
		fi
		wait "$pid" 2>/dev/null || true
		unset 'PIDS[i]' 'PID_NAMES[i]'
		PIDS=("${PIDS[@]}")
		PID_NAMES=("${PID_NAMES[@]}")
		unset "PID_OF[$1]"
		return 0
	done
}

stop_all() {
	while ((${#PID_NAMES[@]} > 0)); do
		stop "${PID_NAMES[-1]}"
	done
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
		if [[ $BENCH_KEEP_TMP == 1 ]] || ((rc != 0)); then
			log "kept temp dir $WORK (runs.tsv and runs/: the raw runs)"
		else
			rm -rf "$WORK"
		fi
	fi
	exit "$rc"
}

# ---- process figures ----------------------------------------------------------------

# group_pids PGID: the processes of process group PGID, one per line. The
# command name in /proc/PID/stat is in parentheses and may hold spaces, so
# fields are counted after its closing one.
group_pids() {
	awk -v g="$1" '{
		s = $0; sub(/^.*\) /, "", s); split(s, f, " ")
		if (f[3] == g) { p = FILENAME; sub(/^\/proc\//, "", p); sub(/\/stat$/, "", p); print p }
		nextfile
	}' /proc/[0-9]*/stat 2>/dev/null || true
}

# cpu_ticks PGID: user + system clock ticks of the group's processes.
cpu_ticks() {
	local pid total=0 t
	for pid in $(group_pids "$1"); do
		t=$(awk '{ s = $0; sub(/^.*\) /, "", s); split(s, f, " "); print f[12] + f[13] }' "/proc/$pid/stat" 2>/dev/null) || continue
		total=$((total + ${t:-0}))
	done
	echo "$total"
}

# reset_hwm PGID: reset the peak RSS of the group's processes to their
# current RSS (needs the right to write their clear_refs; root or owner).
reset_hwm() {
	local pid
	for pid in $(group_pids "$1"); do
		echo 5 >"/proc/$pid/clear_refs" 2>/dev/null || true
	done
}

# status_kb FIELD PGID: a /proc/PID/status field in KiB, summed over the
# group: VmHWM is the peak RSS; RssAnon the private memory now (heap, stacks
# and other anonymous pages; not the executable's code, which every process
# of the same binary shares).
status_kb() {
	local pid total=0 v
	for pid in $(group_pids "$2"); do
		v=$(awk -v f="$1:" '$1 == f { print $2 }' "/proc/$pid/status" 2>/dev/null) || continue
		total=$((total + ${v:-0}))
	done
	echo "$total"
}

# ---- checks -----------------------------------------------------------------------

port_in_use() { (: >"/dev/tcp/$HOST/$1") 2>/dev/null; }

require_free_port() {
	local p
	for p in "$@"; do
		if port_in_use "$p"; then
			die "$HOST:$p is already in use; stop whatever listens there first"
		fi
	done
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
	url="http://$(addr_of "$name")/"
	got=$(curl_probe "$url")
	[[ $got == "200 $BENCH_SIZE" ]] ||
		die "$name: expected '200 $BENCH_SIZE' (status, body bytes) from $url, got '${got}'"
}

# ---- contestants ----------------------------------------------------------------

addr_of() {
	case $1 in
	direct) echo "$HOST:$PORT_ORIGIN" ;;
	sidecar) echo "$HOST:${PORTS_SIDECAR[0]}" ;;
	sidecar-bare) echo "$HOST:${PORTS_BARE[0]}" ;;
	sidecar-loops) echo "$HOST:${PORTS_LOOPS[0]}" ;;
	sidecar-1cpu) echo "$HOST:${PORTS_1CPU[0]}" ;;
	sidecar-overload) echo "$HOST:${PORTS_OVERLOAD[0]}" ;;
	sidecar-queued) echo "$HOST:${PORTS_QUEUED[0]}" ;;
	sidecar-adaptive) echo "$HOST:${PORTS_ADAPTIVE[0]}" ;;
	sidecar-defaults) echo "$HOST:${PORTS_DEFAULTS[0]}" ;;
	mesh-plaintext) echo "$HOST:${PORTS_PLAIN_A[0]}" ;;
	mesh-mtls) echo "$HOST:${PORTS_MTLS_A[0]}" ;;
	haproxy) echo "$HOST:$PORT_HAPROXY" ;;
	nginx) echo "$HOST:$PORT_NGINX" ;;
	loop-bare) echo "$HOST:$PORT_LOOP" ;;
	*) die "unknown contestant $1" ;;
	esac
}

# write_sidecar_config FILE PORTS_ARRAY_NAME EXTRA_YAML: a sidecar on its
# default policy routing service "origin" to the origin.
write_sidecar_config() {
	local file=$1 extra=$3
	local -n ports=$2
	cat >"$file" <<EOF
listeners:
  outbound: $HOST:${ports[0]}
  admin: $HOST:${ports[1]}
  metrics: $HOST:${ports[2]}
  health: $HOST:${ports[3]}
discovery:
  static:
    origin: [$HOST:$PORT_ORIGIN]
lifecycle: {drainWindow: 100ms}
$extra
EOF
}

# The sidecar's tracing: its default sampler (parentbased_traceidratio at
# 0.01) exporting over OTLP gRPC to the Jaeger started here.
tracing_yaml() {
	cat <<EOF
tracing:
  endpoint: $HOST:${PORTS_JAEGER[0]}
  protocol: grpc
  sampler: parentbased_traceidratio
  samplerArg: 0.01
  serviceName: $TRACE_SERVICE
EOF
}

write_jaeger_config() {
	cat >"$WORK/conf/jaeger.yaml" <<EOF
service:
  extensions: [jaeger_storage, jaeger_query, healthcheckv2]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    logs:
      level: warn
    metrics:
      level: none
extensions:
  healthcheckv2:
    use_v2: true
    http:
      endpoint: $HOST:${PORTS_JAEGER[4]}
  jaeger_query:
    storage:
      traces: memstore
    enable_tracing: false
    http:
      endpoint: $HOST:${PORTS_JAEGER[2]}
    grpc:
      endpoint: $HOST:${PORTS_JAEGER[3]}
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 100000
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: $HOST:${PORTS_JAEGER[0]}
      http:
        endpoint: $HOST:${PORTS_JAEGER[1]}
processors:
  batch:
    timeout: 100ms
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
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
	start_bg direct "$WORK/bin/origin" -addr "$HOST:$PORT_ORIGIN" -size "$BENCH_SIZE"
	wait_ready origin "${PIDS[-1]}" "http://$(addr_of direct)/"
}

start_jaeger() {
	require_free_port "${PORTS_JAEGER[@]}"
	write_jaeger_config
	start_bg jaeger "$JAEGER" --config "$WORK/conf/jaeger.yaml"
	local i
	for ((i = 0; i < READY_TRIES; i++)); do
		alive "${PIDS[-1]}" || die "jaeger exited during startup"
		if curl --noproxy '*' -fsS -o /dev/null --max-time 1 "http://$HOST:${PORTS_JAEGER[2]}/api/services" 2>/dev/null; then
			log "jaeger is up"
			return 0
		fi
		sleep 0.1
	done
	die "jaeger's query API did not answer within $((READY_TRIES / 10)) s"
}

# start_sidecar NAME PORTS_ARRAY_NAME EXTRA_YAML [ENV=VALUE...]
start_sidecar() {
	local name=$1 extra=$3
	local -n sp=$2
	shift 3
	require_free_port "${sp[@]}"
	write_sidecar_config "$WORK/conf/$name.yaml" "${!sp}" "$extra"
	start_bg "$name" env "$@" "$SIDECAR" run --config "$WORK/conf/$name.yaml" --log-level warn
	wait_ready "$name" "${PIDS[-1]}" "http://$(addr_of "$name")/"
}

start_haproxy() {
	require_free_port "$PORT_HAPROXY"
	write_haproxy_config
	haproxy -c -q -f "$WORK/conf/haproxy.cfg" || die "haproxy rejects $WORK/conf/haproxy.cfg"
	start_bg haproxy haproxy -db -f "$WORK/conf/haproxy.cfg"
	wait_ready haproxy "${PIDS[-1]}" "http://$(addr_of haproxy)/"
}

start_loop() {
	require_free_port "$PORT_LOOP"
	start_bg loop-bare "$WORK/bin/loopfwd" -listen "$(addr_of loop-bare)" -upstream "$HOST:$PORT_ORIGIN"
	wait_ready loop-bare "${PIDS[-1]}" "http://$(addr_of loop-bare)/"
}

start_nginx() {
	local p=$WORK/nginx
	require_free_port "$PORT_NGINX"
	write_nginx_config
	nginx -t -q -p "$p/" -c "$p/nginx.conf" -e "$p/error.log" ||
		die "nginx rejects $p/nginx.conf"
	start_bg nginx nginx -p "$p/" -c "$p/nginx.conf" -e "$p/error.log"
	wait_ready nginx "${PIDS[-1]}" "http://$(addr_of nginx)/"
}

# ---- measured runs ----------------------------------------------------------------

# groups_of NAME: the process groups measured for contestant NAME: both
# sidecars of a mesh pair, else NAME's own.
groups_of() {
	case $1 in
	mesh-*) echo "${PID_OF[$1-a]} ${PID_OF[$1-b]}" ;;
	*) echo "${PID_OF[$1]}" ;;
	esac
}

# measured PHASE NAME LOAD ROUND RESULT CMD...: run the load generator CMD
# (its output in RESULT.log) while sampling NAME's processes, and record the
# run in runs.tsv (mesh.tsv for the mesh phase, which benchreport does not
# read) with RESULT (wrk's output, or openloop's JSON).
measured() {
	local phase=$1 name=$2 load=$3 round=$4 result=$5
	shift 5
	local pid c0=0 c1=0 cpu="" hwm="" anon="" gen rc=0 tsv=$WORK/runs.tsv
	local -a pids=()
	[[ $phase != mesh ]] || tsv=$WORK/mesh.tsv
	if [[ $name != direct ]]; then
		read -r -a pids <<<"$(groups_of "$name")"
		for pid in "${pids[@]}"; do
			group_alive "$pid" || die "$name (pid $pid) is not running"
			reset_hwm "$pid"
			c0=$((c0 + $(cpu_ticks "$pid")))
		done
	fi
	local TIMEFORMAT='%3U %3S'
	{ time "$@" >"$result.log" 2>&1; } 2>"$result.time" || rc=$?
	if ((${#pids[@]} > 0)); then
		hwm=0 anon=0
		for pid in "${pids[@]}"; do
			c1=$((c1 + $(cpu_ticks "$pid")))
			hwm=$((hwm + $(status_kb VmHWM "$pid")))
			anon=$((anon + $(status_kb RssAnon "$pid")))
		done
		cpu=$(awk -v a="$c0" -v b="$c1" -v t="$CLK_TCK" 'BEGIN { printf "%.3f", (b - a) / t }')
	fi
	if ((rc != 0)); then
		cat "$result.log" >&2
		die "$name: load generator failed (exit $rc): $*"
	fi
	gen=$(awk '{ printf "%.3f", $1 + $2 }' "$result.time")
	printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$phase" "$name" "$load" "$round" \
		"${result#"$WORK/"}" "$cpu" "$gen" "$hwm" "$anon" >>"$tsv"
}

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

# wrk_args NAME CONNS DURATION: the wrk command line of one run, in ARGS.
wrk_args() {
	ARGS=(wrk -t"$WRK_THREADS" -c"$2" -d"$3" --latency -H 'Host: origin' "http://$(addr_of "$1")/")
}

# openloop_args NAME RATE DURATION CONNS: the openloop command line of one
# run, in ARGS.
openloop_args() {
	ARGS=("$WORK/bin/openloop" -addr "$(addr_of "$1")" -host origin -rate "$2" -duration "$3" -conns "$4")
}

open_phase() {
	local name r f
	for name in "${CONTESTANTS[@]}"; do
		log "open-loop warm-up $name (3s at $BENCH_OPEN_RATE req/s)"
		check_contestant "$name"
		openloop_args "$name" "$BENCH_OPEN_RATE" 3s "$BENCH_OPEN_CONNS"
		"${ARGS[@]}" -strict -out "$WORK/runs/open-warmup-$name.json" >/dev/null ||
			die "$name: open-loop warm-up failed"
	done
	for ((r = 1; r <= BENCH_ROUNDS; r++)); do
		for name in "${CONTESTANTS[@]}"; do
			check_contestant "$name"
			f=$WORK/runs/open-$name-r$r.json
			openloop_args "$name" "$BENCH_OPEN_RATE" "$BENCH_OPEN_DURATION" "$BENCH_OPEN_CONNS"
			measured open "$name" "$BENCH_OPEN_RATE" "$r" "$f" "${ARGS[@]}" -strict -out "$f"
			log "open $BENCH_OPEN_RATE req/s round $r/$BENCH_ROUNDS $name: $(open_summary "$f")"
		done
	done
	check_traces
}

# open_summary FILE: p50/p99/p99.9 of an openloop result, in ms.
open_summary() {
	awk '/"latencyUs"/ { on = 1 } on && /"p50"|"p99"|"p999"/ { gsub(/[",:]/, ""); printf "%s %.3f ms  ", $1, $2 / 1000 } on && /}/ { exit }' "$1"
}

# check_traces: the sidecar's spans reached Jaeger (tracing was really on).
check_traces() {
	local services
	services=$(curl --noproxy '*' -fsS --max-time 5 "http://$HOST:${PORTS_JAEGER[2]}/api/services" || true)
	[[ $services == *"\"$TRACE_SERVICE\""* ]] ||
		die "Jaeger has no traces of $TRACE_SERVICE (services: ${services:-none}): the sidecar's tracing did not export"
	log "Jaeger holds traces of $TRACE_SERVICE"
}

warm_up_closed() {
	local name
	[[ $BENCH_WARMUP != 0 && $BENCH_WARMUP != 0s ]] || return 0
	for name in "${CONTESTANTS[@]}"; do
		log "closed-loop warm-up $name (${BENCH_WARMUP}, ${CONNS[0]} connections)"
		check_contestant "$name"
		wrk_args "$name" "${CONNS[0]}" "$BENCH_WARMUP"
		"${ARGS[@]}" >"$WORK/runs/warmup-$name.txt" 2>&1 || die "$name: wrk warm-up failed"
		check_wrk_output "$name" "$WORK/runs/warmup-$name.txt" >/dev/null
	done
}

closed_phase() {
	local c r name f rps
	warm_up_closed
	for c in "${CONNS[@]}"; do
		for ((r = 1; r <= BENCH_ROUNDS; r++)); do
			for name in "${CONTESTANTS[@]}"; do
				check_contestant "$name"
				f=$WORK/runs/closed-$name-c$c-r$r.txt
				wrk_args "$name" "$c" "$BENCH_DURATION"
				measured closed "$name" "$c" "$r" "$f" "${ARGS[@]}"
				mv -f "$f.log" "$f" # wrk's output is the result
				rps=$(check_wrk_output "$name" "$f")
				log "closed c=$c round $r/$BENCH_ROUNDS $name: $rps req/s"
			done
		done
	done
	if [[ -z $BENCH_CAPACITY ]]; then
		CAPACITY=$(for r in $(seq "$BENCH_ROUNDS"); do
			awk '/^Requests\/sec:/ { print $2 }' "$WORK/runs/closed-sidecar-c${CONNS[0]}-r$r.txt"
		done | sort -g | awk '{ v[NR] = $1 } END { printf "%.0f", (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }')
		log "sidecar capacity: $CAPACITY req/s (median at ${CONNS[0]} connections)"
	fi
}

# overload_variant CONTESTANT PORTS RUN WORDS RATE STRICT [POLICY]: a fresh
# sidecar, CONTESTANT on PORTS with tracing as every sidecar has it and
# POLICY after it in its configuration, warmed up (every answer a 2xx when
# STRICT is "strict"), then measured as RUN at RATE req/s; WORDS say which
# in the log.
overload_variant() {
	local name=$1 ports=$2 run=$3 words=$4 rate=$5 strict=$6 policy=${7:-} f
	start_sidecar "$name" "$ports" "$(tracing_yaml)$policy"
	check_contestant "$name"
	openloop_args "$name" "$BENCH_OPEN_RATE" 3s "$BENCH_OPEN_CONNS"
	"${ARGS[@]}" ${strict:+-strict} -out "$WORK/runs/${name#sidecar-}-warmup.json" >/dev/null || die "$name: warm-up failed"
	f=$WORK/runs/$run.json
	openloop_args "$name" "$rate" "$BENCH_OVERLOAD_DURATION" "$BENCH_OVERLOAD_CONNS"
	measured "$run" "$name" "$rate" 1 "$f" "${ARGS[@]}" -out "$f"
	log "overload $words at $rate req/s: $(grep -E '"(sent|ok|shed|errors)"' "$f" | tr -d ' \n')"
	stop "$name"
}

overload_phase() {
	local steady over f
	[[ -n $CAPACITY ]] || die "no capacity for the overload phase: run the closed phase or set BENCH_CAPACITY"
	steady=$((CAPACITY / 2))
	over=$((CAPACITY * 2))
	start_sidecar sidecar-overload PORTS_OVERLOAD "$(tracing_yaml)
policies:
  - service: \"*\"
    concurrency: {maxInFlight: $BENCH_OVERLOAD_LIMIT, maxQueued: 0}"
	check_contestant sidecar-overload
	openloop_args sidecar-overload "$BENCH_OPEN_RATE" 3s "$BENCH_OPEN_CONNS"
	"${ARGS[@]}" -strict -out "$WORK/runs/overload-warmup.json" >/dev/null || die "sidecar-overload: warm-up failed"
	f=$WORK/runs/steady.json
	openloop_args sidecar-overload "$steady" "$BENCH_OVERLOAD_DURATION" "$BENCH_OVERLOAD_CONNS"
	measured steady sidecar-overload "$steady" 1 "$f" "${ARGS[@]}" -out "$f"
	log "steady state at $steady req/s: $(open_summary "$f")"
	f=$WORK/runs/overload.json
	openloop_args sidecar-overload "$over" "$BENCH_OVERLOAD_DURATION" "$BENCH_OVERLOAD_CONNS"
	measured overload sidecar-overload "$over" 1 "$f" "${ARGS[@]}" -out "$f"
	log "overload at $over req/s: $(grep -E '"(sent|ok|shed|errors)"' "$f" | tr -d ' \n')"
	stop sidecar-overload

	overload_variant sidecar-queued PORTS_QUEUED overload-queued "with a line" "$over" strict "
policies:
  - service: \"*\"
    concurrency: {maxInFlight: $BENCH_OVERLOAD_LIMIT, maxQueued: $BENCH_OVERLOAD_QUEUE, queueTimeout: $BENCH_OVERLOAD_QUEUE_TIMEOUT}"
	overload_variant sidecar-adaptive PORTS_ADAPTIVE overload-adaptive "with an adaptive limit" "$over" "" "
policies:
  - service: \"*\"
    concurrency: {adaptive: true}"
	overload_variant sidecar-defaults PORTS_DEFAULTS overload-defaults "on the default policy" "$over" strict
}

# ---- mesh ------------------------------------------------------------------------------

# start_consul: a Consul dev agent (state in memory, Connect on with its
# built-in CA) on the bench's ports; up once it names a leader.
start_consul() {
	require_free_port "${PORTS_CONSUL[@]}"
	start_bg consul "$CONSUL" agent -dev -client "$HOST" -bind "$HOST" -log-level warn \
		-hcl "ports { http = ${PORTS_CONSUL[0]} serf_lan = ${PORTS_CONSUL[1]} serf_wan = ${PORTS_CONSUL[2]} server = ${PORTS_CONSUL[3]} dns = -1 grpc = -1 grpc_tls = -1 }" \
		-hcl 'disable_update_check = true'
	local i pid=${PIDS[-1]} leader=""
	for ((i = 0; i < READY_TRIES; i++)); do
		alive "$pid" || die "consul exited during startup"
		leader=$(curl --noproxy '*' -fsS --max-time 1 "http://$HOST:${PORTS_CONSUL[0]}/v1/status/leader" 2>/dev/null || true)
		if [[ $leader == '"'*:*'"' ]]; then
			log "consul is up (leader $leader)"
			return 0
		fi
		sleep 0.1
	done
	die "consul named no leader within $((READY_TRIES / 10)) s (last: '${leader}')"
}

# start_mesh_sidecar NAME PORTS_ARRAY_NAME YAML: a sidecar of the mesh phase
# with the listeners of PORTS_ARRAY_NAME and YAML (service, discovery,
# mesh); up once its /healthz/ready answers 200 (in the mesh: once it holds
# its certificate and its intentions).
start_mesh_sidecar() {
	local name=$1 body=$3
	local -n mp=$2
	require_free_port "${mp[@]}"
	cat >"$WORK/conf/$name.yaml" <<EOF
listeners:
  outbound: $HOST:${mp[0]}
  admin: $HOST:${mp[1]}
  metrics: $HOST:${mp[2]}
  health: $HOST:${mp[3]}
  inbound: $HOST:${mp[4]}
lifecycle: {drainWindow: 100ms}
$body
EOF
	start_bg "$name" "$SIDECAR" run --config "$WORK/conf/$name.yaml" --log-level warn
	wait_ready "$name" "${PIDS[-1]}" "http://$HOST:${mp[3]}/healthz/ready"
}

# mesh_yaml SERVICE PORTS_ARRAY_NAME: the settings of a sidecar in the mesh,
# fronting the origin as SERVICE.
mesh_yaml() {
	local -n mp=$2
	cat <<EOF
service: $1
appPort: $PORT_ORIGIN
advertiseAddr: $HOST
discovery:
  consul: {address: "$HOST:${PORTS_CONSUL[0]}", allowLoopbackEndpoints: true}
mesh: {mode: consul-connect, inboundTLS: "$HOST:${mp[5]}"}
EOF
}

# mesh_handshakes: the mutual-TLS handshakes mesh-mtls's B has accepted.
mesh_handshakes() {
	local m
	m=$(curl --noproxy '*' -fsS --max-time 2 "http://$HOST:${PORTS_MTLS_B[2]}/metrics" 2>/dev/null || true)
	awk '/^sidecar_mesh_handshakes_total\{/ && /direction="inbound"/ && /result="ok"/ { n += $NF }
		END { printf "%d\n", n }' <<<"$m"
}

# wait_mesh_route: mesh-mtls's A answers with the origin's body and B counts
# inbound handshakes: A found B's sidecar proxy in Consul and calls it over
# mutual TLS (B registers it, and Consul passes its checks, within seconds).
wait_mesh_route() {
	local got="" hs=0 deadline=$((SECONDS + MESH_READY_SECS))
	while ((SECONDS < deadline)); do
		got=$(curl_probe "http://$(addr_of mesh-mtls)/")
		hs=$(mesh_handshakes)
		if [[ $got == "200 $BENCH_SIZE" ]] && ((hs > 0)); then
			log "mesh-mtls routes over mutual TLS ($hs inbound handshakes at B)"
			return 0
		fi
		sleep 0.2
	done
	die "mesh-mtls: no call over mutual TLS within $MESH_READY_SECS s (last answer '${got}', B's inbound handshakes $hs)"
}

mesh_phase() {
	local c r name f rps h0 hs
	start_consul
	start_mesh_sidecar mesh-plaintext-b PORTS_PLAIN_B "service: origin
appPort: $PORT_ORIGIN"
	start_mesh_sidecar mesh-plaintext-a PORTS_PLAIN_A "discovery:
  static:
    origin: [$HOST:${PORTS_PLAIN_B[4]}]"
	start_mesh_sidecar mesh-mtls-b PORTS_MTLS_B "$(mesh_yaml origin PORTS_MTLS_B)"
	start_mesh_sidecar mesh-mtls-a PORTS_MTLS_A "$(mesh_yaml bench-client PORTS_MTLS_A)"
	check_contestant mesh-plaintext
	wait_mesh_route

	printf 'phase\tcontestant\tload\tround\tfile\tcpu_s\tgen_cpu_s\thwm_kb\tanon_kb\n' >"$WORK/mesh.tsv"
	printf 'contestant\tload\tround\thandshakes\n' >"$WORK/mesh-handshakes.tsv"
	for name in "${MESH_PAIRS[@]}"; do
		[[ $BENCH_WARMUP != 0 && $BENCH_WARMUP != 0s ]] || break
		log "mesh warm-up $name (${BENCH_WARMUP}, ${CONNS[0]} connections)"
		check_contestant "$name"
		wrk_args "$name" "${CONNS[0]}" "$BENCH_WARMUP"
		"${ARGS[@]}" >"$WORK/runs/mesh-warmup-$name.txt" 2>&1 || die "$name: wrk warm-up failed"
		check_wrk_output "$name" "$WORK/runs/mesh-warmup-$name.txt" >/dev/null
	done
	for c in "${CONNS[@]}"; do
		for ((r = 1; r <= BENCH_ROUNDS; r++)); do
			for name in "${MESH_PAIRS[@]}"; do
				check_contestant "$name"
				f=$WORK/runs/mesh-$name-c$c-r$r.txt
				h0=$(mesh_handshakes)
				wrk_args "$name" "$c" "$BENCH_DURATION"
				measured mesh "$name" "$c" "$r" "$f" "${ARGS[@]}"
				mv -f "$f.log" "$f" # wrk's output is the result
				rps=$(check_wrk_output "$name" "$f")
				hs=""
				if [[ $name == mesh-mtls ]]; then
					hs=$(($(mesh_handshakes) - h0))
				fi
				printf '%s\t%s\t%s\t%s\n' "$name" "$c" "$r" "$hs" >>"$WORK/mesh-handshakes.tsv"
				log "mesh c=$c round $r/$BENCH_ROUNDS $name: $rps req/s${hs:+, $hs handshakes at B}"
			done
		done
	done
	stop mesh-mtls-a
	stop mesh-mtls-b
	stop mesh-plaintext-a
	stop mesh-plaintext-b
	stop consul
}

# mesh_report: the markdown section of the mesh phase, from mesh.tsv, the
# handshake counts and wrk's outputs: per connection count, each pair's
# median req/s over the rounds, the latency of its median round (the lower
# median by req/s), both sidecars' CPU per 1000 requests (median) and peak
# RSS (largest), and mesh-mtls against mesh-plaintext.
mesh_report() {
	local consulv
	consulv=$("$CONSUL" version 2>/dev/null | head -n1 || true)
	cat <<EOF

## Mesh (two sidecars in line: plaintext vs mutual TLS)

wrk -> sidecar A -> sidecar B -> origin, both pairs in front of the same origin and interleaved in every round (wrk -t$WRK_THREADS -d$BENCH_DURATION --latency, $BENCH_ROUNDS round(s), $BENCH_WARMUP warm-up each). mesh-plaintext: A calls B's plaintext inbound listener (a static endpoint), mesh off. mesh-mtls: both sidecars in the mesh (mesh.mode consul-connect, identities from a ${consulv:-Consul} dev agent and its built-in CA), A finds B's sidecar proxy in Consul and calls it over mutual TLS, B authorizes each request by A's certificate and the intentions (none: the agent's default, allow). Both pairs speak HTTP/1.1 between the sidecars through the sidecar's own pooled transport, a connection per request in flight, over mutual TLS (ALPN http/1.1) or plaintext: the difference is mutual TLS. Every sidecar on its default policy, request metrics on, no tracing. Median req/s over the rounds; latency of the median round; CPU time of both sidecars per 1000 requests and their peak RSS summed (the Consul agent's not counted); handshakes: B's inbound mutual-TLS handshakes during the run (A's pooled connections, not one per request).

EOF
	awk -F'\t' -v work="$WORK" -v conns="${CONNS[*]}" -v pairs="${MESH_PAIRS[*]}" '
	function ms(v, u) {
		u = v; sub(/^[0-9.]+/, "", u); v += 0
		return u == "us" ? v / 1000 : u == "s" ? v * 1000 : v
	}
	function median(a, n, b, i, j, t) {
		if (n == 0) return ""
		for (i = 1; i <= n; i++) b[i] = a[i] + 0
		for (i = 2; i <= n; i++) {
			t = b[i]
			for (j = i - 1; j >= 1 && b[j] > t; j--) b[j + 1] = b[j]
			b[j + 1] = t
		}
		return n % 2 ? b[(n + 1) / 2] : (b[n / 2] + b[n / 2 + 1]) / 2
	}
	# medianRound: the round whose req/s is the lower median.
	function medianRound(k, n, i, j, t, o) {
		for (i = 1; i <= n; i++) o[i] = i
		for (i = 2; i <= n; i++) {
			t = o[i]
			for (j = i - 1; j >= 1 && R[k, o[j]] + 0 > R[k, t] + 0; j--) o[j + 1] = o[j]
			o[j + 1] = t
		}
		return o[int((n - 1) / 2) + 1]
	}
	function fmt(v, p) { return v == "" ? "–" : sprintf("%." p "f", v) }
	FNR == 1 { next }
	FILENAME ~ /mesh-handshakes/ { hs[$1, $2, $3] = $4; next }
	{
		k = $2 SUBSEP $3; i = ++n[k]
		file = work "/" $5; rr = req = p50 = p99 = ""
		while ((getline line < file) > 0) {
			sub(/^[ \t]+/, "", line)
			split(line, w, /[ \t]+/)
			if (line ~ /^Requests\/sec:/) rr = w[2]
			else if (line ~ /^[0-9]+ requests in /) req = w[1]
			else if (line ~ /^50% /) p50 = ms(w[2])
			else if (line ~ /^99% /) p99 = ms(w[2])
		}
		close(file)
		R[k, i] = rr; P50[k, i] = p50; P99[k, i] = p99
		C[k, i] = ($6 != "" && req > 0) ? $6 / req * 1000 : ""
		H[k, i] = hs[$2, $3, $4]
		if ($8 != "" && (!(k in M) || $8 + 0 > M[k])) M[k] = $8 + 0
	}
	END {
		nc = split(conns, cs, " "); np = split(pairs, ps, " ")
		print "| pair | connections | req/s | × plaintext | p50 (ms) | p99 (ms) | CPU s / 1000 req (A + B) | peak RSS (MB, A + B) | handshakes | req/s per round |"
		print "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
		for (x = 1; x <= nc; x++) {
			for (y = 1; y <= np; y++) {
				k = ps[y] SUBSEP cs[x]; m = n[k]
				if (!m) continue
				split("", a); split("", c); split("", h)
				per = ""
				for (i = 1; i <= m; i++) {
					a[i] = R[k, i]; c[i] = C[k, i]; h[i] = H[k, i]
					per = per (i > 1 ? ", " : "") sprintf("%.0f", R[k, i])
				}
				med = medianRound(k, m)
				rps[y, x] = median(a, m); cpu[y, x] = (c[1] == "" ? "" : median(c, m)); p99v[y, x] = P99[k, med]
				ratio = (rps[1, x] > 0) ? sprintf("%.2f", rps[y, x] / rps[1, x]) : "–"
				printf "| %s | %s | %.0f | %s | %s | %s | %s | %s | %s | %s |\n", ps[y], cs[x], rps[y, x], ratio,
					fmt(P50[k, med], 3), fmt(P99[k, med], 3), fmt(cpu[y, x], 3),
					((k in M) ? sprintf("%.1f", M[k] / 1024) : "–"), (h[1] == "" ? "–" : sprintf("%.0f", median(h, m))), per
			}
		}
		print ""
		for (x = 1; x <= nc; x++) {
			if (rps[1, x] == "" || rps[2, x] == "") continue
			printf "- %s connections: mutual TLS gives %.2f× the plaintext throughput, at %s× the CPU per request; p99 %+.3f ms against plaintext\n",
				cs[x], rps[2, x] / rps[1, x], (cpu[1, x] > 0 ? sprintf("%.2f", cpu[2, x] / cpu[1, x]) : "–"), p99v[2, x] - p99v[1, x]
		}
	}' "$WORK/mesh-handshakes.tsv" "$WORK/mesh.tsv"
}

# ---- main -----------------------------------------------------------------------------

header() {
	local wrkv jv
	wrkv=$(wrk -v 2>&1 | head -n1 | awk '{print $2}' || true)
	jv=$(basename "$(dirname "$(dirname "$(readlink -f "$JAEGER")")")")
	jv="Jaeger ${jv#jaeger-}"
	echo "# sidecar benchmark"
	echo
	echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ), host: $(uname -sr), cpus: $(nproc 2>/dev/null || echo '?'), everything (load generators, origin, proxies, Jaeger) on this machine's CPUs, on loopback"
	echo "- sidecar $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '(no commit)'), $(go env GOVERSION);" \
		"$(haproxy -v | head -n1 | awk '{print "HAProxy " $3}'); $(nginx -v 2>&1 | sed 's/.*: //'); wrk ${wrkv}; ${jv}"
	echo "- GET / with Host: origin, $BENCH_SIZE-byte bodies; phases: $BENCH_PHASES"
	wants_phase open || wants_phase closed || wants_phase overload || {
		echo "- reproduce: \`BENCH_PHASES='$BENCH_PHASES' bench/run.sh\`"
		return 0
	}
	echo "- contestants interleaved in every round: ${CONTESTANTS[*]}"
	echo "- sidecar: default policy, request metrics on, tracing at 1% (parentbased_traceidratio 0.01) exported over OTLP gRPC to Jaeger, GOMAXPROCS left to Go (the CPU count);" \
		"sidecar-loops: as sidecar, its outbound listener on the event-loop engine (outboundEngine: loops); sidecar-bare: tracing off, --request-metrics=false; sidecar-1cpu: as sidecar with GOMAXPROCS=1; HAProxy: nbthread 2, http-reuse always; nginx: 2 workers, upstream keepalive 64; loop-bare: internal/cmd/loopfwd, event loops (GOMAXPROCS of them) forwarding over an upstream connection per client connection, no policy, no telemetry"
	echo "- closed loop: wrk -t$WRK_THREADS -d$BENCH_DURATION --latency, connections ${CONNS[*]}, $BENCH_ROUNDS round(s), $BENCH_WARMUP warm-up each;" \
		"open loop: openloop at $BENCH_OPEN_RATE req/s for $BENCH_OPEN_DURATION over $BENCH_OPEN_CONNS connections, $BENCH_ROUNDS round(s)"
	echo "- reproduce: \`make bench\` (or \`bench/run.sh\`)"
}

parse_settings() {
	[[ $BENCH_ROUNDS =~ ^[1-9][0-9]*$ ]] || die "BENCH_ROUNDS must be a positive integer, got '$BENCH_ROUNDS'"
	[[ $BENCH_SIZE =~ ^[0-9]+$ ]] || die "BENCH_SIZE must be a non-negative integer, got '$BENCH_SIZE'"
	[[ $BENCH_OPEN_RATE =~ ^[1-9][0-9]*$ ]] || die "BENCH_OPEN_RATE must be a positive integer, got '$BENCH_OPEN_RATE'"
	[[ $BENCH_OVERLOAD_LIMIT =~ ^[1-9][0-9]*$ ]] || die "BENCH_OVERLOAD_LIMIT must be a positive integer, got '$BENCH_OVERLOAD_LIMIT'"
	[[ $BENCH_OVERLOAD_QUEUE =~ ^[0-9]+$ ]] || die "BENCH_OVERLOAD_QUEUE must be a non-negative integer, got '$BENCH_OVERLOAD_QUEUE'"
	[[ -z $BENCH_CAPACITY || $BENCH_CAPACITY =~ ^[1-9][0-9]*$ ]] || die "BENCH_CAPACITY must be a positive integer, got '$BENCH_CAPACITY'"
	CAPACITY=$BENCH_CAPACITY
	read -r -a CONNS <<<"$BENCH_CONNS"
	((${#CONNS[@]} > 0)) || die "BENCH_CONNS is empty"
	local c
	for c in "${CONNS[@]}"; do
		[[ $c =~ ^[0-9]+$ ]] && ((c >= WRK_THREADS)) ||
			die "BENCH_CONNS entries must be integers >= $WRK_THREADS, got '$c'"
	done
	for c in $BENCH_PHASES; do
		[[ $c == open || $c == closed || $c == overload || $c == mesh ]] ||
			die "unknown phase '$c' in BENCH_PHASES (open, closed, overload, mesh)"
	done
	case $BENCH_OUT in
	/*) ;;
	*) BENCH_OUT=$PWD/$BENCH_OUT ;;
	esac
	case $BENCH_PLOT in
	/*) ;;
	*) BENCH_PLOT=$PWD/$BENCH_PLOT ;;
	esac
	CLK_TCK=$(getconf CLK_TCK 2>/dev/null || echo 100)
}

build() {
	local t
	for t in origin openloop benchreport loopfwd; do
		log "building $t"
		go build -o "$WORK/bin/$t" "./internal/cmd/$t" || die "building ./internal/cmd/$t failed"
	done
	if [[ -n $SIDECAR_BIN ]]; then
		[[ -x $SIDECAR_BIN ]] || die "SIDECAR_BIN=$SIDECAR_BIN is not an executable file"
		SIDECAR=$SIDECAR_BIN
		log "using prebuilt sidecar $SIDECAR"
	else
		log "building sidecar (as the image builds the per-pod binary)"
		CGO_ENABLED=0 go build -tags noinjector -trimpath -ldflags "-s -w" -o "$WORK/bin/sidecar" ./cmd/sidecar ||
			die "building ./cmd/sidecar failed (SIDECAR_BIN=/path/to/sidecar uses a prebuilt one)"
		SIDECAR=$WORK/bin/sidecar
	fi
}

# wants_phase PHASE: PHASE is in BENCH_PHASES.
wants_phase() { [[ " $BENCH_PHASES " == *" $1 "* ]]; }

# find_consul: the cached Consul binary for the mesh phase. Asked for (in
# BENCH_PHASES) it must be there; by default the phase is skipped without
# it, since the bench tool set does not build Consul (the test set does).
find_consul() {
	wants_phase mesh || return 0
	if CONSUL=$(scripts/tools.sh path consul 2>/dev/null); then
		return 0
	fi
	[[ -z $BENCH_PHASES_GIVEN ]] ||
		die "the mesh phase needs the Consul binary, which is not built; run: scripts/tools.sh test"
	log "skipping the mesh phase: no Consul binary (scripts/tools.sh test builds it)"
	BENCH_PHASES=$(tr ' ' '\n' <<<"$BENCH_PHASES" | grep -vx mesh | tr '\n' ' ')
	BENCH_PHASES=${BENCH_PHASES% }
}

main() {
	parse_settings
	cd "$ROOT"
	trap cleanup EXIT
	trap 'log "interrupted"; exit 130' INT
	trap 'log "terminated"; exit 143' TERM

	scripts/tools.sh bench >/dev/null
	JAEGER=$(scripts/tools.sh path jaeger)
	find_consul
	have go || die "go is not on PATH"
	# The sidecars take their settings from the files written here only: no
	# Consul, collector or SIDECAR_* setting from the caller's environment.
	local v
	for v in $(compgen -e); do
		case $v in
		SIDECAR_BIN) export -n SIDECAR_BIN ;; # this script's own setting
		SIDECAR_* | OTEL_* | CONSUL_*) unset "$v" ;;
		esac
	done

	WORK=$(mktemp -d "${TMPDIR:-/tmp}/sidecar-bench.XXXXXX")
	# nginx workers drop to an unprivileged user when started as root.
	chmod 0755 "$WORK"
	mkdir -p "$WORK/bin" "$WORK/conf" "$WORK/logs" "$WORK/runs"
	log "temp dir $WORK"
	printf 'phase\tcontestant\tload\tround\tfile\tcpu_s\tgen_cpu_s\thwm_kb\tanon_kb\n' >"$WORK/runs.tsv"

	build
	start_origin
	# The mesh phase starts its own processes; the others share these.
	if wants_phase open || wants_phase closed || wants_phase overload; then
		start_jaeger
	fi
	if wants_phase open || wants_phase closed; then
		start_sidecar sidecar PORTS_SIDECAR "$(tracing_yaml)"
		start_sidecar sidecar-loops PORTS_LOOPS "$(tracing_yaml)
outboundEngine: loops"
		start_sidecar sidecar-bare PORTS_BARE "requestMetrics: false"
		start_sidecar sidecar-1cpu PORTS_1CPU "$(tracing_yaml)" GOMAXPROCS=1
		start_haproxy
		start_nginx
		start_loop
	fi

	local phase
	for phase in $BENCH_PHASES; do
		log "phase: $phase"
		"${phase}_phase"
	done

	header >"$WORK/header.md"
	local written=$BENCH_OUT
	if (($(wc -l <"$WORK/runs.tsv") > 1)); then
		"$WORK/bin/benchreport" -runs "$WORK/runs.tsv" -header "$WORK/header.md" \
			-capacity "${CAPACITY:-0}" -limit "concurrency.maxInFlight: $BENCH_OVERLOAD_LIMIT, maxQueued: 0 (no line; policy for \"*\")" \
			-queued "maxQueued: $BENCH_OVERLOAD_QUEUE, queueTimeout: $BENCH_OVERLOAD_QUEUE_TIMEOUT" \
			-adaptive "concurrency.adaptive: true, maxInFlight 1024 its ceiling" \
			-md "$BENCH_OUT" -svg "$BENCH_PLOT" || die "benchreport failed"
		written+=" and $BENCH_PLOT"
	else
		mkdir -p "$(dirname "$BENCH_OUT")"
		cp "$WORK/header.md" "$BENCH_OUT"
	fi
	if [[ -s $WORK/mesh.tsv ]]; then
		mesh_report >>"$BENCH_OUT" || die "the mesh report failed"
	fi
	echo
	cat "$BENCH_OUT"
	echo
	log "results written to $written"
}

main "$@"
