#!/usr/bin/env bash
# chaos.sh: a fault campaign against a real mergeflow cluster in network
# namespaces (scripts/netns-cluster.sh), checked like Jepsen checks a
# database. Run as root.
#
# usage: scripts/chaos.sh [--short | --long] [--duration S] [--nodes N]
#                         [--seed S] [--kill-cycles N] [--out DIR] [--keep]
#                         [--cluster K]
#        scripts/chaos.sh [--cluster K] --probe
#                                    exit 0 when this machine can run it
#
#   --short          the CI mode (default): 5 nodes, 90 s of faults, 20 kill -9
#                    cycles; about 3 minutes in all.
#   --long           30 minutes of faults, then 1,000 kill -9 cycles.
#   --duration S     seconds of mixed faults (overrides the mode's).
#   --nodes N        cluster size (3..20; default 5).
#   --seed S         seeds the nemesis schedule, the clients and the receiver
#                    (default: from the clock; printed, pass it to repeat).
#   --kill-cycles N  after the mixed faults, kill -9 and restart a node N times.
#   --out DIR        where the logs and the report go (default
#                    /tmp/mergeflow-chaos-out, or .../mergeflow-chaos-out-K; replaced).
#   --keep           leave the cluster running at the end (then run
#                    `MF_CLUSTER_DIR=/tmp/mergeflow-chaos scripts/netns-cluster.sh down`,
#                    with MF_CLUSTER_ID=K and /tmp/mergeflow-chaos-K for --cluster K).
#   --cluster K      run on netns cluster K (0..99; default $MF_CLUSTER_ID or 0):
#                    namespaces mfK-*, addresses 10.77.K.0/24, state dir
#                    /tmp/mergeflow-chaos-K. Campaigns on different clusters
#                    (a long one by hand and CI's short one, say) do not touch
#                    each other, though they share the CPUs; a second campaign
#                    on a busy id refuses (--probe says so).
#
# What runs:
#   workload  `mergeflow-tools chaos workload`: 8 clients write unique keys into 16
#             docs through every node and log each write as invoke, then ok
#             (acknowledged), fail (certainly not applied) or info (unknown).
#   effects   a workflow POSTs every state of each doc to `mergeflow-tools
#             chaos receive` on the host, which answers 503 to 10% (retries run).
#   nemesis   one fault at a time on a seeded schedule, each held 3-8 s:
#             partitions (halves, one node isolated, a bridge node that sees
#             both halves), packet loss and duplication (netem, or iptables
#             when the kernel has no netem), delay and reordering (netem,
#             or tools/nfq-delay behind an NFQUEUE rule), kill -9 then
#             restart, SIGSTOP then SIGCONT, and a full disk (node N's data
#             dir is a 128 MiB tmpfs, filled to the last byte). A node
#             that dies by itself is logged as a crash and restarted.
#   heal      every fault undone; then `mergeflow-tools chaos check` waits for
#             convergence and prints what was tried and what held:
#             acknowledged writes lost (must be 0), nodes not at identical
#             docs and heads (must be 0), seconds from heal to convergence,
#             docs whose final state's effect never arrived (must be 0),
#             idempotency keys accepted twice (allowed: at least once),
#             panics in the node logs and crashes (must be 0), the seed.
#
# Exit status: 0 when every promise held, 1 when one broke, 2 on bad usage.
# Needs: root, ip (iproute2), iptables, curl, jq; installs missing ones with
# apt-get. MERGEFLOW_BIN picks the node binary (default
# target/release/mergeflow) and MERGEFLOW_TOOLS_BIN the campaign's workload,
# receiver and checker (default target/release/mergeflow-tools, of the
# workspace member tools/mergeflow-tools); `cargo build --release` builds
# both when one is missing. CI uses target/debug/ for both.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly REPO_ROOT
readonly NC_SCRIPT=$REPO_ROOT/scripts/netns-cluster.sh
# (9>&-: the nodes and delayers it starts must not inherit the campaign lock)
cluster() { "$NC_SCRIPT" "$@" 9>&-; }

