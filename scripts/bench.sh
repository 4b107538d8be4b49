#!/usr/bin/env bash
# Benchmarks of a single node, printed as numbers (no pass/fail):
#   - durable write throughput and ack latency (p50/p99) over HTTP at each
#     concurrency in $CONCURRENCY (default "1,32");
#   - time to create $DOCS documents (default 10000);
#   - reopen time of a node holding them: process start to ready line;
#   - RSS of the node idle and holding those documents;
#   - with --catchup: a fresh node started next to the node holding them,
#     until it holds the same docs at the same heads: time, bytes, RSS;
#   - with --p2p: propagation A -> B and A -> 5 nodes (p50/p99) and catch-up of a
#     fresh node to 10,000 docs over libp2p on loopback (cargo bench --bench propagation).
# Needs only the Rust toolchain; builds the release binary. Uses a temp data dir
# and a free loopback port; cleans up after itself.
#
# With --idle (root only; instead of the benchmarks above) it runs two nodes in
# network namespaces with scripts/netns-cluster.sh and measures, with $DOCS docs:
#   - idle traffic of the in-sync pair: bytes and packets on node 1's host veth
#     mf-v1 (both directions = all traffic of the pair) over $IDLE_SECONDS
#     (default 120) after a settle time of $IDLE_SETTLE (default 40) seconds,
#     with per-10 s counts;
#   - RSS of each node, idle;
#   - restart cost of node 1 (kill -9, restart): bytes exchanged between the
#     nodes and seconds until wait-converged succeeds; once in sync, once with
#     $RESTART_CHANGES (default 100) docs changed on node 2 while node 1 was down.
# Node-to-node bytes are counted with iptables rules in node 1's namespace
# (these exclude the host's API calls, e.g. wait-converged's status polling).
# The cluster is always taken down at the end; node logs are copied to a temp
# dir first (printed). Refuses to start when an mf-* cluster already exists.
#
# With --compare (instead of the benchmarks above) it builds and runs
# benches/compare, its own crate: mergeflow, samod (the Rust automerge-repo,
# from crates.io) and raw Automerge sync over a plain TCP socket with no
# storage, two peers each on loopback, one workload: propagation p50/p99
# (and of the first and last tenth), a sustained stream into a doc with
# history, replicated write throughput, catch-up of a fresh peer, and bytes
# on the wire for each; then the ratios mergeflow/samod and mergeflow/raw.
# Env: WARMUP (200), WRITES (2000), PREFILL (10000), STREAM_RATE (2000),
# STREAM_SECS (10), TPUT (10000), TPUT_DOCS (100), CATCHUP (10000),
# CATCHUP_CHANGES (10), ONLY. samod takes about 11 minutes of it.
set -euo pipefail

usage() {
  cat <<USAGE
usage: scripts/bench.sh [--seconds S] [--concurrency 1,32] [--docs N] [--p2p]
       scripts/bench.sh --idle [--docs N]      (as root)
       scripts/bench.sh --compare
       scripts/bench.sh --bridge
  --seconds S        seconds per throughput run (default 5)
  --concurrency LIST writer counts, comma separated (default 1,32)
  --docs N           documents for the reopen measurement, or with --idle the
                     documents the two nodes hold (default 10000, or \$DOCS)
  --p2p              also run the peer-to-peer benchmark
  --catchup          also time a fresh node catching up from the node holding
                     the --docs docs over loopback (real processes; needs jq
                     and curl; env CATCHUP_TIMEOUT=1800 seconds)
  --compare          only run mergeflow, samod and raw Automerge over TCP
                     side by side (benches/compare; env: WARMUP=200
                     WRITES=2000 PREFILL=10000 STREAM_RATE=2000
                     STREAM_SECS=10 TPUT=10000 TPUT_DOCS=100
                     CATCHUP=10000 CATCHUP_CHANGES=10
                     ONLY=mergeflow,samod,raw)
  --bridge           only the bridges: MQTT readings in (throughput, and
                     latency to a second node at a rate) and pulls from a
                     local HTTP source (benches/bridge.rs; env: READINGS
                     RATE SECONDS BATCHES ONLY=mqtt|pull; needs mosquitto)
  --idle             only measure idle traffic, RSS and restart cost of two
                     in-sync nodes in network namespaces (needs root; env:
                     IDLE_SECONDS=120 IDLE_SETTLE=40 RESTART_TAIL=15
                     RESTART_CHANGES=100 CONVERGE_TIMEOUT=300)
  MERGEFLOW_BIN=path   bench that binary (and mergeflow-tools next to it)
                     instead of building target/release (not --compare,
                     --bridge)
USAGE
}

