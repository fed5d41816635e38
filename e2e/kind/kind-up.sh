#!/usr/bin/env bash
# Alternative to e2e/cluster.sh for machines with Docker: a kind cluster
# named "sluice" with Istio (minimal profile), Istio's Prometheus addon,
# the Gateway API standard CRDs and Sluice's CRDs (crds/).
# Needs: docker, kind, istioctl (from an Istio release directory, which also
# holds samples/addons/prometheus.yaml), kubectl (falls back to the one that
# e2e/tools/build.sh builds).
# Writes the kubeconfig to e2e/.work/kind-kubeconfig and port-forwards
# Prometheus to 127.0.0.1:19090 (same URL as the local cluster).
set -euo pipefail

E2E_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${SLUICE_E2E_WORK_DIR:-${E2E_DIR}/.work}"
KCFG="${WORK}/kind-kubeconfig"
CLUSTER="${KIND_CLUSTER_NAME:-sluice}"
PROM_PORT=19090

die() { echo "kind-up.sh: ERROR: $*" >&2; exit 1; }
for c in docker kind istioctl; do
  command -v "${c}" >/dev/null || die "'${c}' is required"
done
KUBECTL="$(command -v kubectl || echo "$("${E2E_DIR}/tools/build.sh" | tail -n 1)/kubectl")"
k() { "${KUBECTL}" --kubeconfig="${KCFG}" "$@"; }
mkdir -p "${WORK}/pids" "${WORK}/logs"

if ! kind get clusters 2>/dev/null | grep -qx "${CLUSTER}"; then
  kind create cluster --name "${CLUSTER}" --kubeconfig "${KCFG}" --wait 120s
else
  kind export kubeconfig --name "${CLUSTER}" --kubeconfig "${KCFG}"
fi

# Gateway API standard CRDs at the version the local cluster uses.
"${E2E_DIR}/tools/build.sh" --crds >/dev/null
while IFS= read -r dir; do
  k apply --server-side --force-conflicts -f "${dir}"
done < <("${E2E_DIR}/tools/build.sh" --print-crd-dirs | grep gateway-api)

istioctl install --kubeconfig "${KCFG}" --set profile=minimal -y

prom="${ISTIO_PROMETHEUS_MANIFEST:-$(dirname "$(dirname "$(command -v istioctl)")")/samples/addons/prometheus.yaml}"
[[ -e "${prom}" || "${prom}" == http* ]] ||
  die "Prometheus addon not found at ${prom}; set ISTIO_PROMETHEUS_MANIFEST to samples/addons/prometheus.yaml of your Istio release"
k apply -f "${prom}"

if compgen -G "${E2E_DIR}/../crds/*.y*ml" >/dev/null; then
  k apply --server-side --force-conflicts -f "${E2E_DIR}/../crds"
fi
k wait --for=condition=Established crd --all --timeout=120s >/dev/null
k -n istio-system rollout status deploy/prometheus --timeout=300s

pf="${WORK}/pids/kind-prometheus-port-forward.pid"
if [[ -f "${pf}" ]] && kill -0 "$(cat "${pf}")" 2>/dev/null; then
  kill "$(cat "${pf}")" || true
fi
setsid "${KUBECTL}" --kubeconfig="${KCFG}" -n istio-system port-forward --address 127.0.0.1 \
  svc/prometheus "${PROM_PORT}:9090" </dev/null >"${WORK}/logs/kind-prometheus-port-forward.log" 2>&1 &
echo $! > "${pf}"

cat <<MSG
kind cluster '${CLUSTER}' is ready.
  export KUBECONFIG=${KCFG}
  Prometheus: http://127.0.0.1:${PROM_PORT} (kubectl port-forward, pid in ${pf})
  Delete with: make kind-down
MSG
