#!/usr/bin/env bash
# A release tarball: dist/l7mesh-<version>-<arch>.tar.gz with the four binaries, the committed
# eBPF object (the binaries embed it; it is there to inspect with bpftool), the systemd unit,
# the settings file, shell completions, man pages and install.sh.
#   scripts/package.sh [--profile release|debug] [--bin-dir DIR] [--out DIR]
# --profile debug packs target/debug as built (the tests use it); release builds first;
# --bin-dir packs the binaries found there, as built.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
profile=release
out="$root/dist"
bin_dir=
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --bin-dir) bin_dir=$2; shift 2 ;;
    *) echo "package: unknown argument $1" >&2; exit 2 ;;
  esac
done
bins=(l7ctl l7proxy policy-api tls-broker)
target=${bin_dir:-${CARGO_TARGET_DIR:-$root/target}/$profile}
if [ -z "$bin_dir" ] && [ "$profile" = release ]; then
  (cd "$root" && cargo build --release $(printf -- '-p %s ' "${bins[@]}"))
fi
for b in "${bins[@]}"; do
  [ -x "$target/$b" ] || { echo "package: $target/$b is missing (cargo build --workspace --bins${profile/debug/})" >&2; exit 1; }
done
version=$("$target/l7ctl" --version | awk '{print $2}')
name="l7mesh-$version-$(uname -m)"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
dir="$stage/$name"
install -d "$dir/bin" "$dir/lib/l7mesh" "$dir/lib/systemd/system" "$dir/etc/l7mesh"
# Without their debug info (most of a binary's size); the symbols stay, for backtraces and perf.
for b in "${bins[@]}"; do install -m 0755 "$target/$b" "$dir/bin/" && strip --strip-debug "$dir/bin/$b"; done
install -m 0644 "$root/redirector-bpf/redirector/bpf/redirector.bpf.o" "$dir/lib/l7mesh/"
install -m 0644 "$root/packaging/l7mesh.service" "$dir/lib/systemd/system/"
install -m 0644 "$root/packaging/config.yaml" "$dir/etc/l7mesh/"
install -m 0755 "$root/packaging/install.sh" "$dir/"
install -m 0644 "$root/README.md" "$dir/"
# Shell completions and man pages, generated from l7ctl's own command definitions.
install -d "$dir/share/bash-completion/completions" "$dir/share/zsh/site-functions" \
  "$dir/share/fish/vendor_completions.d" "$dir/share/man/man1"
"$target/l7ctl" completion bash >"$dir/share/bash-completion/completions/l7ctl"
"$target/l7ctl" completion zsh >"$dir/share/zsh/site-functions/_l7ctl"
"$target/l7ctl" completion fish >"$dir/share/fish/vendor_completions.d/l7ctl.fish"
"$target/l7ctl" man --dir "$dir/share/man/man1" >/dev/null
mkdir -p "$out"
tar -C "$stage" -czf "$out/$name.tar.gz" "$name"
echo "$out/$name.tar.gz"