SECONDS_PER_RUN=5 CONCURRENCY=1,32 DOCS=${DOCS:-10000} P2P='' IDLE='' COMPARE='' BRIDGE='' CATCHUP=''
CATCHUP_TIMEOUT=${CATCHUP_TIMEOUT:-1800}
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) SECONDS_PER_RUN=$2; shift 2 ;;
    --concurrency) CONCURRENCY=$2; shift 2 ;;
    --docs) DOCS=$2; shift 2 ;;
    --p2p) P2P=1; shift ;;
    --catchup) CATCHUP=1; shift ;;
    --idle) IDLE=1; shift ;;
    --compare) COMPARE=1; shift ;;
    --bridge) BRIDGE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

# ---- --idle: two nodes in network namespaces (scripts/netns-cluster.sh) ----
IDLE_SECONDS=${IDLE_SECONDS:-120} IDLE_SETTLE=${IDLE_SETTLE:-40} RESTART_TAIL=${RESTART_TAIL:-15}
RESTART_CHANGES=${RESTART_CHANGES:-100} CONVERGE_TIMEOUT=${CONVERGE_TIMEOUT:-300}
IDLE_STATE='' CLUSTER_UP=''

cluster() { MF_CLUSTER_ID=0 MF_CLUSTER_DIR=$IDLE_STATE MERGEFLOW_BIN=$BIN scripts/netns-cluster.sh "$@"; }
now() { date +%s.%N; }
since() { awk -v a="$(now)" -v b="$1" 'BEGIN { printf "%.1f", a - b }'; }
# Host veth mf-vI counters: "rx_bytes tx_bytes rx_packets tx_packets";
# rx = sent by node I, tx = received by node I.
veth() {
  local d=/sys/class/net/mf-v$1/statistics
  echo "$(<"$d/rx_bytes") $(<"$d/tx_bytes") $(<"$d/rx_packets") $(<"$d/tx_packets")"
}
# Node-to-node IP traffic seen in node 1's namespace (excludes the host's API
# calls): "bytes_1to2 bytes_2to1 packets_1to2 packets_2to1".
acct_setup() {
  local ipt=(ip netns exec mf-n1 iptables -w)
  "${ipt[@]}" -N MF-BENCH
  "${ipt[@]}" -A MF-BENCH -s 10.77.0.11 -d 10.77.0.12 -j RETURN
  "${ipt[@]}" -A MF-BENCH -s 10.77.0.12 -d 10.77.0.11 -j RETURN
  "${ipt[@]}" -I OUTPUT 1 -j MF-BENCH
  "${ipt[@]}" -I INPUT 1 -j MF-BENCH
}
acct() {
  ip netns exec mf-n1 iptables-save -c -t filter | tr '[]:' '   ' | awk '
    / -A MF-BENCH -s 10\.77\.0\.11\/32 -d 10\.77\.0\.12\/32 / { ob = $2; op = $1 }
    / -A MF-BENCH -s 10\.77\.0\.12\/32 -d 10\.77\.0\.11\/32 / { ib = $2; ipk = $1 }
    END { print ob + 0, ib + 0, op + 0, ipk + 0 }'
}
# diff "A" "B": field-wise B - A of two counter lines.
diff4() { awk -v a="$1" -v b="$2" 'BEGIN { n = split(a, x); split(b, y); for (i = 1; i <= n; i++) printf "%s%d", (i > 1 ? " " : ""), y[i] - x[i]; print "" }'; }
rss_line() {
  local i=$1 pid
  pid=$(cat "$IDLE_STATE/n$i/pid")
  awk -v i="$i" -v pid="$pid" '/^VmRSS/ { r = $2 } /^VmHWM/ { h = $2 }
    END { printf "node %d (pid %d): VmRSS %d KiB (peak VmHWM %d KiB)\n", i, pid, r, h }' "/proc/$pid/status"
}

