#!/usr/bin/env bash
# The SDK's full test run, as CI runs it: installs the locked Node packages,
# builds the SDK and the demo, and runs every test (unit, against real Chorus
# nodes, and the demo in Debian's Chromium through playwright-core).
#
#   bash sdk/js/test.sh
#
# Builds the chorus binary with `cargo build -p chorus-node` (target/debug/chorus)
# unless CHORUS_BIN names one. Chromium: /usr/bin/chromium, or $CHROMIUM.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
repo="$(cd ../.. && pwd)"

if [[ -z "${CHORUS_BIN:-}" ]]; then
    echo "== building chorus"
    (cd "$repo" && cargo build -q -p chorus-node)
    target="${CARGO_TARGET_DIR:-target}"
    [[ "$target" = /* ]] || target="$repo/$target"
    export CHORUS_BIN="$target/debug/chorus"
fi
[[ -x "$CHORUS_BIN" ]] || { echo "no chorus binary at $CHORUS_BIN" >&2; exit 1; }
chromium="${CHROMIUM:-/usr/bin/chromium}"
[[ -x "$chromium" ]] || { echo "$chromium is missing: apt-get install -y chromium" >&2; exit 1; }

echo "== sdk/js: npm ci"
npm ci --no-audit --no-fund --loglevel=error
echo "== build (SDK, tests, demo type check)"
npm run -s build
npm run -s build:test
npx tsc -p demo/tsconfig.json
echo "== tests"
# Files run two at a time; each starts its own node(s) on free ports.
node --test --test-concurrency=2 build/test/*.test.js
