# Sluice: `make demo` shows it working, `make test` proves it. `make help` lists the rest.

CARGO ?= cargo
CARGO_FLAGS ?= --locked
SLUICE_CHAOS_KILLS ?= 15
SLUICE_CHAOS_FAILOVERS ?= 1

.DEFAULT_GOAL := help
.PHONY: help build release fmt fmt-check lint unit fuzz crds crds-check test cluster-test chaos bench bench-run bench-smoke run demo image argocd-lua

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
	$(CARGO) clippy $(CARGO_FLAGS) --workspace --all-targets -- -D warnings

## unit: unit tests and schema tests (no cluster needed)
unit:
	$(CARGO) test $(CARGO_FLAGS) --workspace

## argocd-lua: run Sluice's ArgoCD health checks and actions (config/argocd) in ArgoCD's own
##       Lua engine, loaded from the generated argocd-cm as ArgoCD loads them
argocd-lua:
	cd e2e/argocd && GOTOOLCHAIN=local GOFLAGS="-mod=mod -buildvcs=false" \
	  flock /tmp/sluice-build.lock go test -count=1 ./luatest

## fuzz: run every fuzz target for FUZZ_SECONDS (cargo-fuzz on nightly; built once, cached)
FUZZ_SECONDS ?= 60
fuzz:
	e2e/fuzz.sh $(FUZZ_SECONDS)

# Where the CRDs are written: crds/ for kubectl, and the Helm chart's and kustomize's copies.
CRD_DIRS := crds charts/sluice/crds config/crd/bases

## crds: regenerate crds/ (and the Helm chart's and kustomize's copies) from src/api
crds:
	@for d in $(CRD_DIRS); do $(CARGO) run $(CARGO_FLAGS) --quiet --bin sluice -- crdgen --out $$d || exit $$?; done

## crds-check: fail when crds/ or a copy differs from what src/api generates
crds-check:
	@for d in $(CRD_DIRS); do $(CARGO) run $(CARGO_FLAGS) --quiet --bin sluice -- crdgen --out $$d --check || exit $$?; done

## test: everything CI runs: lint, unit tests, CRD drift check, then the cluster tests on a
##       local cluster it starts (tools are built once and cached) and stops again
test: lint unit crds-check argocd-lua
	@SLUICE_FUZZ_SEED=1 $(MAKE) --no-print-directory fuzz FUZZ_SECONDS=15
	@$(MAKE) --no-print-directory cluster-up
	@status=0; $(MAKE) --no-print-directory cluster-test || status=$$?; \
	  e2e/simulator/run.sh stop >/dev/null 2>&1 || true; \
	  $(MAKE) --no-print-directory cluster-down; \
	  if [ $$status -ne 0 ]; then echo "cluster tests failed; logs were in e2e/.work/logs (run 'make cluster-up cluster-test' to keep them)"; fi; \
	  exit $$status

## cluster-test: the tests that need the local cluster (make cluster-up first); keeps it up
# The Pipeline test runs alone, after the others: its controllers watch every namespace. The
# reliability tests run last, one at a time: they restart the apiserver, etcd and Prometheus.
cluster-test:
	e2e/simulator/run.sh start "$$($(MAKE) -s kubeconfig)"
	$$(e2e/tools/build.sh --print-bin-dir)/kubectl --kubeconfig "$$($(MAKE) -s kubeconfig)" \
	  apply --server-side --force-conflicts -f crds/ -f config/approvals/approvals.yaml
	SLUICE_IMAGE_PROFILE=dev SLUICE_IMAGE_OUT=$(CURDIR)/target/image-test e2e/image.sh
	KUBECONFIG=$$($(MAKE) -s kubeconfig) \
	  KUBECTL=$$(e2e/tools/build.sh --print-bin-dir)/kubectl \
	  SLUICE_PROMETHEUS_URL=$$($(MAKE) -s prometheus-url) SLUICE_IMAGE_DIR=$(CURDIR)/target/image-test \
	  $(CARGO) test $(CARGO_FLAGS) -p sluice --test install -- --ignored --test-threads=1
	KUBECONFIG=$$($(MAKE) -s kubeconfig) \
	  KUBECTL=$$(e2e/tools/build.sh --print-bin-dir)/kubectl \
	  SLUICE_PROMETHEUS_URL=$$($(MAKE) -s prometheus-url) \
	  $(CARGO) test $(CARGO_FLAGS) -p sluice --test cluster --test rollout --test errorbudget --test notify --test dashboards -- --ignored --test-threads=2
	KUBECONFIG=$$($(MAKE) -s kubeconfig) \
	  KUBECTL=$$(e2e/tools/build.sh --print-bin-dir)/kubectl \
	  SLUICE_PROMETHEUS_URL=$$($(MAKE) -s prometheus-url) \
	  $(CARGO) test $(CARGO_FLAGS) -p sluice --test pipeline -- --ignored --test-threads=1
	@$(MAKE) --no-print-directory argocd-up
	KUBECONFIG=$$($(MAKE) -s kubeconfig) \
	  KUBECTL=$$(e2e/tools/build.sh --print-bin-dir)/kubectl \
	  SLUICE_PROMETHEUS_URL=$$($(MAKE) -s prometheus-url) \
	  SLUICE_ARGOCD_URL=$$(e2e/cluster.sh argocd-url) SLUICE_ARGOCD_REPO=$$(e2e/cluster.sh argocd-repo) \
	  $(CARGO) test $(CARGO_FLAGS) -p sluice --test argocd -- --ignored --test-threads=1
	@$(MAKE) --no-print-directory argocd-down
	@$(MAKE) --no-print-directory chaos-run
	@$(MAKE) --no-print-directory bench-smoke