idle_cleanup() {
  local rc=$? i f logs
  set +e
  trap - EXIT INT TERM
  if [ -n "$CLUSTER_UP" ]; then
    logs=$(mktemp -d /tmp/mergeflow-bench-idle-logs.XXXXXX)
    for i in 1 2; do
      f=$IDLE_STATE/n$i/log
      [ -f "$f" ] || continue
      cp "$f" "$logs/n$i.log"
      echo "node $i log: $(grep -c ' WARN ' "$f") WARN, $(grep -c ' ERROR ' "$f") ERROR lines (most frequent below)"
      grep -E ' (WARN|ERROR) ' "$f" | sed -E 's/^[0-9TZ:.-]+ +//; s/12D3KooW[1-9A-Za-z]+/<peer>/g' | cut -c1-200 \
        | sort | uniq -c | sort -rn | head -n 5 | sed 's/^/  /'
    done
    echo "node logs kept in $logs"
    cluster down >/dev/null || echo "bench.sh: scripts/netns-cluster.sh down failed" >&2
  fi
  [ -n "$IDLE_STATE" ] && rm -rf -- "$IDLE_STATE"
  exit "$rc"
}

# restart_run LABEL CHANGES: kill -9 node 1, change CHANGES docs on node 2
# meanwhile, restart node 1, and measure bytes and seconds to convergence.
restart_run() {
  local label=$1 changes=$2 a0 a1 a2 v0 v2 t0 tr tc out d1 d2 dv url2 stamp
  cluster kill 1 >/dev/null
  if [ "$changes" -gt 0 ]; then
    url2=$(cluster url 2)
    stamp=$(date +%s%N)
    seq 0 $((changes - 1)) | xargs -P 16 -I{} curl -sf -o /dev/null -X PATCH \
      -H "authorization: Bearer $MERGEFLOW_API_TOKEN" -H 'content-type: application/merge-patch+json' -d "{\"changed\": $stamp}" "$url2/v1/docs/fill%2Fdoc-{}"
  fi
  a0=$(acct)
  v0=$(veth 1)
  t0=$(now)
  cluster restart 1 >/dev/null
  tr=$(since "$t0")
  out=$(cluster wait-converged --timeout "$CONVERGE_TIMEOUT")
  tc=$(since "$t0")
  a1=$(acct)
  sleep "$RESTART_TAIL"
  a2=$(acct)
  v2=$(veth 1)
  d1=$(diff4 "$a0" "$a1")
  d2=$(diff4 "$a1" "$a2")
  dv=$(diff4 "$v0" "$v2")
  echo "$label: $(diff4 "$a0" "$a2" | awk '{ print $1 + $2 }') bytes exchanged, $tc s to converge"
  echo "  node 1 ready after $tr s; node-to-node IP bytes until converged: $(echo "$d1" | awk '{ printf "%d (n1->n2 %d, n2->n1 %d, %d packets)", $1 + $2, $1, $2, $3 + $4 }')," \
    "in the next ${RESTART_TAIL}s: $(echo "$d2" | awk '{ printf "%d (%d packets)", $1 + $2, $3 + $4 }');" \
    "host veth mf-v1 incl. the API polling: $(echo "$dv" | awk '{ printf "%d bytes", $1 + $2 }')"
  echo "  wait-converged: $out"
}

# Checks run before the build: tools present, no mf-* cluster running (its
# namespace names are global; this script must not take someone's cluster down).
idle_precheck() {
  local existing i
  existing=$(ip netns list 2>/dev/null | awk '{ print $1 }' | grep -E '^mf-n[0-9]+$' | tr '\n' ' ' || true)
  if [ -n "$existing" ] || ip link show mf-br0 >/dev/null 2>&1; then
    echo "bench.sh --idle: an mf-* cluster already exists (namespaces: ${existing:-none}); not touching it." \
      "Take it down (scripts/netns-cluster.sh down, with its MF_CLUSTER_DIR) and retry." >&2
    exit 1
  fi
  for i in ip iptables-save curl jq xargs; do
    command -v "$i" >/dev/null || { echo "bench.sh --idle: $i not found" >&2; exit 1; }
  done
}

