# Single entry point. Every target installs what is missing first (idempotently), so `make test` and
# `make demo` each work as the first command on a fresh machine.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c

# torch-sys finds libtorch through the venv's `torch` package (torch==2.11.0 for tch 0.24).
export LIBTORCH_USE_PYTORCH := 1
export PATH := $(CURDIR)/.venv/bin:$(PATH)
# A stray LIBTORCH would override the venv's libtorch.
unexport LIBTORCH

CARGO ?= cargo
DEMO_DIR ?= demo

.PHONY: setup system venv build lint test demo clean-demo

setup: system venv

system:
	@scripts/setup-system.sh

venv:
	@scripts/setup-venv.sh

build: setup
	$(CARGO) build --release -p pipeline

# Formatting and clippy's lints, as errors: main stays clean, so a new warning is the change that made it.
lint: setup
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Tests whose GPU branch could not run say so on stderr and in target/gpu-skips.txt; the count closes
# the log, so a CPU-only CI run never passes for a GPU run.
test: lint
	@mkdir -p target && rm -f target/gpu-skips.txt
	FLOWBACK_SKIP_LOG=$(CURDIR)/target/gpu-skips.txt $(CARGO) test --workspace
	@if [ -s target/gpu-skips.txt ]; then \
	  echo "make test: $$(sort -u target/gpu-skips.txt | wc -l) test branches skipped (GPU or a missing libtorch feature; gpu-check --cpu reruns some):"; sort -u target/gpu-skips.txt; \
	else echo "make test: no test branch skipped"; fi

demo: build
	@scripts/demo.sh target/release/pipeline $(DEMO_DIR)

clean-demo:
	rm -rf $(DEMO_DIR)
