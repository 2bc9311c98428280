#!/usr/bin/env bash
# Builds the cargo-fuzz targets in fuzz/ and runs each for SECONDS (default 60),
# failing on the first crash. Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
#
# New inputs that reach new code stay in fuzz/corpus/TARGET (git ignores all but the
# seed-* files); a crashing input is kept in fuzz/artifacts/TARGET and the script
# prints the command that replays it.
#
# Stable Rust: cargo-fuzz's default AddressSanitizer needs nightly's -Zsanitizer, so
# the targets are built with `--sanitizer none` (safe Rust needs no ASan; panics,
# overflow and debug assertions still crash, and libFuzzer's coverage works).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds=${1:-60}
shift || true
# The fuzz crate has its own target directory; a CARGO_TARGET_DIR meant for the root
# crate would mix instrumented and plain builds.
unset CARGO_TARGET_DIR
export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-2}

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi

echo "== cargo fuzz build (${targets[*]})"
start=$(date +%s)
nice -n 10 cargo fuzz build --sanitizer none
echo "== built in $(($(date +%s) - start)) s"

passed=0
for target in "${targets[@]}"; do
    echo "== $target: ${seconds} s"
    mkdir -p "corpus/$target" "artifacts/$target"
    log="artifacts/$target/last-run.log"
    # -timeout: one input taking over 10 s is a hang; -rss_limit_mb bounds memory.
    status=0
    nice -n 10 cargo fuzz run --sanitizer none "$target" "corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$log" 2>&1 || status=$?
    # The coverage reached (cov: edges, ft: features), the corpus and the executions.
    grep -E '^#[0-9]+[[:space:]]+(INITED|DONE)|^stat::(number_of_executed_units|peak_rss_mb)' "$log" || true
    if [ "$status" -ne 0 ]; then
        grep -E 'panicked|^==[0-9]+==|SUMMARY|Test unit written|^error' "$log" >&2 || true
        echo "== $target FAILED (exit $status); full log: fuzz/$log" >&2
        grep -oE 'Test unit written to [^ ]+' "$log" | awk '{print $NF}' | while read -r a; do
            echo "   replay: (cd fuzz && cargo fuzz run --sanitizer none $target $a)" >&2
        done
        echo "fuzz: $passed passed, 1 failed"
        exit 1
    fi
    passed=$((passed + 1))
done
echo "== no crash, ${seconds} s per target"
echo "fuzz: $passed passed, 0 failed"