idle_bench() {
  local t0 end next cur prev v0 v1 a0 a1 dur
  IDLE_STATE=$(mktemp -d /tmp/mergeflow-bench-idle.XXXXXX)
  trap idle_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM

  echo "machine: $(nproc) cores, $(uname -sr), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
  echo "== idle: 2 nodes in network namespaces (scripts/netns-cluster.sh, state $IDLE_STATE), $DOCS docs"
  cluster up 2 | sed 's/^/  /'
  # From here on, `down` at exit. A failed `up` cleaned up after itself, and
  # one refused because a cluster 0 appeared during the build is not ours.
  CLUSTER_UP=1
  # The nodes' APIs listen off loopback, so they need the cluster's token
  # (the CLI sends MERGEFLOW_API_TOKEN).
  MERGEFLOW_API_TOKEN=$(cluster token)
  export MERGEFLOW_API_TOKEN
  acct_setup
  echo "  $("$TOOLS" bench --api "$(cluster url 1)" --fill "$DOCS") on node 1"
  echo "  $(cluster wait-converged --timeout "$CONVERGE_TIMEOUT")"
  echo "  settling ${IDLE_SETTLE}s, then counting ${IDLE_SECONDS}s on host veth mf-v1 (from n1 = sent by node 1)"
  sleep "$IDLE_SETTLE"

  t0=$(now)
  v0=$(veth 1)
  a0=$(acct)
  end=$(awk -v t="$t0" -v s="$IDLE_SECONDS" 'BEGIN { printf "%.3f", t + s }')
  next=$(awk -v t="$t0" 'BEGIN { printf "%.3f", t }')
  prev=$v0
  while [ "$next" != "$end" ]; do
    next=$(awk -v n="$next" -v e="$end" 'BEGIN { n += 10; if (n > e) n = e; printf "%.3f", n }')
    sleep "$(awk -v n="$next" -v t="$(now)" 'BEGIN { d = n - t; printf "%.3f", (d > 0 ? d : 0) }')"
    cur=$(veth 1)
    diff4 "$prev" "$cur" | awk -v t="$(since "$t0")" \
      '{ printf "  t=%6.1fs: from n1 %7d B (%4d pkts), to n1 %7d B (%4d pkts)\n", t, $1, $3, $2, $4 }'
    prev=$cur
  done
  dur=$(since "$t0")
  v1=$(veth 1)
  a1=$(acct)
  diff4 "$v0" "$v1" | awk -v s="$dur" -v d="$DOCS" '{
    printf "idle traffic between 2 in-sync peers with %d docs: %.0f B/s (%.1f packets/s) over %.0f s\n", d, ($1 + $2) / s, ($3 + $4) / s, s
    printf "  from node 1 %.0f B/s (%.1f pkts/s), to node 1 %.0f B/s (%.1f pkts/s); target <= 1024 B/s: %s\n", $1 / s, $3 / s, $2 / s, $4 / s, (($1 + $2) / s <= 1024 ? "met" : "NOT met") }'
  diff4 "$a0" "$a1" | awk -v s="$dur" '{
    printf "  node-to-node IP bytes (iptables in mf-n1): n1->n2 %.0f B/s, n2->n1 %.0f B/s, avg packet %.0f B\n", $1 / s, $2 / s, ($3 + $4 > 0 ? ($1 + $2) / ($3 + $4) : 0) }'
  echo "== RSS idle with $DOCS docs"
  rss_line 1
  rss_line 2
  echo "== restart of node 1 (kill -9, restart, until wait-converged succeeds; bytes include ${RESTART_TAIL}s after)"
  restart_run "restart of an in-sync node ($DOCS docs)" 0
  restart_run "restart of a node that missed $RESTART_CHANGES changes made on node 2 ($DOCS docs)" "$RESTART_CHANGES"
  echo "== RSS after the restarts"
  rss_line 1
  rss_line 2
}