usage() { sed -n '2,/^set -euo pipefail/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "chaos: $*" >&2; exit 2; }
say() { echo "chaos: $*"; }

probe() {
  [ "$(id -u)" -eq 0 ] || { echo "needs root"; return 1; }
  local c
  for c in ip iptables curl jq flock; do
    command -v "$c" >/dev/null 2>&1 || { echo "needs $c"; return 1; }
  done
  local ns=mf-chaos-probe-$$ ok=0
  ip netns add "$ns" 2>/dev/null || { echo "cannot create network namespaces"; return 1; }
  ip netns exec "$ns" iptables -w -L >/dev/null 2>&1 || ok=1
  ip netns del "$ns" 2>/dev/null || true
  [ "$ok" -eq 0 ] || { echo "iptables does not work in a namespace"; return 1; }
  grep -qw tmpfs /proc/filesystems || { echo "no tmpfs (the disk-full fault needs one)"; return 1; }
  if ! flock -n "$LOCK" true 2>/dev/null; then
    echo "cluster $MF_CLUSTER_ID is busy: another campaign holds $LOCK (try --cluster K)"; return 1
  fi
  if ip -4 route show | grep -q "^10\\.77\\.$MF_CLUSTER_ID\\.0/24" && [ ! -d "$MF_CLUSTER_DIR" ]; then
    echo "10.77.$MF_CLUSTER_ID.0/24 is in use here (another cluster? try --cluster K)"; return 1
  fi
  return 0
}

MODE=short DURATION='' NODES=5 SEED='' KILL_CYCLES='' OUT='' KEEP='' PROBE=''
CLUSTER=${MF_CLUSTER_ID:-0}
while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --probe) PROBE=1; shift ;;
    --short) MODE=short; shift ;;
    --long) MODE=long; shift ;;
    --duration) DURATION=${2:?--duration needs seconds}; shift 2 ;;
    --nodes) NODES=${2:?--nodes needs a count}; shift 2 ;;
    --seed) SEED=${2:?--seed needs a number}; shift 2 ;;
    --kill-cycles) KILL_CYCLES=${2:?--kill-cycles needs a count}; shift 2 ;;
    --out) OUT=${2:?--out needs a dir}; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --cluster) CLUSTER=${2:?--cluster needs a number}; shift 2 ;;
    *) usage >&2; die "unknown argument '$1'" ;;
  esac
done
[[ $CLUSTER =~ ^([0-9]|[1-9][0-9])$ ]] || die "bad --cluster '$CLUSTER' (want 0..99)"
export MF_CLUSTER_ID=$CLUSTER
if [ "$CLUSTER" -eq 0 ]; then
  export MF_CLUSTER_DIR=${MF_CHAOS_CLUSTER_DIR:-/tmp/mergeflow-chaos}
  OUT=${OUT:-/tmp/mergeflow-chaos-out}
else
  export MF_CLUSTER_DIR=${MF_CHAOS_CLUSTER_DIR:-/tmp/mergeflow-chaos-$CLUSTER}
  OUT=${OUT:-/tmp/mergeflow-chaos-out-$CLUSTER}
fi
readonly RECEIVER=10.77.$CLUSTER.1:7790
# One campaign per cluster id, whatever its state dir: a second one would
# tear the first one's cluster down.
readonly LOCK=/tmp/mergeflow-cluster-$CLUSTER.lock
if [ -n "$PROBE" ]; then probe; exit $?; fi
if [ "$MODE" = short ]; then
  DURATION=${DURATION:-90} KILL_CYCLES=${KILL_CYCLES:-20}
else
  DURATION=${DURATION:-1800} KILL_CYCLES=${KILL_CYCLES:-1000}
