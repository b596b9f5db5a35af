#!/usr/bin/env bash
# A short, bounded fuzz run, as CI runs it: builds every target in
# tests/fuzz and runs each for SECONDS (default 10) from its corpus. Fails on
# the first crash, hang (-timeout), allocation over -malloc_limit_mb or RSS
# over -rss_limit_mb; the input that did it is left in
# tests/fuzz/artifacts/<target>/ and its name is printed.
#
#   bash tests/fuzz/run.sh [SECONDS]
#
# New inputs a run finds go to a scratch directory, not into the kept corpus
# (grow that one on purpose: see docs/testing.md). cargo-fuzz is installed
# when missing; the nightly toolchain is used when rustup has one, otherwise
# the stable compiler with RUSTC_BOOTSTRAP=1 (cargo fuzz needs -Z flags).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
secs="${1:-10}"

if ! command -v cargo-fuzz >/dev/null; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    fuzz=(cargo +nightly fuzz)
    echo "== fuzzing with $(rustc +nightly --version)"
else
    export RUSTC_BOOTSTRAP=1
    fuzz=(cargo fuzz)
    echo "== fuzzing with $(rustc --version) and RUSTC_BOOTSTRAP=1"
fi
# A target dir of its own: the instrumented build never fights the
# workspace's target/ lock, and stays between runs.
dirs=(--fuzz-dir tests/fuzz --target-dir tests/fuzz/target)

"${fuzz[@]}" build "${dirs[@]}"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
total=0
for target in $("${fuzz[@]}" list --fuzz-dir tests/fuzz); do
    mkdir -p "$scratch/$target"
    log="$scratch/$target.log"
    if ! "${fuzz[@]}" run "${dirs[@]}" "$target" "$scratch/$target" "tests/fuzz/corpus/$target" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=512 \
        -print_final_stats=1 >"$log" 2>&1; then
        tail -n 60 "$log"
        echo "FAILED: fuzz target $target; reproduce with:"
        echo "  ${fuzz[*]} run --fuzz-dir tests/fuzz $target tests/fuzz/artifacts/$target/<file>"
        exit 1
    fi
    runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")"
    total=$((total + ${runs:-0}))
    echo "fuzz $target: ${runs:-?} executions in ${secs}s, no crash"
done
echo "fuzz: $total executions in total, no crash"
