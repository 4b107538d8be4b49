#!/usr/bin/env bash
# Checks the web dashboard in a real browser: starts two nodes on loopback
# (the first with an API token and a workflow whose alert fails), then drives
# Debian's Chromium headless through playwright-core (scripts/dashboard/
# check.mjs) and checks what a person would see: the token prompt, node
# identity and addresses, the peer, document search, a document's JSON and
# history updating live, the failed run listed first with its step error, and
# a Retry click that makes it succeed. Saves docs/dashboard.png.
#
# Needs Node.js 18+ and npm (playwright-core is installed under
# ~/.cache/mergeflow-dashboard-check), and /usr/bin/chromium: installed with
# apt-get when missing, which needs root. Sends nothing off this machine.
#
# Usage: scripts/dashboard-check.sh   (MERGEFLOW_BIN=path to use a built binary)
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;; esac

ROOT=$(cd "$(dirname "$0")/.." && pwd)
die() { echo "dashboard-check: $*" >&2; exit 1; }

if ! [ -x /usr/bin/chromium ]; then
    [ "$(id -u)" = 0 ] || die "/usr/bin/chromium is missing; run as root to install it (apt-get install chromium)"
    echo "installing Debian's chromium..."
    DEBIAN_FRONTEND=noninteractive apt-get install -y chromium >/dev/null
fi
command -v node >/dev/null || die "Node.js 18+ is needed (https://nodejs.org or apt-get install nodejs npm)"
TOOLS=${XDG_CACHE_HOME:-$HOME/.cache}/mergeflow-dashboard-check
if ! [ -d "$TOOLS/node_modules/playwright-core" ]; then
    echo "installing playwright-core into $TOOLS..."
    mkdir -p "$TOOLS"
    npm install --silent --no-audit --no-fund --prefix "$TOOLS" playwright-core@1 >/dev/null
fi
cp "$ROOT/scripts/dashboard/check.mjs" "$TOOLS/check.mjs"

if [ -z "${MERGEFLOW_BIN:-}" ]; then
    (cd "$ROOT" && cargo build --quiet)
    MERGEFLOW_BIN=$ROOT/target/debug/mergeflow
fi
BIN=$MERGEFLOW_BIN

WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
HOOK_PORT=$(free_port)
TOKEN=dashboard-check-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
export MERGEFLOW_API_TOKEN=$TOKEN

# Node a runs a workflow whose alert goes to a port nobody listens on (yet).
mkdir -p "$WORK/a/workflows"
cat > "$WORK/a/workflows/overheat.toml" <<TOML
name = "overheat"

[on]
doc = "sensors/*"
path = "/celsius"
origin = "local"

[[steps]]
id = "alert"
kind = "http"
when = "doc.celsius > 40"
url = "http://127.0.0.1:$HOOK_PORT/alerts"
timeout = "2s"
retry = { attempts = 1 }
TOML

# Starts a node; prints its API base once it is ready.
start() {
    local name=$1; shift
    "$BIN" start --data-dir "$WORK/$name" --api 127.0.0.1:0 --listen /ip4/127.0.0.1/tcp/0 \
        --no-mdns --log-level warn "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" &
    PIDS+=($!)
    for _ in $(seq 600); do
        if grep -q ' ready: ' "$WORK/$name.out" 2>/dev/null; then
            sed -n 's/.* api=\([^ ]*\) .*/\1/p' "$WORK/$name.out"
            return
        fi
        sleep 0.1
    done
    cat "$WORK/$name.err" >&2
    die "node $name did not start"
}
A=$(start a)
A_P2P=$("$BIN" status --api "$A" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["listen_addrs"][0])')
B=$(start b --peer "$A_P2P")
echo "nodes: a=$A b=$B"

for i in 1 2 3; do "$BIN" doc patch "notes/$i" "{\"text\": \"note $i\"}" --api "$A" >/dev/null; done
"$BIN" doc patch sensors/gh-2 '{"celsius": 21}' --api "$A" >/dev/null
"$BIN" doc patch sensors/gh-1 '{"celsius": 45}' --api "$A" >/dev/null
for _ in $(seq 600); do
    if "$BIN" runs --status dead --api "$A" --json | grep -q '"dead"'; then break; fi
    sleep 0.1
done
"$BIN" runs --status dead --api "$A" --json | grep -q '"dead"' || die "the failing run did not die"

mkdir -p "$ROOT/docs"
(cd "$TOOLS" && node check.mjs "$A" "$TOKEN" "$HOOK_PORT" "$ROOT/docs/dashboard.png")