if [ -n "$IDLE" ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "bench.sh --idle must run as root (it creates network namespaces, veths and a bridge" \
      "with scripts/netns-cluster.sh); try: sudo $0 --idle" >&2
    exit 1
  fi
  [[ $DOCS =~ ^[1-9][0-9]*$ ]] || { echo "bad --docs/DOCS '$DOCS' (want a positive integer)" >&2; exit 2; }
  idle_precheck
fi

cd "$(dirname "$0")/.."
if [ -n "$BRIDGE" ]; then
  echo "== bridges: MQTT in (a real Mosquitto) and pulls from HTTP ($(nproc) cores, $(uname -sr))"
  cargo bench --bench bridge
  exit 0
fi
if [ -n "$COMPARE" ]; then
  echo "== mergeflow, samod and raw Automerge sync over TCP, side by side ($(nproc) cores, $(uname -sr))"
  cargo run --release --quiet --manifest-path benches/compare/Cargo.toml
  exit 0
fi
# Both workspace members: the node and mergeflow-tools (its `bench`); or
# the binaries named by MERGEFLOW_BIN (mergeflow-tools next to it), as built
# before (to compare two builds).
if [ -n "${MERGEFLOW_BIN:-}" ]; then
  BIN=$MERGEFLOW_BIN
  TOOLS=$(dirname "$BIN")/mergeflow-tools
else
  cargo build --release --quiet
  BIN=${CARGO_TARGET_DIR:-target}/release/mergeflow
  TOOLS=${CARGO_TARGET_DIR:-target}/release/mergeflow-tools
fi
if [ -n "$IDLE" ]; then
  idle_bench
  exit 0
fi
WORK=$(mktemp -d)
PID= A_PID= B_PID=
cleanup() {
  local p
  for p in $PID $A_PID $B_PID; do kill "$p" 2>/dev/null; done
  wait 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

# Starts a node on $WORK/data (or the data dir $1, with more start arguments
# after it); sets PID and API; prints milliseconds until ready.
start_node() {
  local t0 t1 dir=${1:-$WORK/data}
  shift || true
  rm -f "$WORK/out"
  t0=$(date +%s%N)
  "$BIN" start --data-dir "$dir" --api 127.0.0.1:0 --log-level error --no-mdns \
    --listen /ip4/127.0.0.1/tcp/0 "$@" >"$WORK/out" 2>"$WORK/err" &
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
"$TOOLS" bench --api "$API" --concurrency "$CONCURRENCY" --seconds "$SECONDS_PER_RUN"
echo "== create $DOCS docs (32 writers)"
"$TOOLS" bench --api "$API" --fill "$DOCS"
DOCS_NOW=$("$BIN" status --api "$API" --json | grep -o '"docs": *[0-9]*' | grep -o '[0-9]*$')
echo "RSS after the runs above: $(ps -o rss= -p "$PID" | xargs) KiB"
stop_node
echo "== reopen of a node with $DOCS_NOW docs (start to ready, 3 runs)"
for i in 1 2 3; do
  start_node >"$WORK/ms"
  echo "reopen $i: $(cat "$WORK/ms") ms (docs served: $("$BIN" status --api "$API" --json | grep -o '"docs": *[0-9]*' | grep -o '[0-9]*$'), idle RSS $(ps -o rss= -p "$PID" | xargs) KiB)"
  stop_node
done
if [ -n "$CATCHUP" ]; then
  # A fresh node dials the node holding the docs; done when it holds as
  # many docs and both digests are equal (every doc at the same heads).
  echo "== catch-up of a fresh node from the node with $DOCS_NOW docs (loopback)"
  start_node >/dev/null
  A_PID=$PID A_API=$API
  A_ADDR=$("$BIN" status --api "$A_API" --json | jq -r '.listen_addrs[0]')
  start_node "$WORK/fresh" --peer "$A_ADDR" >/dev/null
  B_PID=$PID B_API=$API
  t0=$(date +%s%N)
  deadline=$((t0 + CATCHUP_TIMEOUT * 1000000000))
  a_digest=$("$BIN" status --api "$A_API" --json | jq -r .digest)
  while :; do
    b=$("$BIN" status --api "$B_API" --json | jq -r '"\(.docs) \(.digest)"')
    [ "$b" = "$DOCS_NOW $a_digest" ] && break
    [ "$(date +%s%N)" -lt "$deadline" ] || { echo "catch-up: not done after ${CATCHUP_TIMEOUT}s (fresh node: $b)" >&2; break; }
    sleep 0.2
  done
  t1=$(date +%s%N)
  sent=$(curl -sf "$A_API/metrics" | awk '/^mergeflow_peer_traffic_bytes_total\{.*direction="out"/ { s += $NF } END { printf "%d", s }')
  echo "catch-up of $DOCS_NOW docs: $(( (t1 - t0) / 1000000 )) ms (polled every 0.2 s), $sent bytes sent by the full node ($(( sent / DOCS_NOW )) per doc)"
  echo "RSS: full node $(ps -o rss= -p "$A_PID" | xargs) KiB (peak $(awk '/^VmHWM/ { print $2 }' /proc/"$A_PID"/status) KiB)," \
    "fresh node $(ps -o rss= -p "$B_PID" | xargs) KiB (peak $(awk '/^VmHWM/ { print $2 }' /proc/"$B_PID"/status) KiB)"
  echo "docs in memory at once on the fresh node: $("$BIN" status --api "$B_API" --json | jq -r '"\(.docs_cached_peak) at most, \(.docs_cached) now"')"
  stop_node
  PID=$A_PID
  stop_node
  A_PID= B_PID=
fi
if [ -n "$P2P" ]; then
  echo "== peer to peer over libp2p on loopback"
  cargo bench --quiet --bench propagation 2>/dev/null | grep -v '^$'
fi
