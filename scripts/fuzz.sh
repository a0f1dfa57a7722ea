#!/usr/bin/env bash
# Runs the fuzz targets of fuzz/ (cargo-fuzz, libFuzzer) for a set time each.
#
#   scripts/fuzz.sh [--seconds N] [--dev] [--merge] [TARGET ...]
#
# Default: every target, 60 s each, optimized build. --dev builds without optimizations (a much
# shorter build; what `make test` uses for its brief runs).
#
# Each target starts from its committed corpus (fuzz/corpus/TARGET, read only) and its committed
# crash reproducers (fuzz/regressions/TARGET: every input that once crashed, kept so it stays
# found); new inputs go to fuzz/work/TARGET (not committed; --merge folds the ones that add
# coverage into the committed corpus). A crash or a hang (an input over 5 s) fails the target
# and leaves the input in fuzz/artifacts/TARGET. Ends with a "test result:" line that
# scripts/test-summary.sh counts (one test per target).
#
# Built with the eBPF programs' pinned nightly (cargo-fuzz needs one) and no sanitizer: the code
# under test is safe Rust, so the oracles are panics, overflow checks, debug assertions and the
# targets' own assertions.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root/fuzz"
seconds=60
merge=0
profile=release
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds=$2; shift 2 ;;
    --merge) merge=1; shift ;;
    --dev) profile=debug; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) targets+=("$1"); shift ;;
  esac
done
nightly=$(sed -n 's/^channel = "\(.*\)"/\1/p' "$root/redirector-bpf/redirector-ebpf/rust-toolchain.toml")
if ! rustup toolchain list 2>/dev/null | grep -q "^$nightly"; then
  echo "fuzz: the toolchain $nightly is not installed (scripts/setup.sh installs it)" >&2; exit 1
fi
command -v cargo-fuzz >/dev/null || { echo "fuzz: cargo-fuzz is not installed (scripts/setup.sh installs it)" >&2; exit 1; }
# The fuzz workspace keeps its own target dir: its code is instrumented, unlike the main build.
unset CARGO_TARGET_DIR
build=(-s none)
[ "$profile" = release ] || build+=(--dev)
cargo "+$nightly" fuzz build "${build[@]}" >&2 || { echo "fuzz: build failed" >&2; exit 1; }
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo "+$nightly" fuzz list)
bin="$root/fuzz/target/x86_64-unknown-linux-gnu/$profile"
passed=0 failed=0
for t in "${targets[@]}"; do
  mkdir -p "work/$t" "artifacts/$t" "corpus/$t" "regressions/$t"
  log="artifacts/$t/last-run.log"
  start=$(date +%s)
  # The Kafka targets take inputs of up to 1 MiB: decode amplification (thousands of cheap
  # entries) needs room to show.
  extra=()
  case "$t" in kafka_request|kafka_response) extra=(-max_len=1048576) ;; esac
  "$bin/$t" "work/$t" "corpus/$t" "regressions/$t" -max_total_time="$seconds" -timeout=5 \
    -rss_limit_mb=2048 -artifact_prefix="artifacts/$t/" -print_final_stats=1 "${extra[@]}" >"$log" 2>&1
  status=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
  if [ $status -eq 0 ]; then
    passed=$((passed + 1))
    echo "fuzz $t: ok (${runs:-?} inputs in $(( $(date +%s) - start )) s)"
  else
    failed=$((failed + 1))
    echo "fuzz $t: FAILED (exit $status); the input is in fuzz/artifacts/$t/, the log in fuzz/$log:"
    grep -E "panicked|ERROR: libFuzzer|SUMMARY|Test unit written" "$log" | head -n 8 | sed 's/^/  /'
  fi
  if [ $merge -eq 1 ]; then
    "$bin/$t" -merge=1 "corpus/$t" "work/$t" >/dev/null 2>&1 || echo "fuzz $t: merge failed" >&2
  fi
done
result=ok; [ $failed -eq 0 ] || result=FAILED
echo "test result: $result. $passed passed; $failed failed; 0 ignored; 0 measured; 0 filtered out (fuzz, ${seconds} s each)"
[ $failed -eq 0 ]
