#!/usr/bin/env bash
# The full test run, as CI runs it: formatting, lints, and every test of the
# workspace, with the ScyllaDB backend tested against a real CQL server
# (Apache Cassandra 5, fetched and started by scripts/cassandra.sh).
#
#   bash scripts/test.sh
#
# With CHORUS_CQL already set (host:port of a running ScyllaDB/Cassandra),
# that server is used and nothing is started. A plain `cargo test --workspace`
# runs everything but the CQL tests, which then say how to run them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "== rustfmt"
cargo fmt --all -- --check
echo "== clippy"
cargo clippy --workspace --all-targets -- -D warnings

if [[ -z "${CHORUS_CQL:-}" ]]; then
    echo "== starting Cassandra"
    bash scripts/cassandra.sh start
    trap 'bash scripts/cassandra.sh stop' EXIT
    export CHORUS_CQL=127.0.0.1:9042
fi
# The CQL tests fail, instead of skipping, when the server is missing.
export CHORUS_REQUIRE_CQL=1

echo "== tests"
cargo test --workspace

# The single-node suites again, their clients and API calls spread
# round-robin over a 3-node cluster in one process (tests/src/cluster.rs).
echo "== tests, clients spread over a 3-node cluster"
CHORUS_TEST_NODES=3 cargo test -p chorus-tests --test chat --test presence \
    --test notifications --test topics --test catchup --test auth --test passivation \
    -- --test-threads 2
bash sdk/js/test.sh
echo "== stock Yjs clients (y-websocket) against real nodes, one and two (CQL)"
bash tests/yjs/test.sh
echo "== schemathesis: the server API against its OpenAPI document (docs/testing.md)"
bash scripts/schemathesis.sh
echo "== fuzz: every target for 10 s (an unoptimized build without ASan; its target dir is kept between runs)"
FUZZ_BUILD="--dev -s none" FUZZ_TARGET_DIR="${FUZZ_TARGET_DIR:-$HOME/.cache/chorus-fuzz-target}" bash tests/fuzz/run.sh 10
