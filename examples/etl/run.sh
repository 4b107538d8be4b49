#!/usr/bin/env bash
# ETL with a sync mesh in the middle, on this machine: a product catalog
# (a REST service) is pulled into a doc every 2 s by a scheduled workflow,
# a second workflow derives a summary doc from it on every change, and a
# third pushes each new summary to a reporting service. Two nodes run the
# same workflows: the pull and the push happen once (on one owner), the
# docs converge on both. Everything on loopback; data in a temp dir that is
# removed at the end (KEEP=1 keeps it).
#
# Usage: examples/etl/run.sh   (builds the release binary and the services
#        first; MERGEFLOW_BIN=path and ETL_SERVICES=path use ones you built)
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;; esac

HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/../common.sh"

if [ -z "${ETL_SERVICES:-}" ]; then
    echo "building the example services (release)..."
    (cd "$ROOT" && cargo build --release --quiet --example etl_services)
    ETL_SERVICES=$ROOT/target/release/examples/etl_services
fi
get() { mf "$1" doc get "$2" --path "$3" --json 2>/dev/null || echo null; }
# until_true SECONDS 'TEST': evaluates TEST (a quoted shell test, expanded
# anew each time) every 0.1 s until it holds.
until_true() {
    local tries=$(($1 * 10))
    for _ in $(seq "$tries"); do eval "$2" && return 0; sleep 0.1; done
    return 1
}

echo "1. the outside services: a product catalog (needs a token) and a reporting service"
export SOURCE_TOKEN=demo-token
(cd "$WORK" && exec "$ETL_SERVICES" >"$WORK/services.out" 2>&1) &
SERVICES=$!
trap 'kill $SERVICES 2>/dev/null || true; cleanup' EXIT
until_true 30 'grep -q "^source=" "$WORK/services.out"' || die "the services did not start"
SOURCE=$(sed -n 's/^source=\([^ ]*\) .*/\1/p' "$WORK/services.out")
REPORTS=$(sed -n 's/.* reports=\([^ ]*\)$/\1/p' "$WORK/services.out")
echo "   source $SOURCE, reports $REPORTS"

echo "2. two nodes with the same three workflows (pull, summarize, push)"
for n in a b; do
    mkdir -p "$WORK/$n/workflows"
    for f in "$HERE"/workflows/*.toml; do
        sed -e "s#SOURCE_URL#$SOURCE#" -e "s#REPORTS_URL#$REPORTS#" "$f" >"$WORK/$n/workflows/$(basename "$f")"
    done
done
start_local a
start_local b --peer "$(p2p_addr a)"
mf a workflow list | sed 's/^/   /'

echo "3. the first pull lands, the summary is derived, and pushed once"
until_true 60 '[ "$(get b catalog/summary /count)" = 4 ]' || die "no summary on b: $(get b catalog/summary '')"
echo "   summary on b: $(mf b doc get catalog/summary --json | tr -d " \n")"
until_true 30 '[ -s "$WORK/reports.jsonl" ]' || die "nothing was pushed"

echo "4. upstream changes a price; the next pull writes only that, and the new summary is pushed"
"$ETL_SERVICES" set-price "$SOURCE" C-400 99.5
until_true 60 '[ "$(get a catalog/summary /max)" = 99.5 ]' || die "the new price did not arrive: $(get a catalog/summary '')"
until_true 30 'grep -q "\"max\":99.5" "$WORK/reports.jsonl"' || die "the new summary was not pushed"
echo "   catalog on a: C-400 costs $(get a catalog/products /items/C-400/price), summary max $(get a catalog/summary /max)"
until_true 30 '[ "$(get b catalog/summary /max)" = 99.5 ]' || die "b did not converge"
echo "   and on b: summary max $(get b catalog/summary /max)"
echo "   reports received (each summary state once):"
sed 's/^/     /' "$WORK/reports.jsonl"
dups=$(sed 's/.*"key":"\([^"]*\)".*/\1/' "$WORK/reports.jsonl" | sort | uniq -d | wc -l)
[ "$dups" = 0 ] || die "a report was stored twice"
echo "   the last pushes, as node a's run log shows them:"
mf a runs --workflow push-summary --limit 3 | sed 's/^/     /'
echo ok
