#!/usr/bin/env bash
# Benchmarks of a single node, printed as numbers (no pass/fail):
#   - durable write throughput and ack latency (p50/p99) over HTTP at each
#     concurrency in $CONCURRENCY (default "1,32");
#   - time to create $DOCS documents (default 10000);
#   - reopen time of a node holding them: process start to ready line;
#   - RSS of the node idle and holding those documents;
#   - with --p2p: propagation A -> B and A -> 5 nodes (p50/p99) and catch-up of a
#     fresh node to 10,000 docs over libp2p on loopback (cargo bench --bench propagation).
# Needs only the Rust toolchain; builds the release binary. Uses a temp data dir
# and a free loopback port; cleans up after itself.
set -euo pipefail

usage() {
  cat <<USAGE
usage: scripts/bench.sh [--seconds S] [--concurrency 1,32] [--docs N]
  --seconds S        seconds per throughput run (default 5)
  --concurrency LIST writer counts, comma separated (default 1,32)
  --docs N           documents for the reopen measurement (default 10000)
  --p2p              also run the peer-to-peer benchmark
USAGE
}

SECONDS_PER_RUN=5 CONCURRENCY=1,32 DOCS=10000 P2P=
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) SECONDS_PER_RUN=$2; shift 2 ;;
    --concurrency) CONCURRENCY=$2; shift 2 ;;
    --docs) DOCS=$2; shift 2 ;;
    --p2p) P2P=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
cargo build --release --quiet
BIN=target/release/mergeflow
WORK=$(mktemp -d)
PID=
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT

# Starts a node on $WORK/data; sets PID and API; prints milliseconds until ready.
start_node() {
  local t0 t1
  rm -f "$WORK/out"
  t0=$(date +%s%N)
  "$BIN" start --data-dir "$WORK/data" --api 127.0.0.1:0 --log-level error --no-mdns \
    --listen /ip4/127.0.0.1/tcp/0 >"$WORK/out" 2>"$WORK/err" &
  PID=$!
  until grep -q ' ready: ' "$WORK/out" 2>/dev/null; do
    kill -0 "$PID" 2>/dev/null || { cat "$WORK/err" >&2; exit 1; }
    sleep 0.005
  done
  t1=$(date +%s%N)
  API=$(grep -o 'api=[^ ]*' "$WORK/out" | cut -d= -f2)
  echo $(( (t1 - t0) / 1000000 ))
}

stop_node() { kill -TERM "$PID"; wait "$PID" || true; PID=; }

echo "machine: $(nproc) cores, $(uname -sr), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "data dir on: $(df -h "$WORK" | tail -1 | awk '{print $1}')"
start_node >/dev/null
echo "idle RSS, empty node: $(ps -o rss= -p "$PID" | xargs) KiB"
echo "== durable writes over HTTP (merge patch, 64 docs, ${SECONDS_PER_RUN}s per run)"
"$BIN" bench --api "$API" --concurrency "$CONCURRENCY" --seconds "$SECONDS_PER_RUN"
echo "== create $DOCS docs (32 writers)"
"$BIN" bench --api "$API" --fill "$DOCS"
DOCS_NOW=$("$BIN" status --api "$API" --json | grep -o '"docs": *[0-9]*' | grep -o '[0-9]*$')
echo "RSS after the runs above: $(ps -o rss= -p "$PID" | xargs) KiB"
stop_node
echo "== reopen of a node with $DOCS_NOW docs (start to ready, 3 runs)"
for i in 1 2 3; do
  start_node >"$WORK/ms"
  echo "reopen $i: $(cat "$WORK/ms") ms (docs served: $("$BIN" status --api "$API" --json | grep -o '"docs": *[0-9]*' | grep -o '[0-9]*$'), idle RSS $(ps -o rss= -p "$PID" | xargs) KiB)"
  stop_node
done
if [ -n "$P2P" ]; then
  echo "== peer to peer over libp2p on loopback"
  cargo bench --quiet --bench propagation 2>/dev/null | grep -v '^$'
fi
