#!/usr/bin/env bash
# Builds the redirector's kernel programs and writes the object to $1 (default: the committed
# redirector-bpf/redirector/bpf/redirector.bpf.o). Paths are remapped so that the object is the
# same byte for byte whichever directory the repository is cloned into.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/redirector-bpf/redirector/bpf/redirector.bpf.o}
toolchain=$(sed -n 's/^channel = "\(.*\)"/\1/p' "$root/redirector-bpf/redirector-ebpf/rust-toolchain.toml")
# Added to .cargo/config.toml's rustflags (cargo merges the two).
export CARGO_TARGET_BPFEL_UNKNOWN_NONE_RUSTFLAGS="\
 --remap-path-prefix=$root=/l7mesh --remap-path-prefix=$HOME/.cargo=/cargo --remap-path-prefix=$HOME/.rustup=/rustup"
cd "$root/redirector-bpf/redirector-ebpf"
cargo "+$toolchain" build --release --locked
cp target/bpfel-unknown-none/release/redirector "$out"
echo "eBPF object written to $out ($(stat -c %s "$out") bytes)"
