#!/usr/bin/env bash
# Stock Yjs clients (yjs, y-websocket and ws from npm, versions locked in
# package-lock.json) against real Chorus nodes: see interop.test.mjs.
#
#   bash tests/yjs/test.sh
#
# Builds the chorus binary (target/debug/chorus) unless CHORUS_BIN names one.
# The cluster case needs CHORUS_CQL=host:port (scripts/cassandra.sh start);
# without it, it is skipped (it fails instead under CHORUS_REQUIRE_CQL=1).
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

echo "== tests/yjs: npm ci"
npm ci --no-audit --no-fund --loglevel=error
echo "== y-websocket interop"
node --test --test-concurrency=1 interop.test.mjs
