#!/usr/bin/env bash
# Build the local e2e toolchain from Go modules (no container engine, no
# downloads other than the Go module proxy):
#
#   kube   multi-call kube-apiserver / kube-controller-manager / kube-scheduler /
#          kubectl, from k8s.io/kubernetes (wrapper module: e2e/tools/go.mod)
#   etcd   from go.etcd.io/etcd/server/v3     (e2e/tools/etcd/go.mod)
#   kwok   from sigs.k8s.io/kwok/cmd/kwok     (e2e/tools/kwok/go.mod)
#   helm   from helm.sh/helm/v3/cmd/helm      (e2e/tools/helm/go.mod)
#   crane  from github.com/google/go-containerregistry/cmd/crane (e2e/tools/crane/go.mod):
#          writes the operator's OCI image (`make image`) without a container engine
#   argocd multi-call argocd-application-controller / argocd-repo-server / argocd-server,
#          from github.com/argoproj/argo-cd/v3 (wrapper module: e2e/argocd/go.mod, which
#          also holds the Lua tests of Sluice's ArgoCD health checks and actions)
#
# plus the CRD YAML the local cluster applies (istio.io/api, gateway-api, and the ArgoCD
# Application and AppProject CRDs of the ArgoCD version above).
#
# Binaries go to a cache outside the repo, keyed by version:
#   ${SLUICE_TOOLS_DIR:-$HOME/.cache/sluice/tools}/k8s-<ver>/bin   <- the bin dir
#   .../etcd-<ver>/bin/etcd, .../kwok-<ver>/bin/kwok, .../helm-<ver>/bin/helm,
#   .../crane-<ver>/bin/crane, .../argocd-<ver>/bin/argocd
#   (symlinked into the bin dir), .../crds/{istio-api,gateway-api}-<ver>/
# Each artifact carries a stamp (hash of go.mod, go.sum, sources, flags and Go
# version); an up-to-date artifact is skipped, so a warm run takes well under
# a second.
#
# Usage:
#   e2e/tools/build.sh                  build what is missing; last stdout line = bin dir
#   e2e/tools/build.sh --print-bin-dir  print the bin dir only (no build)
#   e2e/tools/build.sh --print-crd-dirs print the CRD dirs (one a line, no build)
#   e2e/tools/build.sh --crds           fetch only the CRDs, then print their dirs
#   e2e/tools/build.sh --force          rebuild everything
#   e2e/tools/build.sh --regen-k8s-mod  rewrite go.mod's replace block from the
#                                       pinned k8s.io/kubernetes go.mod, then tidy
#
# Every go build runs under `flock /tmp/sluice-build.lock` so it never overlaps
# with cargo builds that take the same lock (the machine has 2 cores).
set -euo pipefail

TOOLS_SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TOOLS_DIR="${SLUICE_TOOLS_DIR:-${HOME}/.cache/sluice/tools}"
BUILD_LOCK="${SLUICE_BUILD_LOCK:-/tmp/sluice-build.lock}"

# CRD sources (Go modules that ship the YAML). Override via env if needed.
ISTIO_API_VERSION="${ISTIO_API_VERSION:-v1.31.1}"
GATEWAY_API_VERSION="${GATEWAY_API_VERSION:-v1.4.1}"

export GOTOOLCHAIN=local
export GOFLAGS="-mod=mod -buildvcs=false"
export CGO_ENABLED=0

log() { echo "build.sh: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# modver FILE MODULE -> version of MODULE required in FILE (go.mod)
modver() {
  awk -v m="$2" '($1 == m || ($1 == "require" && $2 == m)) && $0 !~ /=>/ {
    for (i = 1; i <= NF; i++) if ($i ~ /^v[0-9]/) { print $i; exit }
  }' "$1"
}

