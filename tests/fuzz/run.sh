#!/usr/bin/env bash
# A bounded fuzz run, as CI runs it: builds every target in tests/fuzz and
# runs each for SECONDS (default 10) from its corpus. Fails on the first
# crash, hang (-timeout), allocation over -malloc_limit_mb or RSS over
# -rss_limit_mb; the input that did it is left in tests/fuzz/artifacts/<target>/
# and its name is printed. Prints each target's executions and the total.
#
#   bash tests/fuzz/run.sh [SECONDS]
#
# Environment (all optional):
#   FUZZ_TARGETS="jwt config"  only these targets (default: `cargo fuzz list`)
#   FUZZ_BUILD="--dev -s none" flags for `cargo fuzz build`/`run`; CI uses these
#                              (an unoptimized build without AddressSanitizer
#                              compiles in a fraction of the time; overflow
#                              checks stay on, and -rss_limit_mb still bounds
#                              memory). Default: release with debug assertions
#                              and AddressSanitizer, for long runs.
#   FUZZ_GROW=1                new inputs go into the kept corpus, which is
#                              then minimized (`cargo fuzz cmin`, a set cover
#                              of the edges reached); otherwise they go to a
#                              scratch directory.
#   FUZZ_TARGET_DIR=dir        the build's target dir (default tests/fuzz/target)
#
# cargo-fuzz is installed when missing; the nightly toolchain is used when
# rustup has one, otherwise the stable compiler with RUSTC_BOOTSTRAP=1 (cargo
# fuzz needs -Z flags). See docs/testing.md.
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
read -r -a build <<<"${FUZZ_BUILD:-}"
dirs=(--fuzz-dir tests/fuzz --target-dir "${FUZZ_TARGET_DIR:-tests/fuzz/target}")

echo "== building the fuzz targets ${build[*]}"
"${fuzz[@]}" build "${build[@]}" "${dirs[@]}"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
targets="${FUZZ_TARGETS:-$("${fuzz[@]}" list --fuzz-dir tests/fuzz)}"
total=0
for target in $targets; do
    corpus="tests/fuzz/corpus/$target"
    mkdir -p "$corpus"
    if [[ "${FUZZ_GROW:-}" == 1 ]]; then
        into=("$corpus")
    else
        mkdir -p "$scratch/$target"
        into=("$scratch/$target" "$corpus")
    fi
    log="$scratch/$target.log"
    if ! "${fuzz[@]}" run "${build[@]}" "${dirs[@]}" "$target" "${into[@]}" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=512 \
        -print_final_stats=1 >"$log" 2>&1; then
        tail -n 60 "$log"
        echo "FAILED: fuzz target $target; reproduce with:"
        echo "  ${fuzz[*]} run ${build[*]} --fuzz-dir tests/fuzz $target tests/fuzz/artifacts/$target/<file>"
        exit 1
    fi
    runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")"
    total=$((total + ${runs:-0}))
    echo "fuzz $target: ${runs:-?} executions in ${secs}s, no crash"
    if [[ "${FUZZ_GROW:-}" == 1 ]]; then
        # Set cover over edges alone: the fewest inputs that keep every edge.
        "${fuzz[@]}" cmin "${build[@]}" "${dirs[@]}" "$target" "$corpus" -- \
            -set_cover_merge=1 -use_counters=0 >"$log" 2>&1 || {
            tail -n 20 "$log"
            exit 1
        }
        echo "fuzz $target: corpus minimized to $(find "$corpus" -type f | wc -l) inputs"
    fi
done
echo "fuzz: $total executions in total, no crash"
