#!/usr/bin/env bash
# A todo list page on automerge-repo, live on two mergeflow nodes: builds the
# page's bundle (npm ci and esbuild, pinned by package-lock.json), starts two
# nodes on loopback (n2 dials n1), writes the shared doc todos/shared over
# HTTP on n1, serves the page and prints one address per node. Open both (two
# tabs or two browsers): an item added in one shows in the other, and a curl
# on either node sees it (the commands are printed too). Ctrl-C stops it all
# and removes the temp dir (KEEP=1 keeps it).
#
# With --check it drives the page in headless Chromium instead (what
# scripts/browser-check.sh runs) and exits: 0 when every check passed.
#
# Needs Node.js 20+ and npm. Usage: examples/browser/run.sh [--check]
#        (builds the release binary first; MERGEFLOW_BIN=path uses yours)
set -euo pipefail
MODE=serve
case "${1:-}" in
    -h|--help) sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
    --check) MODE=check ;;
    '') ;;
    *) echo "browser: unknown argument '$1' (see --help)" >&2; exit 2 ;;
esac
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/../common.sh"
# common.sh's cleanup stops everything in PID[], the page server included.
trap cleanup EXIT
command -v npm >/dev/null || die "Node.js 20+ and npm are needed (apt-get install nodejs npm)"

echo "1. building the page (esbuild)"
(cd "$HERE" && { [ -d node_modules ] || npm ci --no-audit --no-fund --loglevel=error; } && npm run --silent build >/dev/null 2>&1) \
    || die "the bundle did not build (cd examples/browser && npm ci && npm run build)"

node "$HERE/serve.mjs" >"$WORK/serve.out" 2>&1 &
PID[serve]=$!
for _ in $(seq 100); do grep -q '^serving ' "$WORK/serve.out" && break; sleep 0.1; done
PAGE=$(sed -n 's/^serving \(.*\)/\1/p' "$WORK/serve.out")
[ -n "$PAGE" ] || die "the page server did not start: $(cat "$WORK/serve.out")"
# The page comes from another origin than the nodes' APIs: the nodes must
# allow it (api.allow_origins), or they refuse its WebSocket with 403.
printf '[api]\nallow_origins = ["%s"]\n' "${PAGE%/}" >"$WORK/node.toml"

echo "2. starting two nodes (n2 dials n1), allowing the page's origin ${PAGE%/}"
start_local n1 -c "$WORK/node.toml"
N1=$(p2p_addr n1)
[ -n "$N1" ] || die "n1 has no p2p address"
start_local n2 -c "$WORK/node.toml" --peer "$N1"

echo "3. writing todos/shared on n1"
curl -sf -X PATCH "${API[n1]}/v1/docs/todos%2Fshared" -H 'content-type: application/json' \
    -d '{"title": "Shared todos", "items": [{"text": "written over HTTP on n1", "done": false}]}' >/dev/null \
    || die "could not write todos/shared on n1"
DOC=$(curl -sf "${API[n1]}/v1/docs/todos%2Fshared/url" | sed 's/.*"url":"\([^"]*\)".*/\1/')

ws() { echo "${API[$1]}" | sed 's|^http|ws|'; }
URL1="${PAGE}?node=$(ws n1)/v1/automerge&doc=$DOC"
URL2="${PAGE}?node=$(ws n2)/v1/automerge&doc=$DOC"

if [ "$MODE" = check ]; then
    source "$ROOT/scripts/headless.sh"
    headless_tools
    cp "$HERE/check.mjs" "$TOOLS/browser-check.mjs"
    echo "4. driving two pages in headless Chromium"
    NODE_PATH="$TOOLS/node_modules" node "$TOOLS/browser-check.mjs" "$URL1" "$URL2" "${API[n1]}" "${API[n2]}"
    exit
fi

cat <<EOT
4. open the page once per node:
   n1: $URL1
   n2: $URL2
   and edit from a shell:
   curl -s ${API[n2]}/v1/docs/todos%2Fshared
   curl -s -X POST ${API[n2]}/v1/docs/todos%2Fshared/ops -H 'content-type: application/json' \\
     -d '[{"op": "insert", "path": "/items/-", "value": {"text": "from curl on n2", "done": false}}]'
   Ctrl-C stops the nodes.
EOT
wait "${PID[n1]}"
