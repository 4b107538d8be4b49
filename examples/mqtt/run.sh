#!/usr/bin/env bash
# Devices that speak MQTT, in the mesh, on this machine: a Mosquitto broker,
# three simulated devices publishing readings (mosquitto_pub), a gateway
# node bridging the broker into docs, a second node that syncs with it, and
# a workflow on the gateway that raises an alert doc when a device runs hot,
# which the bridge publishes back to MQTT for a listener (mosquitto_sub).
# Everything on loopback; data in a temp dir that is removed at the end
# (KEEP=1 keeps it). Needs Debian's mosquitto and mosquitto-clients.
#
# Usage: examples/mqtt/run.sh   (builds the release binary first;
#        MERGEFLOW_BIN=path uses a binary you built)
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;; esac

PATH="$PATH:/usr/sbin"
for tool in mosquitto mosquitto_pub mosquitto_sub; do
    command -v "$tool" >/dev/null || { echo "mqtt: $tool is missing (apt-get install mosquitto mosquitto-clients)" >&2; exit 3; }
done
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/../common.sh"

get() { mf "$1" doc get "$2" --path "$3" --json 2>/dev/null | tr -d ' \n' || echo null; }
# until_true SECONDS 'TEST': evaluates TEST anew every 0.1 s until it holds.
until_true() {
    local tries=$(($1 * 10))
    for _ in $(seq "$tries"); do eval "$2" && return 0; sleep 0.1; done
    return 1
}

echo "1. a Mosquitto broker on a free loopback port"
for _ in $(seq 50); do
    PORT=$((20000 + RANDOM % 40000))
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && continue  # taken
    printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n' "$PORT" >"$WORK/mosquitto.conf"
    mosquitto -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
    PID[broker]=$!
    if until_true 5 '(exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null'; then break; fi
    unset "PID[broker]"
done
[ -n "${PID[broker]:-}" ] || die "mosquitto did not start"
echo "   mqtt://127.0.0.1:$PORT"

echo "2. the gateway bridges it: readings in, alerts out; a second node syncs"
mkdir -p "$WORK/gateway/workflows"
cp "$HERE"/workflows/*.toml "$WORK/gateway/workflows/"
cat >"$WORK/gateway.toml" <<TOML
[[mqtt]]
url = "mqtt://127.0.0.1:$PORT"
client_id = "gateway"

[[mqtt.in]]
subscribe = "sensors/+/reading"
doc = "sensors/{1}"
path = "/readings/-"

[[mqtt.out]]
publish = "alerts/*"
topic = "alerts/{1}"
retain = true
TOML
start_local gateway --config "$WORK/gateway.toml"
start_local replica --peer "$(p2p_addr gateway)"
until_true 30 '"$BIN" status --api "${API[gateway]}" --json | tr -d " \n" | grep -q "\"mqtt\":\[{[^]]*\"connected\":true"' \
    || die "the bridge did not connect"
mosquitto_sub -p "$PORT" -t 'alerts/#' -C 1 -W 60 -v >"$WORK/alerts.txt" 2>&1 &
LISTENER=$!

echo "3. three devices publish five readings each (QoS 1); dev3 runs hot"
for i in 1 2 3 4 5; do
    for d in dev1 dev2 dev3; do
        case $d in dev1) c="21.$i" ;; dev2) c="19.$i" ;; dev3) c="$((26 + i * 2)).5" ;; esac
        mosquitto_pub -p "$PORT" -q 1 -t "sensors/$d/reading" -m "{\"seq\": $i, \"celsius\": $c}"
    done
done
for d in dev1 dev2 dev3; do
    until_true 60 '[ "$(get replica sensors/'"$d"' /readings | grep -o seq | wc -l)" = 5 ]' \
        || die "replica: sensors/$d has $(get replica "sensors/$d" /readings)"
    echo "   $d on the replica: 5 readings, last $(get replica "sensors/$d" /last) °C"
done

echo "4. the alert reached the listener over MQTT, and the replica holds it too"
wait "$LISTENER" || die "no alert was published: $(cat "$WORK/alerts.txt")"
echo "   $(cat "$WORK/alerts.txt")"
until_true 30 '[ "$(get replica alerts/site /hot/sensors~1dev3/celsius)" = 36.5 ]' \
    || die "replica: alerts/site is $(get replica alerts/site '')"
echo "   alerts/site on the replica: $(get replica alerts/site '')"
echo ok
