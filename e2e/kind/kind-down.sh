#!/usr/bin/env bash
# Delete the kind cluster made by kind-up.sh and its Prometheus port-forward.
set -euo pipefail

E2E_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${SLUICE_E2E_WORK_DIR:-${E2E_DIR}/.work}"
CLUSTER="${KIND_CLUSTER_NAME:-sluice}"

pf="${WORK}/pids/kind-prometheus-port-forward.pid"
if [[ -f "${pf}" ]]; then
  pid="$(cat "${pf}")"
  if kill -0 "${pid}" 2>/dev/null && grep -q port-forward "/proc/${pid}/cmdline" 2>/dev/null; then
    kill "${pid}" || true
  fi
  rm -f "${pf}"
fi
if command -v kind >/dev/null && kind get clusters 2>/dev/null | grep -qx "${CLUSTER}"; then
  kind delete cluster --name "${CLUSTER}"
fi
rm -f "${WORK}/kind-kubeconfig"
echo "kind cluster '${CLUSTER}' deleted"
