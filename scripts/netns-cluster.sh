#!/usr/bin/env bash
# netns-cluster.sh: run N mergeflow nodes, each in its own Linux network
# namespace on one bridge, for manual and scripted fault testing. Run as root.
#
# usage: scripts/netns-cluster.sh COMMAND [ARGS]
#
#   up N                   start N nodes (1..200): namespaces mf-n1..mf-nN,
#                          node I at 10.77.0.(10+I), API on :7700, libp2p on
#                          :4001, every node dialing every other (--no-mdns).
#                          Waits for each node's ready line. On failure it
#                          removes everything it created and prints the log tail.
#   down                   kill the nodes, delete namespaces, veths, bridge and
#                          the state dir. Idempotent; cleans up a partial `up`.
#   status [--json]        per node: pid alive?, peer_id, docs, connected peers,
#                          digest (from GET /v1/status).
#   wait-converged [--timeout S]
#                          poll until every live node reports the same non-null
#                          digest and the same docs count (default timeout 120 s);
#                          prints the seconds it took. Exit 1 plus per-node status
#                          on timeout.
#   partition G1 G2 ...    groups of comma-separated nodes, e.g. `partition 1 2,3`:
#                          nodes in different groups cannot reach each other
#                          (iptables DROP in each namespace). Replaces any earlier
#                          partition; nodes in no group keep reaching everyone.
#   heal                   remove all partition rules and netem/loss settings.
#   netem NODE ARGS...     `tc qdisc replace dev <node's veth> root netem ARGS`,
#                          e.g. `netem 2 delay 50ms loss 5%` (egress of NODE).
#                          Without kernel netem support (CONFIG_NET_SCH_NETEM)
#                          `loss P%` and `duplicate P%` are emulated with
#                          iptables on NODE's output to other nodes (`-m
#                          statistic`, DROP and TEE), and `delay D [J]` (with
#                          any `reorder ...`, which the jitter J brings about)
#                          by tools/nfq-delay through an NFQUEUE rule when
#                          $MF_NFQ_DELAY names its binary (seeded by
#                          $MF_NFQ_SEED, default 1).
#   kill NODE              kill -9 the node.
#   pause NODE / resume NODE
#                          SIGSTOP / SIGCONT the node (it keeps its sockets open
#                          but answers nothing).
#   restart NODE           (stop it if running, then) start it again with the same
#                          data dir and args; appends to its log; waits for ready.
#   url NODE               print the node's API base URL (http://10.77.0.(10+I):7700).
#   token                  print the cluster's API token (the APIs listen on
#                          0.0.0.0, so every node requires it; send
#                          `Authorization: Bearer <token>`, or set
#                          MERGEFLOW_API_TOKEN for the CLI).
#   exec NODE CMD...       run CMD inside the node's namespace.
#
# NODE is a number 1..N, `nI` or `mf-nI`.
#
# Environment:
#   MF_CLUSTER_ID      K in 0..99 (default 0): which cluster. Clusters with
#                      different ids run side by side; every command touches
#                      only its own. K=0 is named mf-* on 10.77.0.0/24, K>0
#                      mfK-* on 10.77.K.0/24 (node I at 10.77.K.(10+I)).
#   MF_CLUSTER_DIR     state dir (default /tmp/mergeflow-netns, or
#                      /tmp/mergeflow-netns-K): nI/data (data dir),
#                      nI/log (stdout+stderr), nI/pid.
#   MERGEFLOW_BIN      binary (default target/release/mergeflow, relative paths are
#                      relative to the repo root; the default is built with
#                      `cargo build --release --bin mergeflow` when missing).
#   MF_LOG_LEVEL       node --log-level (default info).
#   MF_READY_TIMEOUT   seconds to wait for a node's ready line (default 30).
#   MF_TMPFS           for `up`: nodes whose data dir is a tmpfs of their own,
#                      e.g. `3=64m` or `1=32m,3=64m`, so that a test can fill
#                      that node's disk. Mounted before the node starts,
#                      unmounted by `down`.
#
# The host gets 10.77.0.1/24 on bridge mf-br0, so `curl http://10.77.0.11:7700/...`
# works from the host. Namespaces have no default route, IPv6 is disabled on
# every interface created, so no traffic leaves 10.77.0.0/24. Everything created
# is named mf-*: namespaces mf-nI, veths mf-vI (host side, on the bridge) and
# mf-eI (node side), bridge mf-br0, iptables chains MF-PART and MF-NETEM (in
# the node namespaces). With MF_CLUSTER_ID=K>0, read mfK- for mf- and 10.77.K
# for 10.77.0 throughout.
#
# Example:
#   scripts/netns-cluster.sh up 3
#   curl -s -XPOST "$(scripts/netns-cluster.sh url 1)/v1/docs" \
#        -H "authorization: Bearer $(scripts/netns-cluster.sh token)" \
#        -H 'content-type: application/json' -d '{"id":"a","value":{"x":1}}'
#   scripts/netns-cluster.sh wait-converged
#   scripts/netns-cluster.sh partition 1 2,3; ...; scripts/netns-cluster.sh heal
#   scripts/netns-cluster.sh down
set -euo pipefail

