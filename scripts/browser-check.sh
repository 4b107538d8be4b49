#!/usr/bin/env bash
# Checks the browser example (examples/browser/) in a real browser: two
# nodes on loopback, the todo page open once on each in Debian's Chromium
# (headless, through playwright-core), and checks that a todo written over
# HTTP shows on both pages, an item added in one page shows in the other and
# on the second node as a JSON string, an HTTP write on one node shows in the
# page on the other, and ticking an item done travels back. Sends nothing off
# this machine.
#
# Needs Node.js 20+ and npm, and /usr/bin/chromium (installed with apt-get
# when missing, which needs root).
#
# Usage: scripts/browser-check.sh   (MERGEFLOW_BIN=path to use a built binary)
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;; esac
exec "$(dirname "$0")/../examples/browser/run.sh" --check
