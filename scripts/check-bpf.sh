#!/usr/bin/env bash
# Fails when the committed eBPF object is not what its source builds to.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
nightly=$(sed -n 's/^channel = "\(.*\)"/\1/p' "$root/redirector-bpf/redirector-ebpf/rust-toolchain.toml")
if ! rustup toolchain list 2>/dev/null | grep -q "^$nightly" || ! command -v bpf-linker >/dev/null; then
  echo "check-bpf: SKIPPED: $nightly or bpf-linker missing (run make setup); testing the committed object" >&2
  exit 0
fi
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
"$root/scripts/build-bpf.sh" "$tmp" >/dev/null
if ! cmp -s "$tmp" "$root/redirector-bpf/redirector/bpf/redirector.bpf.o"; then
  echo "check-bpf: redirector-bpf/redirector/bpf/redirector.bpf.o does not match its source: run make bpf and commit it" >&2
  exit 1
fi
echo "check-bpf: committed eBPF object matches its source"
