#!/usr/bin/env bash
# Three mergeflow nodes on this machine: start them, write on each, watch them
# converge, kill one with SIGKILL, write while it is down, restart it and
# watch it catch up. Everything on loopback; the nodes' data lives in a temp
# dir that is removed at the end (KEEP=1 keeps it).
#
# Usage: examples/cluster/run.sh   (builds the release binary first;
#        MERGEFLOW_BIN=path uses a binary you built)
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;; esac

source "$(dirname "$0")/../common.sh"

peer_id() { mf "$1" status | awk '/^peer_id/ { print $2 }'; }
doc_json() { mf "$1" doc get "$2" --json 2>/dev/null | tr '\n' ' ' | tr -s ' ' || true; }

# converged DOC: waits until all three nodes return the same JSON for DOC.
converged() {
    local doc=$1 start_ms=$(date +%s%3N)
    for _ in $(seq 600); do
        local a b c
        a=$(doc_json n1 "$doc")
        b=$(doc_json n2 "$doc")
        c=$(doc_json n3 "$doc")
        if [ -n "$a" ] && [ "$a" = "$b" ] && [ "$b" = "$c" ]; then
            echo "   converged in $(( $(date +%s%3N) - start_ms )) ms: $a"
            return
        fi
        sleep 0.1
    done
    die "$doc did not converge: n1=$a n2=$b n3=$c"
}

echo "1. starting three nodes (n2 and n3 dial n1)"
start_local n1
N1=$(p2p_addr n1)
[ -n "$N1" ] || die "n1 has no p2p address"
start_local n2 --peer "$N1"
start_local n3 --peer "$N1"
for n in n1 n2 n3; do echo "   $n: api ${API[$n]}, peer $(peer_id $n)"; done

echo "2. each node writes its own key of one doc, at the same time"
WRITERS=()
for n in n1 n2 n3; do mf "$n" doc patch rooms/kitchen "{\"$n\": \"hello from $n\"}" >/dev/null & WRITERS+=($!); done
wait "${WRITERS[@]}"
converged rooms/kitchen

echo "3. kill -9 n3, then write on n1 and n2 while it is down"
kill -9 "${PID[n3]}"; wait "${PID[n3]}" 2>/dev/null || true; unset 'PID[n3]'
mf n1 doc patch rooms/kitchen '{"while_n3_was_down": true}' >/dev/null
mf n2 doc patch rooms/hall '{"lights": "on"}' >/dev/null
echo "   n1 holds: $(doc_json n1 rooms/kitchen)"

echo "4. restart n3 on its data dir: it recovers and catches up"
start_local n3 --peer "$N1"
converged rooms/kitchen
converged rooms/hall
# n3 dials n1 and finds n2 through it (Kademlia): let both links come up, so
# that wait-synced checks n3 against both peers, not only the first.
for _ in $(seq 1 600); do
  [ "$(mf n3 peers --json | grep -c '"connected": true')" -ge 2 ] && break
  sleep 0.1
done
mf n3 wait-synced --timeout 60 | sed 's/^/   n3: /'
echo "ok: every write reached every node, including the one that was killed"