K8S_VERSION="$(modver "${TOOLS_SRC}/go.mod" k8s.io/kubernetes)"
ETCD_VERSION="$(modver "${TOOLS_SRC}/etcd/go.mod" go.etcd.io/etcd/server/v3)"
KWOK_VERSION="$(modver "${TOOLS_SRC}/kwok/go.mod" sigs.k8s.io/kwok)"
HELM_VERSION="$(modver "${TOOLS_SRC}/helm/go.mod" helm.sh/helm/v3)"
CRANE_VERSION="$(modver "${TOOLS_SRC}/crane/go.mod" github.com/google/go-containerregistry)"
# v3.2 is the newest ArgoCD the proxy can build: from v3.3 its go.mod replaces gitops-engine
# with a directory inside its repository, which the module zip does not carry.
ARGOCD_SRC="$(cd "${TOOLS_SRC}/../argocd" && pwd)"
ARGOCD_VERSION="$(modver "${ARGOCD_SRC}/go.mod" github.com/argoproj/argo-cd/v3)"
[[ -n "${K8S_VERSION}" && -n "${ETCD_VERSION}" && -n "${KWOK_VERSION}" && -n "${HELM_VERSION}" && -n "${CRANE_VERSION}" && -n "${ARGOCD_VERSION}" ]] ||
  die "could not read pinned versions from e2e/tools/*/go.mod"

BIN_DIR="${TOOLS_DIR}/k8s-${K8S_VERSION}/bin"
ISTIO_CRD_DIR="${TOOLS_DIR}/crds/istio-api-${ISTIO_API_VERSION}"
GATEWAY_CRD_DIR="${TOOLS_DIR}/crds/gateway-api-${GATEWAY_API_VERSION}"
ARGOCD_CRD_DIR="${TOOLS_DIR}/crds/argo-cd-${ARGOCD_VERSION}"

# stamp_of DIR EXTRA... -> hash of the wrapper module's inputs plus build flags.
stamp_of() {
  local dir="$1"; shift
  {
    go env GOVERSION GOOS GOARCH
    printf '%s\n' "$@"
    cat "${dir}/go.mod" "${dir}/go.sum"
    find "${dir}" -maxdepth 1 -name '*.go' -print0 | sort -z | xargs -0r cat
  } | sha256sum | cut -d' ' -f1
}

# go_build MODULE_DIR OUT PKG LDFLAGS TAGS
go_build() {
  local dir="$1" out="$2" pkg="$3" ldflags="$4" tags="$5" start
  start=$(date +%s)
  log "building ${out} (${pkg}) ..."
  mkdir -p "$(dirname "${out}")"
  (cd "${dir}" && flock "${BUILD_LOCK}" go build -trimpath -tags "${tags}" -ldflags "${ldflags}" -o "${out}.tmp" "${pkg}")
  mv -f "${out}.tmp" "${out}"
  log "built ${out} in $(( $(date +%s) - start ))s"
}

# ensure NAME MODULE_DIR OUT PKG LDFLAGS TAGS: build OUT unless its stamp matches.
ensure() {
  local name="$1" dir="$2" out="$3" pkg="$4" ldflags="$5" tags="$6" stamp stamp_file
  stamp="$(stamp_of "${dir}" "${pkg}" "${ldflags}" "${tags}")"
  stamp_file="$(dirname "${out}")/.$(basename "${out}").stamp"
  if [[ "${FORCE}" != 1 && -x "${out}" && -f "${stamp_file}" && "$(cat "${stamp_file}")" == "${stamp}" ]]; then
    log "${name}: up to date (${out})"
    return 0
  fi
  go_build "${dir}" "${out}" "${pkg}" "${ldflags}" "${tags}"
  echo "${stamp}" > "${stamp_file}"
}

# Same -X flags as kubernetes' hack/lib/version.sh (for both version packages),
# so `kubectl version` and /version report the pinned release.
k8s_ldflags() {
  local major minor rest build_date flags="-s -w" pkg
  rest="${K8S_VERSION#v}"; major="${rest%%.*}"; rest="${rest#*.}"; minor="${rest%%.*}"
  # Reproducible: the release's publication time from the module proxy.
  build_date="$(cd "${TOOLS_SRC}" && { go list -m -f '{{with .Time}}{{.UTC.Format "2006-01-02T15:04:05Z"}}{{end}}' k8s.io/kubernetes 2>/dev/null || true; })"
  [[ -n "${build_date}" ]] || build_date="1970-01-01T00:00:00Z"
  for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    flags+=" -X ${pkg}.gitVersion=${K8S_VERSION} -X ${pkg}.gitMajor=${major} -X ${pkg}.gitMinor=${minor}"
    # gitCommit: the module zip carries no commit id; clear the "$Format:%H$" placeholder.
    flags+=" -X ${pkg}.gitTreeState=clean -X ${pkg}.buildDate=${build_date} -X ${pkg}.gitCommit="
  done
  echo "${flags}"
}