## chaos: the full reliability run on the local cluster (make cluster-up first): 100 operator
##        kills, three leader failovers, 20 Prometheus flaps, apiserver and etcd restarts
chaos:
	e2e/simulator/run.sh start "$$($(MAKE) -s kubeconfig)"
	@$(MAKE) --no-print-directory chaos-run SLUICE_CHAOS_KILLS=100 SLUICE_CHAOS_FAILOVERS=3

# The reliability tests; `make test` runs them short (15 kills, one failover).
chaos-run:
	KUBECONFIG=$$($(MAKE) -s kubeconfig) \
	  KUBECTL=$$(e2e/tools/build.sh --print-bin-dir)/kubectl \
	  SLUICE_PROMETHEUS_URL=$$($(MAKE) -s prometheus-url) \
	  SLUICE_CHAOS_KILLS=$(SLUICE_CHAOS_KILLS) SLUICE_CHAOS_FAILOVERS=$(SLUICE_CHAOS_FAILOVERS) \
	  $(CARGO) test $(CARGO_FLAGS) -p sluice --test chaos -- --ignored --test-threads=1 --nocapture

## bench: the operator at scale on the local cluster it starts (and stops): N = 100, 1,000
##        and 10,000 Rollouts, release build; reports in target/bench (docs/performance.md)
BENCH_SIZES ?= 100 1000 10000
BENCH_IDLE_SECONDS ?= 320
BENCH_OPERATOR ?= $(CURDIR)/target/release/sluice
# The cluster it starts has no apiserver watch cache: with it, 10,000 Rollouts need more
# memory than this machine has (docs/performance.md).
bench: release
	@SLUICE_APISERVER_WATCH_CACHE=false $(MAKE) --no-print-directory cluster-up
	@status=0; $(MAKE) --no-print-directory bench-run || status=$$?; \
	  $(MAKE) --no-print-directory cluster-down; exit $$status

# One benchmark run per size in BENCH_SIZES on a running local cluster.
bench-run:
	@for n in $(BENCH_SIZES); do \
	  KUBECONFIG=$$($(MAKE) -s kubeconfig) SLUICE_PROMETHEUS_URL=$$($(MAKE) -s prometheus-url) \
	  SLUICE_BENCH_N=$$n SLUICE_BENCH_IDLE_SECONDS=$(BENCH_IDLE_SECONDS) \
	  SLUICE_BENCH_OPERATOR=$(BENCH_OPERATOR) SLUICE_BENCH_OUT=$(CURDIR)/target/bench \
	  SLUICE_BENCH_AUDIT_LOGS=$(CURDIR)/e2e/.work/logs SLUICE_BENCH_CLUSTER_PIDS=$(CURDIR)/e2e/.work/pids \
	  $(CARGO) test $(CARGO_FLAGS) -p sluice --test bench -- --ignored --nocapture || exit $$?; \
	done

# The benchmark at N = 100 with the test build, so `make test` keeps the harness working. It
# asserts what must happen (all Healthy, every release stepped and aborted), never a timing.
bench-smoke:
	KUBECONFIG=$$($(MAKE) -s kubeconfig) SLUICE_PROMETHEUS_URL=$$($(MAKE) -s prometheus-url) \
	  SLUICE_BENCH_N=100 SLUICE_BENCH_IDLE_SECONDS=20 SLUICE_BENCH_OUT=$(CURDIR)/target/bench \
	  SLUICE_BENCH_AUDIT_LOGS=$(CURDIR)/e2e/.work/logs SLUICE_BENCH_CLUSTER_PIDS=$(CURDIR)/e2e/.work/pids \
	  $(CARGO) test $(CARGO_FLAGS) -p sluice --test bench -- --ignored --nocapture

## image: the operator's OCI image, without a container engine (e2e/image.sh): a static
##        release binary, an OCI layout and a `docker load` tarball, and a CycloneDX SBOM in
##        target/image (docs/install.md says how to push or load it)
image:
	e2e/image.sh

## run: run the operator against the local cluster (make cluster-up first)
run:
	KUBECONFIG=$$($(MAKE) -s kubeconfig) $(CARGO) run $(CARGO_FLAGS) --bin sluice -- controller \
		--log-format text --leader-election=false --listen 127.0.0.1:8080 \
		--prometheus-address $$($(MAKE) -s prometheus-url)

## demo: on the local cluster: a canary promoted step by step, a bad one rolled back
demo:
	@e2e/demo.sh run

include e2e/cluster.mk
