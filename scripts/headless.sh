# Sourced by the scripts that drive a page in headless Chromium
# (dashboard-check.sh, examples/browser/run.sh --check); not run by itself.
#
# headless_tools: makes sure /usr/bin/chromium (Debian's package; installed
# with apt-get when missing, which needs root) and playwright-core (under
# ~/.cache/mergeflow-dashboard-check) are there, and sets TOOLS to that
# directory: a check script copied into it imports playwright-core from
# there. Needs `die` from the sourcing script.
headless_tools() {
    if ! [ -x /usr/bin/chromium ]; then
        [ "$(id -u)" = 0 ] || die "/usr/bin/chromium is missing; run as root to install it (apt-get install chromium)"
        echo "installing Debian's chromium..."
        DEBIAN_FRONTEND=noninteractive apt-get install -y chromium >/dev/null
    fi
    command -v node >/dev/null || die "Node.js 20+ is needed (https://nodejs.org or apt-get install nodejs npm)"
    TOOLS=${XDG_CACHE_HOME:-$HOME/.cache}/mergeflow-dashboard-check
    if ! [ -d "$TOOLS/node_modules/playwright-core" ]; then
        echo "installing playwright-core into $TOOLS..."
        mkdir -p "$TOOLS"
        npm install --silent --no-audit --no-fund --prefix "$TOOLS" playwright-core@1 >/dev/null
    fi
}