helm_ldflags() {
  local cg rest minor
  cg="$(modver "${TOOLS_SRC}/helm/go.mod" k8s.io/client-go)"   # v0.MINOR.PATCH
  rest="${cg#v0.}"; minor="${rest%%.*}"
  echo "-s -w -X helm.sh/helm/v3/internal/version.version=${HELM_VERSION} -X helm.sh/helm/v3/internal/version.gitTreeState=clean" \
    "-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=${minor}" \
    "-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=${minor}"
}

# link NAME TARGET: symlink BIN_DIR/NAME -> TARGET (relative), if different.
link() {
  local name="$1" target="$2"
  if [[ "$(readlink "${BIN_DIR}/${name}" 2>/dev/null || true)" != "${target}" ]]; then
    ln -sfn "${target}" "${BIN_DIR}/${name}"
  fi
}

# fetch_module MOD@VER -> prints the module's extracted dir in the module cache.
fetch_module() {
  local json dir
  json="$(cd "${TOOLS_DIR}" && GOFLAGS='' go mod download -json "$1")" || die "go mod download $1 failed"
  dir="$(sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p' <<<"${json}")"
  [[ -n "${dir}" && -d "${dir}" ]] || die "go mod download $1: no Dir in: ${json}"
  echo "${dir}"
}

