# l7mesh: the two commands (README) and the pieces they are made of. Everything needs root.
SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:$(PATH)
CARGO ?= cargo

.PHONY: setup build demo test lint check-bpf bpf bench fuzz package man completion

## set-up: apt packages, bpffs, the eBPF toolchain (each only when missing)
setup:
	@scripts/setup.sh

build: setup
	$(CARGO) build --workspace --bins

## Man pages (l7ctl.1, l7ctl-apply.1, ...) from l7ctl's own --help, into target/man.
man:
	$(CARGO) build -p l7ctl
	target/debug/l7ctl man --dir target/man

## Shell completion scripts for l7ctl (bash, zsh, fish), into target/completion.
completion:
	$(CARGO) build -p l7ctl
	mkdir -p target/completion
	target/debug/l7ctl completion bash > target/completion/l7ctl.bash
	target/debug/l7ctl completion zsh > target/completion/_l7ctl
	target/debug/l7ctl completion fish > target/completion/l7ctl.fish

## The demo node: redirector + proxy with real workloads and real traffic
## (`make demo NODES=3`: three nodes on one etcd).
NODES ?= 1
demo: build
	$(CARGO) run -q -p l7mesh-examples --bin l7mesh-demo -- --nodes $(NODES)

## All tests: the committed eBPF object matches its source, fmt, clippy, unit and
## real-kernel integration tests.
test: build check-bpf lint
	scripts/test-summary.sh --workspace --no-fail-fast

lint:
	scripts/lint-docs.py --self-test
	scripts/lint-docs.py
	$(CARGO) fmt --all -- --check
	rustfmt +stable --check --edition 2021 redirector-bpf/redirector-ebpf/src/main.rs
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## Regenerate the committed eBPF object from redirector-bpf/redirector-ebpf.
bpf:
	scripts/build-bpf.sh

## Rebuild the eBPF object and compare it with the committed one (needs the pinned nightly and
## bpf-linker, which setup installs; without them the check says so and is skipped).
check-bpf:
	@scripts/check-bpf.sh

## Every fuzz target for FUZZ_SECONDS each (default 600), optimized; new inputs that add coverage
## are folded into the committed corpus (fuzz/README.md).
FUZZ_SECONDS ?= 600
fuzz: setup
	scripts/fuzz.sh --seconds $(FUZZ_SECONDS) --merge

## Benchmarks (release build): see docs/BENCHMARKS.md.
bench: setup
	$(CARGO) build --release --workspace --bins
	$(CARGO) run --release -q -p l7mesh-bench -- --out docs/BENCHMARKS.md

## The release tarball (dist/l7mesh-<version>-<arch>.tar.gz): binaries, the eBPF object, the
## systemd unit, the settings file and install.sh.
package: setup
	scripts/package.sh --profile release --out dist
