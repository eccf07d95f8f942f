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

.PHONY: setup system venv build test demo clean-demo

setup: system venv

system:
	@scripts/setup-system.sh

venv:
	@scripts/setup-venv.sh

build: setup
	$(CARGO) build --release -p pipeline

test: setup
	$(CARGO) test --workspace

demo: build
	@scripts/demo.sh target/release/pipeline $(DEMO_DIR)

clean-demo:
	rm -rf $(DEMO_DIR)
