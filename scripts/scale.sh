#!/usr/bin/env bash
# scale.sh: how convergence and traffic grow with the cluster. Run as root.
#
# usage: scripts/scale.sh [--nodes 5,10,20] [--docs 10000]
#
# For each cluster size N it starts N nodes in network namespaces
# (scripts/netns-cluster.sh, every node dialing every other), creates --docs
# documents spread evenly over the nodes (`mergeflow-tools bench --fill` against
# each node at once, 32 writers each), and prints:
#   - seconds to write them all (every write acknowledged by its node);
#   - seconds from the last acknowledged write until every node has the same
#     digest (scripts/netns-cluster.sh wait-converged, polled every 0.5 s);
#   - messages and bytes the nodes sent each other, per write: the sum over
#     nodes of mergeflow_peer_messages_total / mergeflow_peer_traffic_bytes_total
#     {direction="out"} (frames of our protocol, not TCP/IP overhead);
#   - the nodes' RSS after convergence (mean and max);
#   - per write, summed over nodes: fast-path changes applied, those that
#     lacked dependencies, sync messages received, docs pushed, sessions reset.
# Prints numbers; asserts nothing. MERGEFLOW_BIN as for netns-cluster.sh
# (default target/release/mergeflow); MERGEFLOW_TOOLS_BIN the filler
# (default target/release/mergeflow-tools); MF_CLUSTER_ID picks the cluster id
# (default 0), as for netns-cluster.sh.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly NC=$REPO_ROOT/scripts/netns-cluster.sh
export MF_CLUSTER_DIR=${MF_SCALE_CLUSTER_DIR:-/tmp/mergeflow-scale}

SIZES=5,10,20 DOCS=10000
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) SIZES=${2:?}; shift 2 ;;
    --docs) DOCS=${2:?}; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo pipefail/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "scale: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" -eq 0 ] || { echo "scale: must run as root (network namespaces)" >&2; exit 2; }
