# Helpers shared by the example scripts (sourced, not run).
#
# Sets BIN (MERGEFLOW_BIN, or the release build, built first) and WORK (a
# temp dir, removed on exit unless KEEP=1), and stops every node started
# with `start` on exit.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${MERGEFLOW_BIN:-}" ]; then
    echo "building mergeflow (release)..."
    (cd "$ROOT" && cargo build --release --quiet --bin mergeflow)
    MERGEFLOW_BIN=$ROOT/target/release/mergeflow
fi
BIN=$MERGEFLOW_BIN
WORK=$(mktemp -d)
declare -A PID API
cleanup() {
    for n in "${!PID[@]}"; do kill "${PID[$n]}" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ -n "${KEEP:-}" ]; then echo "data kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
die() { echo "$(basename "$(dirname "$0")"): $*" >&2; exit 1; }

# start NAME [flags...]: runs a node on $WORK/NAME and waits for its ready
# line; its API goes to API[NAME], its pid to PID[NAME].
start() {
    local name=$1; shift
    : >"$WORK/$name.out"
    "$BIN" start --data-dir "$WORK/$name" --log-level warn "$@" \
        >>"$WORK/$name.out" 2>>"$WORK/$name.err" &
    PID[$name]=$!
    for _ in $(seq 600); do
        if grep -q ' ready: ' "$WORK/$name.out"; then
            API[$name]=$(sed -n 's/.* api=\([^ ]*\) .*/\1/p' "$WORK/$name.out" | tail -1)
            return
        fi
        kill -0 "${PID[$name]}" 2>/dev/null || { cat "$WORK/$name.err" >&2; die "node $name exited"; }
        sleep 0.1
    done
    die "node $name did not start"
}
# On loopback only: API and p2p on free ports, no mDNS.
start_local() { local name=$1; shift; start "$name" --api 127.0.0.1:0 --listen /ip4/127.0.0.1/tcp/0 --no-mdns "$@"; }
# stop NAME: SIGTERM, and wait for it to exit.
stop() { kill "${PID[$1]}"; wait "${PID[$1]}" 2>/dev/null || true; unset "PID[$1]"; }
# mf NAME ARGS...: the CLI against node NAME.
mf() { local name=$1; shift; "$BIN" "$@" --api "${API[$name]}"; }
p2p_addr() { mf "$1" status | awk '/^listen/ { print $2; exit }'; }
