#!/usr/bin/env bash
# The server API against its own OpenAPI document, as CI runs it: starts a
# real node (target/debug/chorus, built when missing or stale) on a free port
# of 127.0.0.1 with a temporary data directory, and runs schemathesis (from
# PyPI, pinned below, installed into .venv-schemathesis/) on
# GET /api/v1/openapi.json: examples, coverage, fuzzing and stateful phases,
# positive and negative data. It fails on any 5xx, any response whose status,
# content type or body the document does not describe, and any request that
# breaks the schema yet is accepted. Bounded: SCHEMATHESIS_MAX_EXAMPLES per
# operation (default 40) and SCHEMATHESIS_MAX_TIME seconds in all (default
# 120). Needs python3 (with venv) and network access to PyPI the first time.
#
#   bash scripts/schemathesis.sh
#
# SCHEMATHESIS_SEED=<n> replays a run (every run prints its seed).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

version=4.32.5
venv=.venv-schemathesis
max_examples="${SCHEMATHESIS_MAX_EXAMPLES:-40}"
max_time="${SCHEMATHESIS_MAX_TIME:-120}"

if [[ "$("$venv/bin/st" --version 2>/dev/null)" != "st, version $version" ]]; then
    echo "== installing schemathesis $version into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$version"
fi

echo "== building chorus"
cargo build --quiet -p chorus-node --bin chorus
bin="${CARGO_TARGET_DIR:-target}/debug/chorus"

work="$(mktemp -d)"
node_pid=""
cleanup() {
    if [[ -n "$node_pid" ]] && kill -0 "$node_pid" 2>/dev/null; then
        kill -TERM "$node_pid" 2>/dev/null || true
        wait "$node_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

key="st-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
CHORUS_AUTH_API_KEY="$key" CHORUS_LOG_LEVEL=error \
    "$bin" start --listen 127.0.0.1:0 --data-dir "$work/data" --node-id schemathesis \
    >"$work/stdout" 2>"$work/node.log" &
node_pid=$!
addr=""
for _ in $(seq 100); do
    addr="$(sed -n 's/^listening on //p' "$work/stdout")"
    [[ -n "$addr" ]] && break
    kill -0 "$node_pid" 2>/dev/null || break
    sleep 0.1
done
if [[ -z "$addr" ]]; then
    cat "$work/node.log"
    echo "FAILED: the node did not start"
    exit 1
fi
echo "== node on $addr; schemathesis (max $max_examples examples per operation, ${max_time}s)"

seed=()
[[ -n "${SCHEMATHESIS_SEED:-}" ]] && seed=(--seed "$SCHEMATHESIS_SEED")
status=0
timeout $((max_time + 120)) "$venv/bin/st" run "http://$addr/api/v1/openapi.json" \
    --header "x-api-key: $key" \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,negative_data_rejection \
    --mode all \
    --phases examples,coverage,fuzzing,stateful \
    --max-examples "$max_examples" \
    --max-time "$max_time" \
    --workers 1 \
    --request-timeout 10 \
    --generation-database none \
    --no-color \
    "${seed[@]}" || status=$?

if ! kill -0 "$node_pid" 2>/dev/null; then
    tail -n 50 "$work/node.log"
    echo "FAILED: the node died during the run"
    exit 1
fi
if [[ $status -ne 0 ]]; then
    tail -n 50 "$work/node.log"
    echo "FAILED: schemathesis found problems (exit $status)"
    exit "$status"
fi
echo "schemathesis: no failures"
