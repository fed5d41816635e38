#!/usr/bin/env bash
# `make demo`: from a clean clone to "I watched a canary get promoted, and a bad one rolled
# back", on the local cluster. Leaves the cluster, the operator and the simulator running.
#
# Usage: e2e/demo.sh [run|stop]
set -euo pipefail

E2E_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "${E2E_DIR}/.." && pwd)"
WORK="${SLUICE_E2E_WORK_DIR:-${E2E_DIR}/.work}"
OPERATOR_PID="${WORK}/operator.pid"
OPERATOR_LOG="${WORK}/logs/operator.log"
NS=demo
ROLLOUT="${NS}/checkout"

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
plain() { printf '    %s\n' "$*"; }

stop_operator() {
  if [[ -f "${OPERATOR_PID}" ]] && kill -0 "$(cat "${OPERATOR_PID}")" 2>/dev/null; then
    kill "$(cat "${OPERATOR_PID}")" 2>/dev/null || true
  fi
  rm -f "${OPERATOR_PID}"
}

field() { kubectl get rollout -n "${NS}" checkout -o "jsonpath=$1"; }
healthy() { [[ "$(field '{.status.phase}')" == Healthy ]]; }
promoted_from() { [[ "$(field '{.status.stableRevision}')" != "$1" ]] && healthy; }
aborted() { [[ -n "$(field '{.status.abortedAt}')" ]]; }

# Shows the live status view until the check `$2 $3...` holds, or `$1` seconds pass.
watch_until() {
  local timeout=$1 start now met
  shift
  start=$(date +%s)
  while true; do
    met=false
    if "$@"; then met=true; fi
    if [[ -t 1 && -z "${CI:-}" ]]; then printf '\033[2J\033[H'; fi
    "${PLUGIN}" status "${ROLLOUT}" | sed 's/^/    /'
    if [[ "${met}" == true ]]; then return 0; fi
    now=$(date +%s)
    if (( now - start > timeout )); then
      echo "demo: timed out after ${timeout}s; operator log: ${OPERATOR_LOG}" >&2
      return 1
    fi
    sleep 3
  done
}

run() {
  local t0 t1 t2 t3 good_hash bad_hash stable_before
  t0=$(date +%s)
  say "Building sluice and kubectl-sluice"
  (cd "${REPO_DIR}" && cargo build --locked --bins -q)
  PLUGIN="${REPO_DIR}/target/debug/kubectl-sluice"

  say "Starting the local cluster (first run builds Kubernetes from Go modules: ~10 min, then cached)"
  "${E2E_DIR}/cluster.sh" up
  eval "$("${E2E_DIR}/cluster.sh" env)"
  export KUBECONFIG SLUICE_PROMETHEUS_URL PATH

  say "Starting the traffic simulator (pretends to be the mesh, exports Istio metrics to Prometheus)"
  "${E2E_DIR}/simulator/run.sh" start "${KUBECONFIG}" >/dev/null

  say "Starting the operator (log: ${OPERATOR_LOG})"
  stop_operator
  mkdir -p "$(dirname "${OPERATOR_LOG}")"
  "${REPO_DIR}/target/debug/sluice" controller --log-format text --leader-election=false \
    --listen 127.0.0.1:18080 --prometheus-address "${SLUICE_PROMETHEUS_URL}" >"${OPERATOR_LOG}" 2>&1 &
  echo $! >"${OPERATOR_PID}"
  for _ in $(seq 1 50); do
    curl -fsS http://127.0.0.1:18080/readyz >/dev/null 2>&1 && break
    sleep 0.2
  done
  plain "metrics: curl http://127.0.0.1:18080/metrics"

  say "Deploying the demo app: Rollout demo/checkout (5 pods), Service, DestinationRule, VirtualService"
  kubectl delete namespace "${NS}" --ignore-not-found --wait=true >/dev/null
  kubectl apply -f "${E2E_DIR}/demo/app.yaml" | sed 's/^/    /'
  plain "The first revision goes straight to stable: there is nothing to compare it with."
  watch_until 120 healthy
  stable_before=$(field '{.status.stableRevision}')

  say "A good release: image 1.1.0. Traffic moves 20% -> 50% -> 80% -> 100%, judged by the error rate"
  t1=$(date +%s)
  kubectl patch rollout -n "${NS}" checkout --type merge \
    -p '{"spec":{"template":{"spec":{"containers":[{"name":"checkout","image":"ghcr.io/acme/checkout:1.1.0"}]}}}}' >/dev/null
  watch_until 240 promoted_from "${stable_before}"
  good_hash=$(field '{.status.stableRevision}')
  t2=$(date +%s)

  say "A bad release: image 1.2.0, which fails 30% of requests (the simulator's error-rate annotation)"
  kubectl patch rollout -n "${NS}" checkout --type merge \
    -p '{"spec":{"template":{"metadata":{"annotations":{"sim.sluice.dev/error-rate":"0.3"}},"spec":{"containers":[{"name":"checkout","image":"ghcr.io/acme/checkout:1.2.0"}]}}}}' >/dev/null
  watch_until 240 aborted
  bad_hash=$(field '{.status.canaryRevision}')
  t3=$(date +%s)

  say "What happened"
  plain "good release ${stable_before} -> ${good_hash}: promoted step by step in $((t2 - t1))s"
  plain "bad release ${bad_hash}: rolled back by analysis in $((t3 - t2))s; traffic is on ${good_hash}"
  plain "VirtualService weights now: $(kubectl get virtualservice -n "${NS}" checkout -o jsonpath='{.spec.http[0].route[*].weight}')"
  plain "Events:"
  kubectl get events -n "${NS}" --field-selector involvedObject.kind=Rollout \
    --sort-by=.metadata.creationTimestamp -o custom-columns=REASON:.reason,MESSAGE:.message --no-headers | sed 's/^/      /'
  plain "demo took $(( $(date +%s) - t0 ))s"

  say "Try it yourself"
  plain "eval \"\$(e2e/cluster.sh env)\"        # KUBECONFIG and kubectl on PATH"
  plain "target/debug/kubectl-sluice status ${ROLLOUT} --watch"
  plain "target/debug/kubectl-sluice retry ${ROLLOUT}     # try the bad release again"
  plain "e2e/demo.sh stop && make cluster-down           # stop the operator, simulator and cluster"
}

case "${1:-run}" in
  run) run ;;
  stop)
    stop_operator
    "${E2E_DIR}/simulator/run.sh" stop >/dev/null 2>&1 || true
    ;;
  *) echo "usage: $0 [run|stop]" >&2; exit 2 ;;
esac