ensure_crds() {
  local src
  if [[ ! -f "${ISTIO_CRD_DIR}/.done" ]]; then
    src="$(fetch_module "istio.io/api@${ISTIO_API_VERSION}")"
    mkdir -p "${ISTIO_CRD_DIR}"
    install -m 0644 "${src}/kubernetes/customresourcedefinitions.gen.yaml" "${ISTIO_CRD_DIR}/"
    touch "${ISTIO_CRD_DIR}/.done"
    log "istio CRDs: ${ISTIO_CRD_DIR}"
  fi
  if [[ ! -f "${GATEWAY_CRD_DIR}/.done" ]]; then
    src="$(fetch_module "sigs.k8s.io/gateway-api@${GATEWAY_API_VERSION}")"
    mkdir -p "${GATEWAY_CRD_DIR}"
    install -m 0644 "${src}"/config/crd/standard/*.yaml "${GATEWAY_CRD_DIR}/"
    touch "${GATEWAY_CRD_DIR}/.done"
    log "gateway-api CRDs: ${GATEWAY_CRD_DIR}"
  fi
  if [[ ! -f "${ARGOCD_CRD_DIR}/.done" ]]; then
    src="$(fetch_module "github.com/argoproj/argo-cd/v3@${ARGOCD_VERSION}")"
    mkdir -p "${ARGOCD_CRD_DIR}"
    install -m 0644 "${src}/manifests/crds/application-crd.yaml" "${src}/manifests/crds/appproject-crd.yaml" "${ARGOCD_CRD_DIR}/"
    touch "${ARGOCD_CRD_DIR}/.done"
    log "ArgoCD Application and AppProject CRDs: ${ARGOCD_CRD_DIR}"
  fi
}

regen_k8s_mod() {
  local kdir tmp
  kdir="$(fetch_module "k8s.io/kubernetes@${K8S_VERSION}")"
  tmp="$(mktemp)"
  # Drop the old replace block and godebug lines, then append kubernetes' own
  # godebug lines and a replace block mirroring its ./staging replaces.
  awk -v gd="$(grep '^godebug' "${kdir}/go.mod" || true)" '
    /^replace \(/ { skip = 1; next }
    skip && /^\)/ { skip = 0; next }
    /^godebug/ { next }
    !skip { print }
    /^go [0-9]/ && gd != "" { print ""; print gd }
  ' "${TOOLS_SRC}/go.mod" | cat -s > "${tmp}"
  {
    echo "replace ("
    awk -v v="v0.${K8S_VERSION#v1.}" '$2 == "=>" && $3 ~ /^\.\/staging\// { printf "\t%s => %s %s\n", $1, $1, v }' "${kdir}/go.mod"
    echo ")"
  } >> "${tmp}"
  mv "${tmp}" "${TOOLS_SRC}/go.mod"
  (cd "${TOOLS_SRC}" && go mod tidy)
  log "regenerated ${TOOLS_SRC}/go.mod from k8s.io/kubernetes@${K8S_VERSION}"
}

FORCE=0
# Everything runs inside main, which bash parses completely before it runs:
# editing this file while a build is in progress cannot derail that build.
main() {
  case "${1:-}" in
    --print-bin-dir) echo "${BIN_DIR}"; exit 0 ;;
    --print-crd-dirs) printf '%s\n' "${ISTIO_CRD_DIR}" "${GATEWAY_CRD_DIR}" "${ARGOCD_CRD_DIR}"; exit 0 ;;
    --crds) mkdir -p "${TOOLS_DIR}"; ensure_crds; printf '%s\n' "${ISTIO_CRD_DIR}" "${GATEWAY_CRD_DIR}" "${ARGOCD_CRD_DIR}"; exit 0 ;;
    --force) FORCE=1 ;;
    --regen-k8s-mod) mkdir -p "${TOOLS_DIR}"; regen_k8s_mod; exit 0 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    "") ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac

  command -v go >/dev/null || die "go is not installed (need Go >= $(awk '$1=="go"{print $2}' "${TOOLS_SRC}/etcd/go.mod"))"
  command -v flock >/dev/null || die "flock (util-linux) is required"
  mkdir -p "${TOOLS_DIR}" "${BIN_DIR}"

  # Serialize concurrent build.sh runs (e.g. `make tools` and `cluster.sh up`).
  exec 9>"${TOOLS_DIR}/.build.sh.lock"
  flock 9

  ensure kube "${TOOLS_SRC}" "${BIN_DIR}/kube" . "$(k8s_ldflags)" "selinux,notest,grpcnotrace"
  for name in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
    link "${name}" kube
  done

  ensure etcd "${TOOLS_SRC}/etcd" "${TOOLS_DIR}/etcd-${ETCD_VERSION}/bin/etcd" \
    go.etcd.io/etcd/server/v3 "-s -w" ""
  link etcd "../../etcd-${ETCD_VERSION}/bin/etcd"

  ensure kwok "${TOOLS_SRC}/kwok" "${TOOLS_DIR}/kwok-${KWOK_VERSION}/bin/kwok" \
    sigs.k8s.io/kwok/cmd/kwok "-s -w" ""
  link kwok "../../kwok-${KWOK_VERSION}/bin/kwok"

  ensure helm "${TOOLS_SRC}/helm" "${TOOLS_DIR}/helm-${HELM_VERSION}/bin/helm" \
    helm.sh/helm/v3/cmd/helm "$(helm_ldflags)" ""
  link helm "../../helm-${HELM_VERSION}/bin/helm"

  ensure crane "${TOOLS_SRC}/crane" "${TOOLS_DIR}/crane-${CRANE_VERSION}/bin/crane" \
    github.com/google/go-containerregistry/cmd/crane \
    "-s -w -X github.com/google/go-containerregistry/cmd/crane/cmd.Version=${CRANE_VERSION}" ""
  link crane "../../crane-${CRANE_VERSION}/bin/crane"

  # ArgoCD's own version stamp, so its logs and /api/version name the release.
  ensure argocd "${ARGOCD_SRC}" "${TOOLS_DIR}/argocd-${ARGOCD_VERSION}/bin/argocd" . \
    "-s -w -X github.com/argoproj/argo-cd/v3/common.version=${ARGOCD_VERSION#v} -X github.com/argoproj/argo-cd/v3/common.gitTreeState=clean" ""
  for name in argocd-application-controller argocd-repo-server argocd-server; do
    link "${name}" "../../argocd-${ARGOCD_VERSION}/bin/argocd"
  done

  ensure_crds

  echo "${BIN_DIR}"
}

main "$@"