fi
SEED=${SEED:-$(($(date +%s%N) % 1000000007))}
[[ $DURATION =~ ^[0-9]+$ ]] || die "bad --duration '$DURATION'"
[[ $NODES =~ ^[0-9]+$ ]] && [ "$NODES" -ge 3 ] && [ "$NODES" -le 20 ] || die "--nodes must be 3..20"
[[ $SEED =~ ^[0-9]+$ ]] || die "bad --seed '$SEED'"
[[ $KILL_CYCLES =~ ^[0-9]+$ ]] || die "bad --kill-cycles '$KILL_CYCLES'"
[ "$(id -u)" -eq 0 ] || die "must run as root (network namespaces, iptables); try: sudo $0"
exec 9>"$LOCK"
flock -n 9 || die "another campaign is running on cluster $CLUSTER (it holds $LOCK); use --cluster K"
readonly MODE DURATION NODES SEED KILL_CYCLES OUT KEEP

BIN=${MERGEFLOW_BIN:-target/release/mergeflow}
[[ $BIN == /* ]] || BIN=$REPO_ROOT/$BIN
export MERGEFLOW_BIN=$BIN
TOOLS=${MERGEFLOW_TOOLS_BIN:-target/release/mergeflow-tools}
[[ $TOOLS == /* ]] || TOOLS=$REPO_ROOT/$TOOLS
if [ ! -x "$BIN" ] || [ ! -x "$TOOLS" ]; then
  say "$BIN or $TOOLS missing; running cargo build --release"
  (cd "$REPO_ROOT" && cargo build --release) || die "cargo build --release failed"
fi
[ -x "$BIN" ] || die "$BIN missing after the build (set MERGEFLOW_BIN)"
"$TOOLS" chaos --help >/dev/null 2>&1 || die "$TOOLS has no 'chaos' command: rebuild it (set MERGEFLOW_TOOLS_BIN)"

rm -rf -- "$OUT"
mkdir -p "$OUT"
FAULTS=$OUT/faults.log
: >"$FAULTS"
WORKLOAD_PID='' RECEIVER_PID='' CLUSTER_UP=''

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$WORKLOAD_PID" ]; then kill "$WORKLOAD_PID" 2>/dev/null || true; fi
  if [ -n "$RECEIVER_PID" ]; then kill "$RECEIVER_PID" 2>/dev/null || true; fi
  local i
  for ((i = 1; i <= NODES; i++)); do
    cp "$MF_CLUSTER_DIR/n$i/log" "$OUT/n$i.log" 2>/dev/null || true
  done
  # Only a cluster we started: a failed `up` cleans up after itself, and
  # one refused because the cluster already exists is not ours.
  if [ -n "$CLUSTER_UP" ] && [ -z "$KEEP" ]; then cluster down >/dev/null 2>&1 || cluster down || true; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Seeded randomness: R is set in this shell (never in a $(...) subshell,
# which would not advance the sequence).
RANDOM=$SEED
rand() { R=$((RANDOM % $1)); }
ms() { date +%s%3N; }
fault() { echo "$(ms) $*" >>"$FAULTS"; say "t+$(($(date +%s) - T0))s $*"; }

say "seed $SEED, $NODES nodes, $DURATION s of faults, $KILL_CYCLES kill -9 cycles, binary $BIN"
say "output in $OUT (ops.jsonl, effects.jsonl, faults.log, nI.log, report.json)"
# Leftovers of an earlier campaign (its state dir exists) are ours to remove;
# anyone else's cluster makes `up` refuse, and we say so.
if [ -d "$MF_CLUSTER_DIR" ]; then cluster down >/dev/null 2>&1 || true; fi
MF_TMPFS="$NODES=128m" MF_LOG_LEVEL=info cluster up "$NODES" >"$OUT/up.log" 2>&1 || {
  cat "$OUT/up.log" >&2
  die "could not start the cluster"
}
CLUSTER_UP=1
TOKEN=$(cluster token)
export MERGEFLOW_API_TOKEN=$TOKEN
URLS=''
for ((i = 1; i <= NODES; i++)); do URLS+="${URLS:+,}$(cluster url "$i")"; done
NODE_LOGS=()
for ((i = 1; i <= NODES; i++)); do NODE_LOGS+=(--node-log "$MF_CLUSTER_DIR/n$i/log"); done

HAS_NETEM=
if cluster exec 1 tc qdisc add dev lo root netem delay 1ms 2>/dev/null; then
  cluster exec 1 tc qdisc del dev lo root
  HAS_NETEM=1
fi
KINDS=(partition-halves partition-isolate partition-bridge loss duplicate kill pause disk-full)
if [ -n "$HAS_NETEM" ]; then
  KINDS+=(delay)
else
  # Delay and reordering in userspace: tools/nfq-delay behind an NFQUEUE rule.
  if [ -z "${MF_NFQ_DELAY:-}" ]; then
    MF_NFQ_DELAY=$REPO_ROOT/tools/nfq-delay/target/release/nfq-delay
    (cd "$REPO_ROOT/tools/nfq-delay" && cargo build --release --quiet) >"$OUT/nfq-build.log" 2>&1 \
      || MF_NFQ_DELAY=''
  fi
  if [ -n "$MF_NFQ_DELAY" ] && [ -x "$MF_NFQ_DELAY" ]; then
    export MF_NFQ_DELAY MF_NFQ_SEED=$SEED
    KINDS+=(delay)
    say "this kernel has no netem qdisc: loss and duplication are emulated with iptables, delay and reordering with tools/nfq-delay (NFQUEUE)"
  else
    say "this kernel has no netem qdisc and tools/nfq-delay did not build ($OUT/nfq-build.log): loss and duplication are emulated with iptables; delay and reordering are not injected"
  fi
fi

"$TOOLS" chaos receive --listen "$RECEIVER" --log "$OUT/effects.jsonl" --seed "$SEED" >"$OUT/receiver.log" 2>&1 9>&- &
RECEIVER_PID=$!
"$TOOLS" chaos workload --nodes "$URLS" --clients 8 --docs 16 --seconds 1000000 --seed "$SEED" \
  --effect-url "http://$RECEIVER/effect" --log "$OUT/ops.jsonl" >"$OUT/workload.log" 2>&1 9>&- &
WORKLOAD_PID=$!
deadline=$((SECONDS + 120))
until [ -s "$OUT/ops.jsonl" ]; do
  kill -0 "$WORKLOAD_PID" 2>/dev/null || { cat "$OUT/workload.log" >&2; die "the workload exited"; }
  [ "$SECONDS" -lt "$deadline" ] || die "the workload wrote nothing in 120 s"
  sleep 0.2
done
T0=$(date +%s)

# The nodes a fault has taken down on purpose, so a missing one is a crash.
declare -A DOWN=()
check_alive() {
  local i pid
  for ((i = 1; i <= NODES; i++)); do
    [ -n "${DOWN[$i]:-}" ] && continue
    pid=$(cat "$MF_CLUSTER_DIR/n$i/pid" 2>/dev/null || true)
    if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
      fault crash "n$i"
      tail -n 30 "$MF_CLUSTER_DIR/n$i/log" | sed "s/^/chaos: n$i log: /"
      cluster restart "$i" >>"$OUT/nemesis.log" 2>&1 || say "n$i does not restart"
    fi
  done
}

# A random permutation of 1..NODES in PERM.
shuffle() {
  local i j t
  PERM=()
  for ((i = 1; i <= NODES; i++)); do PERM+=("$i"); done
  for ((i = NODES - 1; i > 0; i--)); do
    rand $((i + 1)); j=$R
    t=${PERM[$i]}; PERM[$i]=${PERM[$j]}; PERM[$j]=$t
  done
}
join() { local IFS=,; echo "$*"; }

FILL=$MF_CLUSTER_DIR/n$NODES/data/chaos-fill
# A nemesis command that fails is logged as a nemesis-error and the campaign
# goes on (under set -e it would end it without a report).
nc() { cluster "$@" >>"$OUT/nemesis.log" 2>&1 || { fault nemesis-error "$*"; return 0; }; }

apply() { # apply KIND: starts the fault; UNDO is the command that ends it
  local kind=$1 half k a b
  shuffle
  k=${PERM[0]}
  case "$kind" in
    partition-halves)
      half=$((NODES / 2))
      a=$(join "${PERM[@]:0:half}"); b=$(join "${PERM[@]:half}")
      nc partition "$a" "$b"; fault "$kind" "$a|$b"; UNDO=(nc heal) ;;
    partition-isolate)
      a=$(join "${PERM[@]:1}")
      nc partition "$k" "$a"; fault "$kind" "$k|$a"; UNDO=(nc heal) ;;
    partition-bridge) # PERM[0] is in no group, so it reaches both halves
      half=$(((NODES - 1) / 2))
      a=$(join "${PERM[@]:1:half}"); b=$(join "${PERM[@]:$((1 + half))}")
      nc partition "$a" "$b"; fault "$kind" "$a|$b bridge n$k"; UNDO=(nc heal) ;;
    loss)
      rand 30; a=$((20 + R))
      nc netem "$k" loss "$a%"; fault "$kind" "n$k $a%"; UNDO=(nc heal) ;;
    duplicate)
      rand 30; a=$((10 + R))
      nc netem "$k" duplicate "$a%"; fault "$kind" "n$k $a%"; UNDO=(nc heal) ;;
    delay)
      rand 150; a=$((50 + R))
      nc netem "$k" delay "${a}ms" "$((a / 2))ms" reorder 25% 50%
      fault "$kind" "n$k ${a}ms reorder"; UNDO=(nc heal) ;;
    kill)
      DOWN[$k]=1
      nc kill "$k"; fault "$kind" "n$k"; UNDO=(restart "$k") ;;
    pause)
      DOWN[$k]=1
      nc pause "$k"; fault "$kind" "n$k"; UNDO=(resume "$k") ;;
    disk-full)
      dd if=/dev/zero of="$FILL" bs=1M >/dev/null 2>&1 || true
      fault "$kind" "n$NODES $(df -h --output=avail "$(dirname "$FILL")" | tail -n 1 | tr -d ' ') left"
      UNDO=(rm -f -- "$FILL") ;;
  esac
}
restart() { nc restart "$1"; unset 'DOWN[$1]'; }
resume() { nc resume "$1"; unset 'DOWN[$1]'; }

end=$((SECONDS + DURATION))
while [ "$SECONDS" -lt "$end" ]; do
  rand ${#KINDS[@]}
  apply "${KINDS[$R]}"
  rand 6; sleep $((3 + R))
  "${UNDO[@]}"
  check_alive
  rand 3; sleep $((1 + R))
  kill -0 "$WORKLOAD_PID" 2>/dev/null || { cat "$OUT/workload.log" >&2; die "the workload died"; }
done

if [ "$KILL_CYCLES" -gt 0 ]; then
  say "t+$(($(date +%s) - T0))s $KILL_CYCLES kill -9 cycles, writes continuing"
  for ((c = 1; c <= KILL_CYCLES; c++)); do
    rand "$NODES"; k=$((R + 1))
    nc kill "$k"
    echo "$(ms) kill-cycle n$k" >>"$FAULTS"
    cluster restart "$k" >>"$OUT/nemesis.log" 2>&1 || { fault crash "n$k does not restart"; break; }
    [ $((c % 100)) -eq 0 ] && say "t+$(($(date +%s) - T0))s $c kill -9 cycles"
  done
  check_alive
fi

kill "$WORKLOAD_PID" 2>/dev/null || true
wait "$WORKLOAD_PID" 2>/dev/null || true
WORKLOAD_PID=''
nc heal
rm -f -- "$FILL"
for i in "${!DOWN[@]}"; do cluster resume "$i" >>"$OUT/nemesis.log" 2>&1 || nc restart "$i"; done
check_alive
HEALED=$(ms)
say "t+$(($(date +%s) - T0))s healed; checking"

rc=0
"$TOOLS" chaos check --nodes "$URLS" --ops "$OUT/ops.jsonl" --effects "$OUT/effects.jsonl" \
  --faults "$FAULTS" "${NODE_LOGS[@]}" --healed-at-ms "$HEALED" --seed "$SEED" \
  --timeout 300 --json-out "$OUT/report.json" | tee "$OUT/report.txt" || rc=1
[ "$rc" -eq 0 ] || say "a promise broke; repeat with: $0 --seed $SEED --duration $DURATION --nodes $NODES --kill-cycles $KILL_CYCLES"
exit "$rc"
