#!/usr/bin/env bash
# Runs `cargo test` with the given arguments, shows its output, and ends with one line that
# totals every test binary's result: "summary: N passed, N failed, N skipped".
set -uo pipefail
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
# Every fuzz target, briefly, on its committed corpus and crash reproducers (FUZZ_SECONDS each;
# `make fuzz` runs them for long). Counted below as one test per target.
"$(dirname "$0")/fuzz.sh" --dev --seconds "${FUZZ_SECONDS:-8}" 2>&1 | tee -a "$log"
fuzz_status=${PIPESTATUS[0]}
[ "$status" -ne 0 ] || status=$fuzz_status
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "summary: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$status"
