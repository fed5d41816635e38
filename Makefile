# Sluice: `make demo` shows it working, `make test` proves it. `make help` lists the rest.

CARGO ?= cargo
CARGO_FLAGS ?= --locked

.DEFAULT_GOAL := help
.PHONY: help build release fmt fmt-check lint unit crds crds-check test run demo

## help: list the targets
help:
	@grep -hE '^## ' $(MAKEFILE_LIST) | sed 's/^## /  /'

## build: build the sluice and kubectl-sluice binaries (debug)
build:
	$(CARGO) build $(CARGO_FLAGS) --bins

## release: build optimised binaries into target/release
release:
	$(CARGO) build $(CARGO_FLAGS) --release --bins

## fmt: format the code
fmt:
	$(CARGO) fmt --all

fmt-check:
	$(CARGO) fmt --all -- --check

## lint: rustfmt check and clippy with warnings as errors
lint: fmt-check
	$(CARGO) clippy $(CARGO_FLAGS) --all-targets -- -D warnings

## unit: unit tests and schema tests (no cluster needed)
unit:
	$(CARGO) test $(CARGO_FLAGS)

## crds: regenerate crds/ from src/api
crds:
	$(CARGO) run $(CARGO_FLAGS) --quiet --bin sluice -- crdgen --out crds

## crds-check: fail when crds/ differs from what src/api generates
crds-check:
	$(CARGO) run $(CARGO_FLAGS) --quiet --bin sluice -- crdgen --out crds --check

## test: everything CI runs: lint, unit tests, CRD drift check
test: lint unit crds-check

## run: run the operator against the local cluster (make cluster-up first)
run:
	KUBECONFIG=$$($(MAKE) -s kubeconfig) $(CARGO) run $(CARGO_FLAGS) --bin sluice -- controller \
		--log-format text --leader-election=false --listen 127.0.0.1:8080 \
		--prometheus-address $$($(MAKE) -s prometheus-url)

## demo: the guided walkthrough (arrives with the Rollout controller; see README)
demo:
	@echo "The demo (a canary promoted, a bad canary rolled back) arrives with the Rollout"
	@echo "controller. Today: 'make cluster-up' starts the local cluster, 'make run' the operator."
	@exit 1

include e2e/cluster.mk
