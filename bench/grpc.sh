#!/usr/bin/env bash
# bench/grpc.sh - gRPC load through the sidecar against the origin directly,
# with ghz (built by scripts/tools.sh bench), in one run.
#
# Usage:
#   bench/grpc.sh                                  # what `make bench` runs
#   GRPC_DURATION=3s GRPC_ROUNDS=1 bench/grpc.sh   # quick smoke run
#
# Environment (defaults in brackets):
#   GRPC_DURATION     ghz duration of each measured run [10s]
#   GRPC_ROUNDS       interleaved rounds [3]
#   GRPC_CONCURRENCY  ghz workers (over GRPC_CONNS connections) [32]
#   GRPC_CONNS        ghz connections [4]
#
# Starts on 127.0.0.1: grpcorigin :18190 (grpc.testing.TestService, UnaryCall
# echo of a 1 KiB payload, reflection) and the sidecar with outbound :18101,
# admin :18100 routing service grpc-origin to it. ghz calls UnaryCall on the
# origin directly and through the sidecar (authority grpc-origin), rounds
# interleaved; reported: median req/s, the ratio sidecar/direct, and p50/p99
# of the median runs. Fails on any error in a run.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GRPC_DURATION=${GRPC_DURATION:-10s}
GRPC_ROUNDS=${GRPC_ROUNDS:-3}
GRPC_CONCURRENCY=${GRPC_CONCURRENCY:-32}
GRPC_CONNS=${GRPC_CONNS:-4}

GHZ=$("$ROOT/scripts/tools.sh" path ghz)
TMP=$(mktemp -d)
PIDS=()
cleanup() {
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$TMP"
}
trap cleanup EXIT

(cd "$ROOT" && go build -o "$TMP/sidecar" ./cmd/sidecar && go build -o "$TMP/grpcorigin" ./internal/cmd/grpcorigin)
"$TMP/grpcorigin" -addr 127.0.0.1:18190 &
PIDS+=($!)
"$TMP/sidecar" run --outbound-addr 127.0.0.1:18101 --admin-addr 127.0.0.1:18100 --metrics-addr 127.0.0.1:18191 \
	--health-addr 127.0.0.1:18120 --static grpc-origin=127.0.0.1:18190 --log-level warn --drain-window 1ms &
PIDS+=($!)
for _ in $(seq 100); do
	curl -fsS -o /dev/null http://127.0.0.1:18100/version 2>/dev/null && break
	sleep 0.1
done

payload='{"payload":{"body":"'$(head -c 1024 /dev/zero | tr '\0' 'a' | base64 -w0)'"}}'
run() { # run NAME TARGET [ghz args...]: prints "rps p50ms p99ms"
	local name=$1 target=$2
	shift 2
	# --duration-stop=wait: the calls in flight when the time is up finish
	# before ghz closes its connections, so every failed call is a failure.
	"$GHZ" --insecure --call grpc.testing.TestService/UnaryCall -d "$payload" -z "$GRPC_DURATION" --duration-stop=wait \
		-c "$GRPC_CONCURRENCY" --connections "$GRPC_CONNS" -O json "$@" "$target" >"$TMP/$name.json"
	python3 - "$TMP/$name.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
errs = sum(v for k, v in r.get("statusCodeDistribution", {}).items() if k != "OK")
if errs:
    sys.exit("ghz: %d calls failed: %s" % (errs, r.get("errorDistribution")))
lat = {d["percentage"]: d["latency"] / 1e6 for d in r["latencyDistribution"]}
print("%.0f %.3f %.3f" % (r["rps"], lat[50], lat[99]))
PY
}

declare -A RES
for round in $(seq "$GRPC_ROUNDS"); do
	RES[direct,$round]=$(run direct 127.0.0.1:18190)
	RES[sidecar,$round]=$(run sidecar 127.0.0.1:18101 --authority grpc-origin)
	echo "round $round: direct ${RES[direct,$round]}  sidecar ${RES[sidecar,$round]}" >&2
done
median() { # median NAME: the run with the median req/s
	for r in $(seq "$GRPC_ROUNDS"); do echo "${RES[$1,$r]}"; done | sort -n | sed -n "$(((GRPC_ROUNDS + 1) / 2))p"
}
read -r drps dp50 dp99 <<<"$(median direct)"
read -r srps sp50 sp99 <<<"$(median sidecar)"
echo
echo "| gRPC unary (ghz, ${GRPC_CONCURRENCY} workers, ${GRPC_CONNS} connections, 1 KiB) | req/s | ratio | p50 (ms) | p99 (ms) |"
echo "|---|---:|---:|---:|---:|"
echo "| direct | $drps | 1.00 | $dp50 | $dp99 |"
echo "| sidecar | $srps | $(python3 -c "print('%.2f' % ($srps / $drps))") | $sp50 | $sp99 |"
echo
echo "target: gRPC through the sidecar ≥ 0.5× direct: $(python3 -c "r = $srps / $drps; print('%.2f×, %s' % (r, '**met**' if r >= 0.5 else '**not met**'))")"
