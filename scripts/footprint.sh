#!/usr/bin/env bash
# Footprint of a node for edge devices (BENCHMARKS.md § Footprint): binary
# size, idle RSS, RSS with 10,000 docs, and the CPU and network bytes an idle
# pair of connected nodes uses, in light mode and with the defaults.
# Everything on loopback, in a temp dir. Prints numbers; asserts nothing.
#
# Usage: scripts/footprint.sh   (IDLE_SECS=60 DOCS=10000; MERGEFLOW_BIN=path
#        to measure a binary you built, else the release build;
#        MERGEFLOW_TOOLS_BIN=path of the mergeflow-tools that fills the node,
#        else the release build)
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;; esac

ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${MERGEFLOW_BIN:-}" ] || [ -z "${MERGEFLOW_TOOLS_BIN:-}" ]; then
    # Both workspace members: the node and mergeflow-tools.
    (cd "$ROOT" && cargo build --release --quiet)
fi
BIN=${MERGEFLOW_BIN:-$ROOT/target/release/mergeflow}
TOOLS=${MERGEFLOW_TOOLS_BIN:-$ROOT/target/release/mergeflow-tools}
IDLE_SECS=${IDLE_SECS:-60}
DOCS=${DOCS:-10000}
WORK=$(mktemp -d)
PIDS=()
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
die() { echo "footprint: $*" >&2; exit 1; }

# start NAME [flags]: sets STARTED_PID and STARTED_API once the node is
# ready. Call it in this shell, never in $(...) or <(...): a subshell's
# PIDS+= is lost, and the node would outlive the script.
start() {
    local name=$1; shift
    "$BIN" start --data-dir "$WORK/$name" --api 127.0.0.1:0 --listen /ip4/127.0.0.1/tcp/0 \
        --no-mdns --log-level warn "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" &
    STARTED_PID=$!
    PIDS+=("$STARTED_PID")
    for _ in $(seq 600); do
        if grep -q ' ready: ' "$WORK/$name.out"; then
            STARTED_API=$(sed -n 's/.* api=\([^ ]*\) .*/\1/p' "$WORK/$name.out")
            return
        fi
        kill -0 "$STARTED_PID" 2>/dev/null || die "node $name exited: $(cat "$WORK/$name.err")"
        sleep 0.1
    done
    die "node $name did not start: $(cat "$WORK/$name.err")"
}
rss_mib() { awk '/^VmRSS/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
wire_bytes() { # libp2p bytes on the wire, both directions, from /metrics
    curl -s "$1/metrics" | awk '/^libp2p_bandwidth_bytes_total/ { s += $2 } END { printf "%d", s }'
}
HZ=$(getconf CLK_TCK)

printf "binary: %s, %.1f MiB\n" "$BIN" "$(stat -c %s "$BIN" | awk '{ print $1 / 1048576 }')"
printf "%-8s %14s %14s %22s %22s\n" mode "idle RSS MiB" "RSS $DOCS docs" "idle CPU % (pair)" "idle bytes/s (pair)"
for mode in light default; do
    flags=()
    [ "$mode" = light ] && flags=(--light)
    start "$mode-a" "${flags[@]}"
    A_PID=$STARTED_PID A_API=$STARTED_API
    A_P2P=$("$BIN" status --api "$A_API" | awk '/^listen/ { print $2; exit }')
    start "$mode-b" "${flags[@]}" --peer "$A_P2P"
    B_PID=$STARTED_PID B_API=$STARTED_API
    sleep 5 # connected, first digests exchanged
    idle_rss=$(rss_mib "$A_PID")
    t0=$(cpu_ticks "$A_PID"); u0=$(cpu_ticks "$B_PID"); w0=$(wire_bytes "$A_API")
    sleep "$IDLE_SECS"
    t1=$(cpu_ticks "$A_PID"); u1=$(cpu_ticks "$B_PID"); w1=$(wire_bytes "$A_API")
    cpu=$(awk -v a=$((t1 - t0 + u1 - u0)) -v hz="$HZ" -v s="$IDLE_SECS" 'BEGIN { printf "%.2f", 100 * a / hz / s / 2 }')
    bps=$(awk -v b=$((w1 - w0)) -v s="$IDLE_SECS" 'BEGIN { printf "%.0f", b / s }')
    "$TOOLS" bench --fill "$DOCS" --api "$A_API" >/dev/null
    sleep 2
    full_rss=$(rss_mib "$A_PID")
    printf "%-8s %14s %14s %22s %22s\n" "$mode" "$idle_rss" "$full_rss" "$cpu per node" "$bps"
    kill "$A_PID" "$B_PID"; wait "$A_PID" "$B_PID" 2>/dev/null || true
done
