#!/usr/bin/env bash
# A small IoT site on this machine: a gateway node with workflows
# (examples/iot/workflows) and three simulated sensors running as light
# nodes. The sensors write readings; the gateway derives each sensor's
# average, alerts when one runs hot, and settles a conflicting device
# setpoint by priority. Everything on loopback; data in a temp dir that is
# removed at the end (KEEP=1 keeps it).
#
# Usage: examples/iot/run.sh   (builds the release binary first;
#        MERGEFLOW_BIN=path uses a binary you built)
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;; esac

HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/../common.sh"

get() { mf "$1" doc get "$2" --path "$3" --json 2>/dev/null || echo null; }
# wait_for NAME DOC POINTER VALUE: until NAME reads VALUE there.
wait_for() {
    for _ in $(seq 600); do
        [ "$(get "$1" "$2" "$3")" = "$4" ] && return
        sleep 0.1
    done
    die "$1: $2$3 is $(get "$1" "$2" "$3"), not $4"
}
sensor() { start_local "$1" --light "${@:2}"; }

echo "1. the gateway starts with its workflows"
mkdir -p "$WORK/gateway"
cp -r "$HERE/workflows" "$WORK/gateway/workflows"
start gateway --config "$HERE/gateway.toml"
GW=$(p2p_addr gateway)
mf gateway workflow list | sed 's/^/   /'

echo "2. a setpoint conflict: s1 sets heater-1 to 25 while cut off, the gateway sets 21"
sensor s1
mf s1 doc patch devices/heater-1 '{"setpoint": 25}' >/dev/null
stop s1
mf gateway doc patch devices/heater-1 '{"setpoint": 21}' >/dev/null

echo "3. three sensors join as light nodes"
sensor s1 --peer "$GW"
sensor s2 --peer "$GW"
sensor s3 --peer "$GW"
wait_for s1 devices/heater-1 /setpoint 21
echo "   heater-1 setpoint on s1 after the merge: $(get s1 devices/heater-1 /setpoint) (the gateway's priority 10 beats s1's 0)"
mf gateway doc history devices/heater-1 | sed 's/^/   /'


echo "4. the sensors report readings; s3 runs hot"
declare -A READINGS=([s1]="" [s2]="" [s3]="")
for round in 1 2 3 4 5 6; do
    for s in s1 s2 s3; do
        case $s in
            s1) v="21.$round" ;;
            s2) v="19.$((round + 2))" ;;
            s3) v="$((26 + round * 2)).5" ;;
        esac
        READINGS[$s]="${READINGS[$s]:+${READINGS[$s]}, }$v"
        # The last five readings.
        last5=$(echo "${READINGS[$s]}" | tr ',' '\n' | tail -5 | paste -sd, -)
        mf "$s" doc patch "sensors/$s" "{\"readings\": [$last5]}" >/dev/null
    done
    sleep 0.2
done
for s in s1 s2 s3; do
    r=$(get gateway "sensors/$s" /readings | tr -d ' \n')
    for _ in $(seq 300); do
        [ "$(get "$s" "sensors/$s" /readings | tr -d ' \n')" = "$r" ] && [ "$(get "$s" "sensors/$s" /avg)" != null ] && break
        sleep 0.1
    done
    echo "   $s: readings $r, average $(get "$s" "sensors/$s" /avg) (derived by the gateway, read on $s)"
done

echo "5. the gateway alerted once per hot state of s3"
for _ in $(seq 300); do
    [ -s "$WORK/gateway/alerts.jsonl" ] && break
    sleep 0.1
done
[ -s "$WORK/gateway/alerts.jsonl" ] || die "no alert was written"
python3 - "$WORK/gateway/alerts.jsonl" <<'PY' 2>/dev/null || sed 's/^/   /' "$WORK/gateway/alerts.jsonl" | cut -c1-160
import json, sys
for line in open(sys.argv[1]):
    if line.strip():
        a = json.loads(line)
        print(f"   alert: {a['run']['doc']} average {a['doc']['avg']:.1f} (idempotency key {a['run']['idempotency_key'][:16]}...)")
PY
mf gateway runs --workflow average --limit 5 | sed 's/^/   /'

echo "6. memory of each node (RSS)"
command -v ps >/dev/null || { echo "   (no ps here)"; echo ok; exit 0; }
for n in gateway s1 s2 s3; do
    echo "   $n: $(ps -o rss= -p "${PID[$n]}" | awk '{ printf "%.1f MiB", $1 / 1024 }')$( [ "$n" = gateway ] || echo ' (light)')"
done
echo "ok"
