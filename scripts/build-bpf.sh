#!/usr/bin/env bash
# Builds the redirector's kernel programs and writes the object to $1 (default: the committed
# redirector-bpf/redirector/bpf/redirector.bpf.o).
#
# The object must be the same byte for byte wherever the repository is cloned (CI compares it
# with the committed one), but rustc's crate hashes depend on the sources' absolute paths. So the
# two crates are copied to one fixed build directory and built there.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/redirector-bpf/redirector/bpf/redirector.bpf.o}
build=${L7MESH_BPF_BUILD_DIR:-/var/tmp/l7mesh-bpf-build}
toolchain=$(sed -n 's/^channel = "\(.*\)"/\1/p' "$root/redirector-bpf/redirector-ebpf/rust-toolchain.toml")
mkdir -p "$build"
for crate in redirector-common redirector-ebpf; do
  mkdir -p "$build/$crate"
  # --checksum: unchanged files keep their times, so cargo's incremental build still works.
  rsync -a --checksum --delete --exclude target "$root/redirector-bpf/$crate/" "$build/$crate/"
done
# Added to .cargo/config.toml's rustflags (cargo merges the two): no host paths in the object.
export CARGO_TARGET_BPFEL_UNKNOWN_NONE_RUSTFLAGS="--remap-path-prefix=$build=/l7mesh \
 --remap-path-prefix=$HOME/.cargo=/cargo --remap-path-prefix=$HOME/.rustup=/rustup"
cd "$build/redirector-ebpf"
cargo "+$toolchain" build --release --locked
cp target/bpfel-unknown-none/release/redirector "$out"
echo "eBPF object written to $out ($(stat -c %s "$out") bytes)"
