# Local e2e cluster targets. Included from the top-level Makefile:
#   include e2e/cluster.mk
# See docs/local-cluster.md. Paths are relative to this file, so the targets
# work whatever the including Makefile's directory is.

SLUICE_E2E_DIR := $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))

.PHONY: tools cluster-up cluster-down cluster-status kubeconfig prometheus-url kind-up kind-down argocd-up argocd-down

## tools: build kube-apiserver/controller-manager/scheduler/kubectl, etcd, kwok, helm (cached)
tools:
	@$(SLUICE_E2E_DIR)/tools/build.sh

## cluster-up: start the local control plane + kwok nodes + Prometheus (idempotent)
cluster-up:
	@$(SLUICE_E2E_DIR)/cluster.sh up

## cluster-down: stop the local cluster and delete its data (keeps certs)
cluster-down:
	@$(SLUICE_E2E_DIR)/cluster.sh down

## cluster-status: show processes and health of the local cluster
cluster-status:
	@$(SLUICE_E2E_DIR)/cluster.sh status

## kubeconfig: print the local cluster's kubeconfig path (use `make -s kubeconfig`)
kubeconfig:
	@$(SLUICE_E2E_DIR)/cluster.sh kubeconfig

## prometheus-url: print the local Prometheus URL (use `make -s prometheus-url`)
prometheus-url:
	@$(SLUICE_E2E_DIR)/cluster.sh prometheus-url

## argocd-up: start ArgoCD (built from its Go module) on the running local cluster, syncing
##       from a local git repository (idempotent); argocd-down stops it
argocd-up:
	@$(SLUICE_E2E_DIR)/cluster.sh argocd-up

argocd-down:
	@$(SLUICE_E2E_DIR)/cluster.sh argocd-down

## kind-up: alternative for machines with Docker: kind cluster + Istio + Prometheus
kind-up:
	@$(SLUICE_E2E_DIR)/kind/kind-up.sh

## kind-down: delete the kind cluster
kind-down:
	@$(SLUICE_E2E_DIR)/kind/kind-down.sh