BIN=${MERGEFLOW_BIN:-target/release/mergeflow}
[[ $BIN == /* ]] || BIN=$REPO_ROOT/$BIN
export MERGEFLOW_BIN=$BIN
TOOLS=${MERGEFLOW_TOOLS_BIN:-target/release/mergeflow-tools}
[[ $TOOLS == /* ]] || TOOLS=$REPO_ROOT/$TOOLS
[ -x "$BIN" ] && [ -x "$TOOLS" ] || (cd "$REPO_ROOT" && cargo build --release)

UP='' FILLS=()
LOGS=$(mktemp -d /tmp/mergeflow-scale-logs.XXXXXX)
cleanup() {
  local rc=$? p
  trap - EXIT INT TERM
  for p in "${FILLS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -z "$UP" ] || "$NC" down >/dev/null 2>&1 || "$NC" down || true
  rm -rf -- "$LOGS"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

now() { date +%s.%N; }
secs() { awk -v a="$2" -v b="$1" 'BEGIN { printf "%.1f", a - b }'; }
# "messages bytes" sent to peers, summed over nodes 1..N.
traffic() {
  local n=$1 i
  for ((i = 1; i <= n; i++)); do
    curl -sf -H "authorization: Bearer $("$NC" token)" "$("$NC" url "$i")/metrics"
  done | awk '/^mergeflow_peer_messages_total\{.*direction="out"/ { m += $NF }
              /^mergeflow_peer_traffic_bytes_total\{.*direction="out"/ { b += $NF }
              END { printf "%d %d\n", m, b }'
}
# Sync counters summed over nodes 1..N: "applied missing_deps sync_msgs
# pushed_out sessions_reset" (what each write cost beyond the fast path).
sync_counters() {
  local n=$1 i
  for ((i = 1; i <= n; i++)); do
    curl -sf -H "authorization: Bearer $("$NC" token)" "$("$NC" url "$i")/metrics"
  done | awk '/^mergeflow_sync_changes_applied_total/ { a += $NF }
              /^mergeflow_sync_changes_missing_deps_total/ { m += $NF }
              /^mergeflow_sync_messages_received_total/ { s += $NF }
              /^mergeflow_sync_docs_pushed_out_total/ { p += $NF }
              /^mergeflow_sync_sessions_reset_total/ { r += $NF }
              END { printf "%d %d %d %d %d\n", a, m, s, p, r }'
}
# Messages sent by kind, summed over nodes 1..N: "kind count" lines.
kinds() {
  local n=$1 i
  for ((i = 1; i <= n; i++)); do
    curl -sf -H "authorization: Bearer $("$NC" token)" "$("$NC" url "$i")/metrics"
  done | awk -F'[{}]' '/^mergeflow_net_messages_total\{.*direction="out"/ {
      split($2, l, "kind=\""); split(l[2], k, "\""); split($3, v, " "); c[k[1]] += v[1] }
    END { for (x in c) print x, c[x] }' | sort
}
rss() { # "mean max" in MiB over nodes 1..N
  local n=$1 i
  for ((i = 1; i <= n; i++)); do
    awk '/^VmRSS/ { print $2 }' "/proc/$(cat "$MF_CLUSTER_DIR/n$i/pid")/status"
  done | awk '{ s += $1; if ($1 > m) m = $1 } END { printf "%.1f %.1f\n", s / NR / 1024, m / 1024 }'
}

echo "scale: $DOCS docs per run, sizes $SIZES, binary $BIN ($(nproc) cores)"
printf '%-6s %-8s %-10s %-12s %-14s %-14s %-12s\n' nodes docs write_s converge_s msgs/write bytes/write rss_MiB_mean/max
IFS=, read -r -a sizes <<<"$SIZES"
for n in "${sizes[@]}"; do
  # Down only the cluster of the previous size: a cluster someone else runs
  # on this id makes `up` refuse, and stays up.
  [ -z "$UP" ] || "$NC" down >/dev/null 2>&1 || true
  UP=''
  "$NC" up "$n" >"$LOGS/up.log" 2>&1 || { cat "$LOGS/up.log" >&2; exit 1; }
  UP=1
  "$NC" wait-converged --timeout 120 >/dev/null
  token=$("$NC" token)
  read -r m0 b0 <<<"$(traffic "$n")"
  read -r sa0 sm0 ss0 sp0 sr0 <<<"$(sync_counters "$n")"
  kinds "$n" >"$LOGS/kinds0"
  per=$((DOCS / n))
  t0=$(now)
  FILLS=()
  for ((i = 1; i <= n; i++)); do
    "$TOOLS" bench --api "$("$NC" url "$i")" --token "$token" --fill "$per" --fill-prefix "n$i" \
      >"$LOGS/fill-$i.log" 2>&1 &
    FILLS+=($!)
  done
  for p in "${FILLS[@]}"; do wait "$p" || { echo "scale: a fill failed" >&2; cat "$LOGS"/fill-*.log >&2; exit 1; }; done
  FILLS=()
  t1=$(now)
  "$NC" wait-converged --timeout 900 >"$LOGS/converge.log"
  t2=$(now)
  read -r m1 b1 <<<"$(traffic "$n")"
  writes=$((per * n))
  printf '%-6s %-8s %-10s %-12s %-14s %-14s %-12s\n' "$n" "$writes" "$(secs "$t0" "$t1")" "$(secs "$t1" "$t2")" \
    "$(awk -v a="$m1" -v b="$m0" -v w="$writes" 'BEGIN { printf "%.1f", (a - b) / w }')" \
    "$(awk -v a="$b1" -v b="$b0" -v w="$writes" 'BEGIN { printf "%.0f", (a - b) / w }')" \
    "$(rss "$n" | tr ' ' /)"
  read -r sa1 sm1 ss1 sp1 sr1 <<<"$(sync_counters "$n")"
  echo "       per write, summed over nodes: $(awk -v w="$writes" -v a=$((sa1 - sa0)) -v m=$((sm1 - sm0)) \
    -v s=$((ss1 - ss0)) -v p=$((sp1 - sp0)) -v r=$((sr1 - sr0)) 'BEGIN { printf "%.2f fast-path changes applied, %.2f lacking dependencies, %.2f sync messages received, %.2f docs pushed, %.3f sessions reset", a / w, m / w, s / w, p / w, r / w }')"
  kinds "$n" >"$LOGS/kinds1"
  echo "       messages sent per write, by kind: $(awk -v w="$writes" 'NR == FNR { b[$1] = $2; next }
    { printf "%s%s %.3f", (n++ ? ", " : ""), $1, ($2 - b[$1]) / w }' "$LOGS/kinds0" "$LOGS/kinds1")"
  "$NC" down >/dev/null
  UP=''
done