# MF_CLUSTER_ID K (0..99) keeps clusters apart: K=0 (the default) names
# everything mf-* on 10.77.0.0/24; K>0 names it mfK-* on 10.77.K.0/24.
CLUSTER_ID=${MF_CLUSTER_ID:-0}
[[ $CLUSTER_ID =~ ^([0-9]|[1-9][0-9])$ ]] || { echo "netns-cluster: bad MF_CLUSTER_ID '$CLUSTER_ID' (want 0..99)" >&2; exit 1; }
readonly CLUSTER_ID
if [ "$CLUSTER_ID" -eq 0 ]; then PFX=mf-; else PFX=mf$CLUSTER_ID-; fi
readonly PFX
readonly BRIDGE=${PFX}br0
readonly NET=10.77.$CLUSTER_ID
readonly HOST_IP=$NET.1
readonly API_PORT=7700
readonly P2P_PORT=4001
readonly MAX_NODES=200
readonly MARKER=.mf-netns-cluster
if [ "$CLUSTER_ID" -eq 0 ]; then STATE=${MF_CLUSTER_DIR:-/tmp/mergeflow-netns}; else STATE=${MF_CLUSTER_DIR:-/tmp/mergeflow-netns-$CLUSTER_ID}; fi
[[ $STATE == /* ]] || STATE=$PWD/$STATE
readonly STATE
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly REPO_ROOT

usage() { sed -n '2,/^set -euo pipefail/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "netns-cluster: $*" >&2; exit 1; }
note() { echo "netns-cluster: $*" >&2; }

need_root() {
  [ "$(id -u)" -eq 0 ] || die "must run as root (network namespaces, veths, bridge, iptables, tc); try: sudo $0 $*"
}

# need_cmd CMD [DEBIAN_PACKAGE]: installs the package with apt-get when CMD is missing.
need_cmd() {
  local cmd=$1 pkg=${2:-$1}
  command -v "$cmd" >/dev/null 2>&1 && return 0
  if command -v apt-get >/dev/null 2>&1; then
    note "$cmd not found; installing $pkg with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$pkg" >/dev/null \
      || die "could not install $pkg; install it and retry"
    command -v "$cmd" >/dev/null 2>&1 || die "$cmd still missing after installing $pkg"
  else
    die "$cmd not found; install $pkg"
  fi
}

ns() { echo "${PFX}n$1"; }
host_veth() { echo "${PFX}v$1"; }
node_veth() { echo "${PFX}e$1"; }
node_ip() { echo "$NET.$((10 + $1))"; }
node_dir() { echo "$STATE/n$1"; }
node_url() { echo "http://$(node_ip "$1"):$API_PORT"; }
api_token() { cat "$STATE/token"; }
# curl with the cluster's API token.
api_curl() { curl -H "authorization: Bearer $(api_token)" "$@"; }

# Cluster size recorded by `up`; dies when there is no cluster.
size() {
  [ -f "$STATE/size" ] || die "no cluster in $STATE (run: $0 up N)"
  cat "$STATE/size"
}

# node_num REF: 3, n3 or mf-n3 -> 3, checked against the cluster size.
node_num() {
  local ref=${1#"$PFX"} n
  ref=${ref#n}
  [[ $ref =~ ^[1-9][0-9]*$ ]] || die "bad node '$1' (want a number 1..N, nI or ${PFX}nI)"
  n=$(size)
  [ "$ref" -le "$n" ] || die "no node $ref (cluster has $n nodes)"
  echo "$ref"
}

# Our namespaces / host links that exist right now.
our_netns() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${PFX}n[0-9]+\$" || true; }
our_links() { ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' | grep -E "^${PFX}(v[0-9]+|br0)\$" || true; }

# Whether PID is node I's process (guards against pid reuse: checks its data dir).
is_node_pid() {
  local i=$1 pid=$2
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  # (grep without -q: with pipefail, -q's early exit could fail the pipeline)
  tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -xF -- "$(node_dir "$i")/data" >/dev/null
}

# Prints node I's live pid, or nothing.
node_pid() {
  local i=$1 pid=
  [ -f "$(node_dir "$i")/pid" ] && pid=$(cat "$(node_dir "$i")/pid")
  if is_node_pid "$i" "$pid"; then echo "$pid"; fi
}

resolve_bin() {
  local bin=${MERGEFLOW_BIN:-target/release/mergeflow}
  [[ $bin == /* ]] || bin=$REPO_ROOT/$bin
  if [ ! -e "$bin" ] && [ -z "${MERGEFLOW_BIN:-}" ]; then
    note "$bin missing; running cargo build --release --bin mergeflow"
    (cd "$REPO_ROOT" && cargo build --release --bin mergeflow) >&2 || die "cargo build --release failed"
  fi
  [ -x "$bin" ] || die "mergeflow binary not found or not executable: $bin (set MERGEFLOW_BIN)"
  echo "$bin"
}

# Mounts node I's data dir as a tmpfs when `up` recorded a size for it.
mount_tmpfs() {
  local i=$1 size
  size=$(awk -v i="$i" '$1 == i { print $2 }' "$STATE/tmpfs" 2>/dev/null || true)
  [ -n "$size" ] || return 0
  mkdir -p "$(node_dir "$i")/data"
  mountpoint -q "$(node_dir "$i")/data" && return 0
  mount -t tmpfs -o "size=$size,mode=0700" mf-tmpfs "$(node_dir "$i")/data"
}

# Unmounts every mount under the state dir (the tmpfs data dirs).
umount_state() {
  local m
  [ -d "$STATE" ] || return 0
  for m in $(awk -v s="$STATE/" 'index($2, s) == 1 { print $2 }' /proc/mounts | sort -r); do
    umount "$m" 2>/dev/null || umount -l "$m" || note "could not unmount $m"
  done
}

# Starts node I in its namespace (appending to its log), records the pid, and
# waits for the ready line printed after the log's current end.
start_node() {
  local i=$1 n bin dir ip j off pid
  n=$(size)
  bin=$(cat "$STATE/bin")
  dir=$(node_dir "$i")
  ip=$(node_ip "$i")
  local args=(start --data-dir "$dir/data" --api "0.0.0.0:$API_PORT"
    --listen "/ip4/$ip/tcp/$P2P_PORT" --no-mdns)
  for ((j = 1; j <= n; j++)); do
    [ "$j" -eq "$i" ] || args+=(--peer "/ip4/$(node_ip "$j")/tcp/$P2P_PORT")
  done
  args+=(--log-level "${MF_LOG_LEVEL:-info}")
  mkdir -p "$dir"
  mount_tmpfs "$i"
  touch "$dir/log"
  off=$(stat -c %s "$dir/log")
  echo "=== $(date -u +%FT%TZ) netns-cluster: starting node $i: $bin ${args[*]}" >>"$dir/log"
  off=$((off + 1))
  # setsid: own session, so a Ctrl-C or closed terminal does not reach the node.
  # Not a process group leader here, so setsid does not fork: $! is the node.
  # NO_COLOR: plain text logs (tracing-subscriber colours them even into a file).
  # Applied workflows may post to the cluster's own subnet (the host's
  # receivers listen on the bridge), nowhere else.
  MERGEFLOW_API_TOKEN=$(api_token) MERGEFLOW_NET_KEY=$(cat "$STATE/netkey") \
    MERGEFLOW_WORKFLOW_HTTP_ALLOW="[\"$NET.0/24\"]" NO_COLOR=1 ip netns exec "$(ns "$i")" setsid "$bin" "${args[@]}" </dev/null >>"$dir/log" 2>&1 &
  pid=$!
  echo "$pid" >"$dir/pid"
  wait_ready "$i" "$pid" "$off"
}

wait_ready() {
  local i=$1 pid=$2 off=$3 dir deadline p
  dir=$(node_dir "$i")
  deadline=$((SECONDS + ${MF_READY_TIMEOUT:-30}))
  until tail -c +"$off" "$dir/log" | grep ' ready: ' >/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then
      note "node $i (pid $pid) exited before it was ready; last log lines of $dir/log:"
      tail -n 20 "$dir/log" >&2
      return 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      note "node $i not ready after ${MF_READY_TIMEOUT:-30}s; last log lines of $dir/log:"
      tail -n 20 "$dir/log" >&2
      return 1
    fi
    sleep 0.1
  done
  if ! is_node_pid "$i" "$pid"; then # should not happen; find it in the namespace
    for p in $(ip netns pids "$(ns "$i")"); do
      if is_node_pid "$i" "$p"; then echo "$p" >"$dir/pid"; fi
    done
  fi
  echo "node $i: $(tail -c +"$off" "$dir/log" | grep ' ready: ' | tail -n 1)"
}

# Whether PID runs. A zombie (dead, not yet reaped by whichever process
# inherited it) has exited once its other threads have too: only then are
# its files closed and sled's lock released.
running() {
  local state tasks
  state=$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$state" ] || return 1
  [ "$state" != Z ] && return 0
  tasks=$(ls "/proc/$1/task" 2>/dev/null | wc -l)
  [ "$tasks" -gt 1 ]
}

# Sends SIG to the pids and waits up to T seconds for them to exit.
kill_wait() {
  local sig=$1 t=$2 p
  shift 2
  [ $# -gt 0 ] || return 0
  kill "-$sig" "$@" 2>/dev/null || true
  kill -CONT "$@" 2>/dev/null || true # a paused process handles TERM only once it runs
  local deadline=$((SECONDS + t))
  while [ "$SECONDS" -lt "$deadline" ]; do
    local alive=0
    for p in "$@"; do running "$p" && alive=1; done
    [ "$alive" -eq 0 ] && return 0
    sleep 0.1
  done
  return 1
}

stop_node() { # TERM, then KILL after 10 s
  local i=$1 pid
  pid=$(node_pid "$i")
  [ -n "$pid" ] || return 0
  kill_wait TERM 10 "$pid" || kill_wait KILL 5 "$pid" || true
}

cmd_down() {
  local pids=() p f d n
  # Every process in our namespaces, plus recorded pids still running a node
  # of ours (a namespace may be gone while its process lives on).
  for n in $(our_netns); do
    for p in $(ip netns pids "$n" 2>/dev/null); do pids+=("$p"); done
  done
  if [ -d "$STATE" ]; then
    for f in "$STATE"/n*/pid; do
      [ -f "$f" ] || continue
      d=$(dirname "$f")
      p=$(cat "$f")
      [[ $p =~ ^[0-9]+$ ]] && is_node_pid "${d##*/n}" "$p" && pids+=("$p")
    done
  fi
  if [ ${#pids[@]} -gt 0 ]; then
    kill_wait TERM 10 "${pids[@]}" || kill_wait KILL 5 "${pids[@]}" || note "some processes did not exit: ${pids[*]}"
  fi
  for n in $(our_netns); do ip netns del "$n" 2>/dev/null || note "could not delete netns $n"; done
  # Deleting a namespace deletes its veth end and so the peer; mop up the rest.
  for n in $(our_links); do
    [ "$n" = "$BRIDGE" ] || ip link del "$n" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  umount_state
  if [ -d "$STATE" ]; then
    if [ -e "$STATE/$MARKER" ]; then
      rm -rf -- "$STATE"
    else
      note "not removing $STATE: it was not created by this script (no $MARKER)"
    fi
  fi
  [ -z "$(our_netns)$(our_links)" ] || die "leftovers: $(our_netns) $(our_links)"
  echo "down: no ${PFX}* namespaces or links left; $STATE removed"
}

disable_ipv6() { # disable_ipv6 [NETNS] IFACE
  if [ $# -eq 2 ]; then
    ip netns exec "$1" sh -c "echo 1 > /proc/sys/net/ipv6/conf/$2/disable_ipv6" 2>/dev/null || true
  elif [ -e "/proc/sys/net/ipv6/conf/$1/disable_ipv6" ]; then
    echo 1 >"/proc/sys/net/ipv6/conf/$1/disable_ipv6" || true
  fi
}

UP_DONE=
up_cleanup() {
  local rc=$?
  [ -n "$UP_DONE" ] && return 0
  [ "$rc" -ne 0 ] || rc=1
  note "up failed; removing everything it created"
  trap - EXIT INT TERM
  cmd_down >&2 || true
  exit "$rc"
}

cmd_up() {
  if ! { [ $# -eq 1 ] && [[ $1 =~ ^[1-9][0-9]*$ ]] && [ "$1" -le "$MAX_NODES" ]; }; then
    die "usage: $0 up N (N in 1..$MAX_NODES)"
  fi
  local n=$1 i bin
  need_cmd ip iproute2
  need_cmd curl curl
  need_cmd jq jq
  [ -z "$(our_netns)$(our_links)" ] \
    || die "a cluster (or leftovers) exists: $(our_netns | tr '\n' ' ')$(our_links | tr '\n' ' ')- run: $0 down"
  if [ -d "$STATE" ] && [ ! -e "$STATE/$MARKER" ] && [ -n "$(ls -A "$STATE")" ]; then
    die "$STATE exists and was not created by this script; set MF_CLUSTER_DIR or remove it"
  fi
  if ip -4 route show | grep "^$NET\.0/24" >/dev/null; then
    die "the host already has a route to $NET.0/24: $(ip -4 route show | grep "^$NET\.0/24")"
  fi
  bin=$(resolve_bin)
  # Bridged frames pass the host's iptables FORWARD chain when br_netfilter is on.
  if [ "$(cat /proc/sys/net/bridge/bridge-nf-call-iptables 2>/dev/null)" = 1 ] \
    && command -v iptables >/dev/null 2>&1 && iptables -w -S FORWARD 2>/dev/null | grep -x -- '-P FORWARD DROP' >/dev/null; then
    note "warning: host iptables FORWARD policy is DROP and bridge-nf-call-iptables=1: nodes may not reach each other" \
      "(fix: iptables -I FORWARD -i $BRIDGE -o $BRIDGE -j ACCEPT)"
  fi

  trap up_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM

  umount_state
  rm -rf -- "$STATE"
  mkdir -p "$STATE"
  touch "$STATE/$MARKER"
  echo "$n" >"$STATE/size"
  echo "$bin" >"$STATE/bin"
  local spec
  : >"$STATE/tmpfs"
  if [ -n "${MF_TMPFS:-}" ]; then
    IFS=, read -r -a spec <<<"$MF_TMPFS"
    for i in "${spec[@]}"; do
      [[ $i =~ ^([1-9][0-9]*)=([1-9][0-9]*[kmg]?)$ ]] || die "bad MF_TMPFS entry '$i' (want NODE=SIZE, e.g. 3=64m)"
      [ "${BASH_REMATCH[1]}" -le "$n" ] || die "MF_TMPFS: no node ${BASH_REMATCH[1]} in a cluster of $n"
      echo "${BASH_REMATCH[1]} ${BASH_REMATCH[2]}" >>"$STATE/tmpfs"
    done
  fi
  # The APIs listen on 0.0.0.0 (reachable from the host), which needs a token;
  # the nodes listen for peers on the bridge, which needs a network key.
  od -An -tx1 -N16 /dev/urandom | tr -d ' \n' >"$STATE/token"
  od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$STATE/netkey"

  ip link add "$BRIDGE" type bridge
  disable_ipv6 "$BRIDGE"
  ip addr add "$HOST_IP/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  for ((i = 1; i <= n; i++)); do
    ip netns add "$(ns "$i")"
    ip netns exec "$(ns "$i")" sh -c 'echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6; echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6' 2>/dev/null || true
    ip link add "$(host_veth "$i")" type veth peer name "$(node_veth "$i")" netns "$(ns "$i")"
    disable_ipv6 "$(host_veth "$i")"
    disable_ipv6 "$(ns "$i")" "$(node_veth "$i")"
    ip link set "$(host_veth "$i")" master "$BRIDGE" up
    ip -n "$(ns "$i")" addr add "$(node_ip "$i")/24" dev "$(node_veth "$i")"
    ip -n "$(ns "$i")" link set "$(node_veth "$i")" up
    ip -n "$(ns "$i")" link set lo up
  done
  for ((i = 1; i <= n; i++)); do start_node "$i"; done
  UP_DONE=1
  trap - EXIT INT TERM
  echo "up: $n nodes; APIs $(node_url 1) .. $(node_url "$n"); logs $STATE/nI/log"
}

# One JSON object per line per node: {node, addr, api, alive, pid, status}, where
# status is the node's GET /v1/status (null when dead or not answering).
node_objs() {
  local n i pid js
  n=$(size)
  for ((i = 1; i <= n; i++)); do
    pid=$(node_pid "$i")
    js=
    [ -n "$pid" ] && js=$(api_curl -s --max-time 3 "$(node_url "$i")/v1/status" 2>/dev/null || true)
    # (jq 1.6 -e exits 0 on empty input, so test for it first)
    { [ -n "$js" ] && echo "$js" | jq -e 'type == "object" and has("peer_id")' >/dev/null 2>&1; } || js=null
    jq -n -c --argjson i "$i" --arg addr "$(node_ip "$i")" --arg url "$(node_url "$i")" \
      --arg pid "$pid" --argjson st "$js" \
      '{node: $i, addr: $addr, api: $url, alive: ($pid != ""),
        pid: (if $pid == "" then null else ($pid | tonumber) end), status: $st}'
  done
}

cmd_status() {
  local json=
  case "${1:-}" in
    "") ;;
    --json) json=1 ;;
    *) die "usage: $0 status [--json]" ;;
  esac
  need_cmd curl curl
  need_cmd jq jq
  local objs
  objs=$(node_objs)
  if [ -n "$json" ]; then
    echo "$objs" | jq -s .
    return
  fi
  {
    echo "NODE ADDR ALIVE PID PEER_ID DOCS PEERS DIGEST"
    echo "$objs" | jq -r '[("n\(.node)"), .addr, (if .alive then "yes" else "no" end),
      (.pid // "-"), (.status.peer_id // "-"), (.status.docs // "-"), (.status.peers // "-"),
      (if .status == null then "-" elif (.status | has("digest")) then (.status.digest // "null")
       else "(absent)" end)] | map(tostring) | join(" ")'
  } | awk '{ printf "%-5s %-11s %-5s %-7s %-52s %5s %5s  %s\n", $1, $2, $3, $4, $5, $6, $7, $8 }'
}

# A node's fingerprint for wait-converged: its status digest, or, when the
# binary's /v1/status has no digest field, a hash of GET /v1/docs ids + heads.
node_fingerprint() {
  local i=$1 js
  js=$(api_curl -sf --max-time 3 "$(node_url "$i")/v1/status") || return 1
  if echo "$js" | jq -e 'has("digest")' >/dev/null; then
    echo "$js" | jq -r '"\(.docs) \(.digest // "null")"'
  else
    local docs list
    docs=$(echo "$js" | jq -r '.docs')
    list=$(api_curl -sf --max-time 5 "$(node_url "$i")/v1/docs") || return 1
    echo "$docs docs:$(echo "$list" | jq -S -c '[.[] | {id, heads: (.heads | sort)}] | sort_by(.id)' | sha256sum | cut -c1-16)"
  fi
}

cmd_wait_converged() {
  local timeout=120
  while [ $# -gt 0 ]; do
    case "$1" in
      --timeout) [ $# -ge 2 ] || die "--timeout needs seconds"; timeout=$2; shift 2 ;;
      --timeout=*) timeout=${1#*=}; shift ;;
      *) die "usage: $0 wait-converged [--timeout S]" ;;
    esac
  done
  [[ $timeout =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "bad timeout '$timeout'"
  need_cmd curl curl
  need_cmd jq jq
  local n t0 now i fp first ok live dead
  n=$(size)
  t0=$(date +%s.%N)
  while :; do
    ok=1 first='' live=0 dead=''
    for ((i = 1; i <= n; i++)); do
      if [ -z "$(node_pid "$i")" ]; then dead+=" n$i"; continue; fi
      live=$((live + 1))
      if ! fp=$(node_fingerprint "$i") || [[ $fp == *" null" ]]; then ok=; break; fi
      if [ -z "$first" ]; then first=$fp; elif [ "$fp" != "$first" ]; then ok=; break; fi
    done
    [ "$live" -gt 0 ] || die "no live nodes"
    now=$(date +%s.%N)
    if [ -n "$ok" ]; then
      printf 'converged in %ss: %d live nodes, docs=%s digest=%s%s\n' \
        "$(awk -v a="$now" -v b="$t0" 'BEGIN { printf "%.1f", a - b }')" "$live" "${first%% *}" "${first#* }" \
        "${dead:+ (not running:$dead)}"
      return 0
    fi
    if awk -v a="$now" -v b="$t0" -v t="$timeout" 'BEGIN { exit !(a - b >= t) }'; then
      note "not converged after ${timeout}s:"
      cmd_status >&2
      exit 1
    fi
    sleep 0.5
  done
}

# Adds (once) a jump from CHAIN_FROM to CHAIN in namespace NS; creates CHAIN.
ipt_chain() {
  local nsn=$1 chain=$2 from
  shift 2
  ip netns exec "$nsn" iptables -w -N "$chain" 2>/dev/null || true
  for from in "$@"; do
    ip netns exec "$nsn" iptables -w -C "$from" -j "$chain" 2>/dev/null \
      || ip netns exec "$nsn" iptables -w -I "$from" 1 -j "$chain"
  done
}

ipt_remove_chain() {
  local nsn=$1 chain=$2 from
  command -v iptables >/dev/null 2>&1 || return 0
  for from in INPUT OUTPUT; do
    while ip netns exec "$nsn" iptables -w -D "$from" -j "$chain" 2>/dev/null; do :; done
  done
  ip netns exec "$nsn" iptables -w -F "$chain" 2>/dev/null || true
  ip netns exec "$nsn" iptables -w -X "$chain" 2>/dev/null || true
}

cmd_partition() {
  [ $# -ge 2 ] || die "usage: $0 partition G1 G2 ... (groups of comma-separated nodes, e.g. 1 2,3)"
  need_cmd iptables iptables
  local n g i j ref arg refs
  n=$(size)
  local -A group=()
  g=0
  for arg in "$@"; do
    g=$((g + 1))
    IFS=, read -r -a refs <<<"$arg"
    [ ${#refs[@]} -gt 0 ] || die "empty group"
    for ref in "${refs[@]}"; do
      i=$(node_num "$ref")
      [ -z "${group[$i]:-}" ] || die "node $i is in two groups"
      group[$i]=$g
    done
  done
  for ((i = 1; i <= n; i++)); do
    ipt_chain "$(ns "$i")" MF-PART INPUT OUTPUT
    ip netns exec "$(ns "$i")" iptables -w -F MF-PART
    [ -n "${group[$i]:-}" ] || continue
    for ((j = 1; j <= n; j++)); do
      if [ -n "${group[$j]:-}" ] && [ "${group[$j]}" != "${group[$i]}" ]; then
        ip netns exec "$(ns "$i")" iptables -w -A MF-PART -s "$(node_ip "$j")" -j DROP
        ip netns exec "$(ns "$i")" iptables -w -A MF-PART -d "$(node_ip "$j")" -j DROP
      fi
    done
  done
  echo "partition: $*"
}

cmd_heal() {
  local n i nsn dev
  n=$(size)
  for ((i = 1; i <= n; i++)); do
    nsn=$(ns "$i")
    dev=$(node_veth "$i")
    [[ " $(our_netns | tr '\n' ' ') " == *" $nsn "* ]] || continue
    ipt_remove_chain "$nsn" MF-PART
    ipt_remove_chain "$nsn" MF-NETEM
    nfq_stop "$i"
    if ip netns exec "$nsn" tc qdisc show dev "$dev" root 2>/dev/null | grep netem >/dev/null; then
      ip netns exec "$nsn" tc qdisc del dev "$dev" root
    fi
  done
  echo "healed: no partition rules, netem qdiscs or loss rules"
}

cmd_netem() {
  [ $# -ge 2 ] || die "usage: $0 netem NODE ARGS... (tc netem arguments, e.g. delay 50ms loss 5%)"
  need_cmd tc iproute2
  local i nsn dev err
  i=$(node_num "$1")
  shift
  nsn=$(ns "$i")
  dev=$(node_veth "$i")
  if err=$(ip netns exec "$nsn" tc qdisc replace dev "$dev" root netem "$@" 2>&1); then
    echo "netem n$i ($dev): $(ip netns exec "$nsn" tc qdisc show dev "$dev" root)"
    return 0
  fi
  # Fall back to iptables only when the kernel has no netem qdisc at all.
  [[ $err == *"qdisc kind is unknown"* ]] || die "tc qdisc replace dev $dev root netem $*: $err"
  local loss='' dup='' delay='' jitter=0 a=("$@") k=0 bad=() which
  while [ "$k" -lt ${#a[@]} ]; do
    which=${a[$k]}
    if [ "$which" = delay ] && [ -n "${MF_NFQ_DELAY:-}" ]; then
      k=$((k + 1))
      [[ ${a[$k]:-} =~ ^([0-9]+)ms$ ]] || die "bad delay '${a[$k]:-}' (want e.g. 50ms)"
      delay=${BASH_REMATCH[1]}
      if [[ ${a[$((k + 1))]:-} =~ ^([0-9]+)ms$ ]]; then
        k=$((k + 1))
        jitter=${BASH_REMATCH[1]}
      fi
    elif [ "$which" = reorder ] && [ -n "${MF_NFQ_DELAY:-}" ]; then
      # nfq-delay reorders through the jitter; skip netem's percentages.
      while [[ ${a[$((k + 1))]:-} =~ %$ ]]; do k=$((k + 1)); done
    elif [ "$which" = loss ] || [ "$which" = duplicate ]; then
      k=$((k + 1))
      [ "${a[$k]:-}" = random ] && k=$((k + 1))
      [[ ${a[$k]:-} =~ ^[0-9]+(\.[0-9]+)?%$ ]] || die "bad $which '${a[$k]:-}' (want e.g. 5%)"
      if [ "$which" = loss ]; then loss=${a[$k]}; else dup=${a[$k]}; fi
    else
      bad+=("${a[$k]}")
    fi
    k=$((k + 1))
  done
  if [ -z "$loss$dup$delay" ] || [ ${#bad[@]} -gt 0 ]; then
    die "this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM is off; tc says: $err)." \
      "Only 'loss P%' and 'duplicate P%' can be emulated here (iptables), and 'delay D [J]'" \
      "with MF_NFQ_DELAY set to a tools/nfq-delay binary; not supported: ${bad[*]:-(nothing to do)}"
  fi
  need_cmd iptables iptables
  prob() { awk -v p="${1%\%}" 'BEGIN { printf "%.6f", p / 100 }'; }
  ipt_chain "$nsn" MF-NETEM OUTPUT
  ip netns exec "$nsn" iptables -w -F MF-NETEM
  nfq_stop "$i" # the new settings replace the old ones, a delay included
  # Only traffic to other nodes: the host's status polling stays reliable.
  ip netns exec "$nsn" iptables -w -A MF-NETEM -d "$HOST_IP" -j RETURN
  if [ -n "$dup" ]; then # TEE sends a copy of the packet to its own destination
    local j n
    n=$(size)
    for ((j = 1; j <= n; j++)); do
      [ "$j" -eq "$i" ] && continue
      ip netns exec "$nsn" iptables -w -A MF-NETEM -d "$(node_ip "$j")" \
        -m statistic --mode random --probability "$(prob "$dup")" -j TEE --gateway "$(node_ip "$j")"
    done
  fi
  if [ -n "$loss" ]; then
    ip netns exec "$nsn" iptables -w -A MF-NETEM -d "$NET.0/24" \
      -m statistic --mode random --probability "$(prob "$loss")" -j DROP
  fi
  if [ -n "$delay" ]; then
    # Queue 0 of this namespace; --queue-bypass lets packets through
    # unhindered whenever no nfq-delay is bound to it.
    ip netns exec "$nsn" iptables -w -A MF-NETEM -d "$NET.0/24" -j NFQUEUE --queue-num 0 --queue-bypass
    ip netns exec "$nsn" "$MF_NFQ_DELAY" 0 "$delay" "$jitter" "${MF_NFQ_SEED:-1}" \
      >>"$(node_dir "$i")/nfq-delay.log" 2>&1 &
    echo $! >"$(node_dir "$i")/nfq.pid"
  fi
  echo "netem n$i: kernel has no netem qdisc; emulating${loss:+ loss $loss}${dup:+ duplicate $dup}${delay:+ delay ${delay}ms+0..${jitter}ms (nfq-delay)} on n$i's output to other nodes"
}

# Stops node I's nfq-delay, if one runs (its rule is gone or bypassed then).
nfq_stop() {
  local f p
  f="$(node_dir "$1")/nfq.pid"
  [ -f "$f" ] || return 0
  p=$(cat "$f")
  rm -f -- "$f"
  [[ $p =~ ^[0-9]+$ ]] || return 0
  kill_wait TERM 5 "$p" || kill_wait KILL 5 "$p" || note "nfq-delay $p did not exit"
}

cmd_signal() { # cmd_signal STOP|CONT NODE
  local sig=$1 i pid
  i=$(node_num "$2")
  pid=$(node_pid "$i")
  [ -n "$pid" ] || die "node $i is not running"
  kill "-$sig" "$pid"
  echo "sent SIG$sig to node $i (pid $pid)"
}

cmd_kill() {
  [ $# -eq 1 ] || die "usage: $0 kill NODE"
  local i pid
  i=$(node_num "$1")
  pid=$(node_pid "$i")
  [ -n "$pid" ] || die "node $i is not running"
  kill_wait KILL 5 "$pid" || die "node $i (pid $pid) did not die"
  echo "killed node $i (pid $pid) with SIGKILL"
}

cmd_restart() {
  [ $# -eq 1 ] || die "usage: $0 restart NODE"
  local i
  i=$(node_num "$1")
  if [ -n "$(node_pid "$i")" ]; then
    note "node $i is running; stopping it (SIGTERM)"
    stop_node "$i"
  fi
  start_node "$i"
}

main() {
  local cmd=${1:-}
  [ $# -gt 0 ] && shift
  case "$cmd" in
    -h | --help | help) usage; exit 0 ;;
    "") usage >&2; exit 2 ;;
  esac
  need_root "$cmd" "$@"
  case "$cmd" in
    up) cmd_up "$@" ;;
    down) cmd_down ;;
    status) cmd_status "$@" ;;
    wait-converged) cmd_wait_converged "$@" ;;
    partition) cmd_partition "$@" ;;
    heal) cmd_heal ;;
    netem) cmd_netem "$@" ;;
    kill) cmd_kill "$@" ;;
    pause) [ $# -eq 1 ] || die "usage: $0 pause NODE"; cmd_signal STOP "$1" ;;
    resume) [ $# -eq 1 ] || die "usage: $0 resume NODE"; cmd_signal CONT "$1" ;;
    restart) cmd_restart "$@" ;;
    token) api_token ;;
    url)
      [ $# -eq 1 ] || die "usage: $0 url NODE"
      local u
      u=$(node_num "$1")
      node_url "$u"
      ;;
    exec)
      [ $# -ge 2 ] || die "usage: $0 exec NODE CMD..."
      local i
      i=$(node_num "$1")
      shift
      exec ip netns exec "$(ns "$i")" "$@"
      ;;
    *) usage >&2; die "unknown command '$cmd'" ;;
  esac
}

main "$@"
