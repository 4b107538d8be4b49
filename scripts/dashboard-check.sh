#!/usr/bin/env bash
# Checks the web dashboard in a real browser: starts two nodes on loopback
# (the first with an API token and a workflow whose alert fails), then drives
# Debian's Chromium headless through playwright-core (scripts/dashboard/
# check.mjs) and checks what a person would see: the token prompt, node
# identity, labels, uptime and addresses, the peer by its label, the plots,
# the document prefix filter, a document's JSON and history updating live,
# the failed run in the dead runs list with its step error shown once, a
# Retry click that makes it succeed, and an effect both nodes run naming
# the node that delivered it.
#
# The screenshot goes to a temp dir, removed at exit, unless
# --update-screenshot is given: then it replaces docs/dashboard.png (a
# tracked file; commit it when the dashboard changed). The nodes and the temp
# dir are removed at exit, whatever the exit (a failed check, Ctrl-C, SIGTERM).
#
# Needs Node.js 18+ and npm (playwright-core is installed under
# ~/.cache/mergeflow-dashboard-check), and /usr/bin/chromium: installed with
# apt-get when missing, which needs root. Sends nothing off this machine.
#
# With --serve it sets up the same two nodes and failed run, prints their
# APIs and the token, and keeps them running until Ctrl-C or SIGTERM, for a
# look with your own browser; it needs neither Chromium nor Node.js then.
#
# Usage: scripts/dashboard-check.sh [--update-screenshot | --serve]
#        (MERGEFLOW_BIN=path to use a built binary)
set -euo pipefail
MODE=check
case "${1:-}" in
    -h|--help) sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
    --update-screenshot) MODE=update ;;
    --serve) MODE=serve ;;
    '') ;;
    *) echo "dashboard-check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
esac

ROOT=$(cd "$(dirname "$0")/.." && pwd)
die() { echo "dashboard-check: $*" >&2; exit 1; }

if [ "$MODE" != serve ]; then
    source "$ROOT/scripts/headless.sh"
    headless_tools
    cp "$ROOT/scripts/dashboard/check.mjs" "$TOOLS/check.mjs"
fi

if [ -z "${MERGEFLOW_BIN:-}" ]; then
    (cd "$ROOT" && cargo build --quiet --bin mergeflow)
    MERGEFLOW_BIN=$ROOT/target/debug/mergeflow
fi
BIN=$MERGEFLOW_BIN

WORK=$(mktemp -d)
PIDS=()
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
HOOK_PORT=$(free_port)
TOKEN=dashboard-check-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
export MERGEFLOW_API_TOKEN=$TOKEN
# The workflow the check applies posts to a receiver on loopback.
export MERGEFLOW_WORKFLOW_HTTP_ALLOW='["127.0.0.1"]'
# A scoped token that may read events/** only: the page shows it only those.
VIEWER=viewer-check-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
export MERGEFLOW_API_TOKENS="[{name = \"viewer\", token = \"$VIEWER\", read = [\"events/**\"]}]"

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

# Labels name the nodes on the dashboard. Node b runs a workflow too (on
# docs nobody writes), so it announces its labels in its membership doc.
printf '[node]\nlabels = { name = "greenhouse-gw", site = "north" }\n' > "$WORK/a.toml"
printf '[node]\nlabels = { name = "field-relay" }\n' > "$WORK/b.toml"
mkdir -p "$WORK/b/workflows"
cat > "$WORK/b/workflows/idle.toml" <<TOML
name = "idle"

[on]
doc = "idle/*"

[[steps]]
id = "mark"
kind = "derive"
set = { "/seen" = "true" }
TOML

# Starts a node and sets STARTED to its API base once it is ready. It runs
# in this shell (never in $(...), whose subshell would lose the pid in PIDS
# and leave the node running after exit).
start() {
    local name=$1; shift
    "$BIN" start --data-dir "$WORK/$name" --api 127.0.0.1:0 --listen /ip4/127.0.0.1/tcp/0 \
        --no-mdns --log-level warn "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" &
    PIDS+=($!)
    for _ in $(seq 600); do
        if grep -q ' ready: ' "$WORK/$name.out" 2>/dev/null; then
            STARTED=$(sed -n 's/.* api=\([^ ]*\) .*/\1/p' "$WORK/$name.out")
            return
        fi
        kill -0 "${PIDS[-1]}" 2>/dev/null || { cat "$WORK/$name.err" >&2; die "node $name exited"; }
        sleep 0.1
    done
    cat "$WORK/$name.err" >&2
    die "node $name did not start"
}
start a --config "$WORK/a.toml"
A=$STARTED
A_P2P=$("$BIN" status --api "$A" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["listen_addrs"][0])')
start b --config "$WORK/b.toml" --peer "$A_P2P"
B=$STARTED
echo "nodes: a=$A (pid ${PIDS[0]}) b=$B (pid ${PIDS[1]})"

for i in 1 2 3; do "$BIN" doc patch "notes/$i" "{\"text\": \"note $i\"}" --api "$A" >/dev/null; done
"$BIN" doc patch sensors/gh-2 '{"celsius": 21}' --api "$A" >/dev/null
"$BIN" doc patch sensors/gh-1 '{"celsius": 45}' --api "$A" >/dev/null
# (The CLI's output is taken whole before grep reads it: `cli | grep -q`
# under pipefail fails whenever grep stops reading early.)
dead=
for _ in $(seq 600); do
    dead=$("$BIN" runs --status dead --api "$A" --json)
    if grep -q '"dead"' <<<"$dead"; then break; fi
    sleep 0.1
done
grep -q '"dead"' <<<"$dead" || die "the failing run did not die"

if [ "$MODE" = serve ]; then
    echo "serving: open $A/ (token $TOKEN) or $B/; Ctrl-C stops both nodes"
    wait
    exit 0
fi
SHOT=$WORK/dashboard.png
[ "$MODE" = update ] && SHOT=$ROOT/docs/dashboard.png
(cd "$TOOLS" && node check.mjs "$A" "$TOKEN" "$HOOK_PORT" "$SHOT" "$VIEWER")
[ "$MODE" = update ] && echo "docs/dashboard.png updated"
exit 0
