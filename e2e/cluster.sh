#!/usr/bin/env bash
# Local Kubernetes control plane for Sluice's e2e tests: real etcd,
# kube-apiserver, kube-controller-manager and kube-scheduler built from Go
# modules (e2e/tools/build.sh), kwok simulating 3 Nodes and their Pods, and
# Debian's Prometheus. No container engine; everything listens on 127.0.0.1.
#
# Usage: e2e/cluster.sh up|down|status|restart NAME|kubeconfig|prometheus-url|env
#
#   up              start everything (idempotent: exits 0 at once if already up);
#                   SLUICE_APISERVER_WATCH_CACHE=false starts the apiserver without its
#                   watch cache (as `make bench` does)
#                   and SLUICE_APISERVER_PROFILING=true with its /debug/pprof
#   down            stop everything, delete etcd/prometheus data (keeps certs)
#   status          show processes and health; exit 0 only if all is healthy
#   restart NAME    stop and start etcd, kube-apiserver or prometheus (keeps data)
#   kubeconfig      print the admin kubeconfig path
#   prometheus-url  print the Prometheus base URL
#   env             print `export ...` lines for eval: KUBECONFIG, PATH (bin dir),
#                   SLUICE_PROMETHEUS_URL
#   argocd-up       start ArgoCD on the running cluster (idempotent): Debian's redis-server,
#                   and the repo server, application controller and API server of the
#                   argocd binary built by e2e/tools/build.sh, syncing from a bare git
#                   repository at e2e/.work/argocd/repo.git (file://)
#   argocd-down     stop ArgoCD and delete its git repository and namespace
#   argocd-url      print the ArgoCD API server's base URL (no TLS, no auth)
#   argocd-repo     print the git repository's file:// URL
#
# Ports (127.0.0.1): etcd 12379 (peer 12380), kube-apiserver 16443,
# kube-controller-manager 16257, kube-scheduler 16259, kwok 16280,
# Prometheus 19090 (scrapes job istio-sim at 127.0.0.1:19100 every 2s).
# ArgoCD (argocd-up): redis 16379, repo server 18081, API server 18080, metrics of the
# controller / API server / repo server 18082 / 18083 / 18084.
# State, logs and pid files: e2e/.work/ (override: SLUICE_E2E_WORK_DIR).
set -euo pipefail

E2E_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "${E2E_DIR}/.." && pwd)"
WORK="${SLUICE_E2E_WORK_DIR:-${E2E_DIR}/.work}"
LOGS="${WORK}/logs"
PIDS="${WORK}/pids"
PKI="${WORK}/pki"
KUBECONFIG_FILE="${WORK}/kubeconfig"
BUILD_SH="${E2E_DIR}/tools/build.sh"

HOST=127.0.0.1
ETCD_PORT=12379
ETCD_PEER_PORT=12380
APISERVER_PORT=16443
KCM_PORT=16257
SCHEDULER_PORT=16259
KWOK_PORT=16280
PROM_PORT=19090
SIM_PORT=19100
SERVICE_CIDR=10.96.0.0/16
# Only written into the `kubernetes` Service's Endpoints, which may not hold a
# loopback IP; nothing listens or routes there (the apiserver itself binds to
# 127.0.0.1 only, and --external-hostname keeps discovery on 127.0.0.1).
ADVERTISE_ADDRESS="${SLUICE_APISERVER_ADVERTISE_ADDRESS:-10.255.255.1}"
# The apiserver's watch cache (see start_apiserver): on unless `up` runs with
# SLUICE_APISERVER_WATCH_CACHE=false; `restart` keeps what the cluster was started with.
WATCH_CACHE="${SLUICE_APISERVER_WATCH_CACHE:-true}"
# SLUICE_APISERVER_PROFILING=true serves the apiserver's /debug/pprof (docs/performance.md).
PROFILING="${SLUICE_APISERVER_PROFILING:-false}"
WATCH_CACHE_FILE="${WORK}/apiserver-watch-cache"
CLUSTER_NAME=sluice-local
APISERVER_URL="https://${HOST}:${APISERVER_PORT}"
PROM_URL="http://${HOST}:${PROM_PORT}"
REDIS_PORT=16379
ARGOCD_SERVER_PORT=18080
ARGOCD_REPO_PORT=18081
ARGOCD_CONTROLLER_METRICS_PORT=18082
ARGOCD_SERVER_METRICS_PORT=18083
ARGOCD_REPO_METRICS_PORT=18084
ARGOCD_URL="http://${HOST}:${ARGOCD_SERVER_PORT}"
ARGOCD_WORK="${WORK}/argocd"
ARGOCD_REPO_URL="file://${ARGOCD_WORK}/repo.git"

# Start order; `down` stops in reverse.
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok prometheus)
# Started by argocd-up, on top of the cluster; `down` stops them first.
ARGOCD_COMPONENTS=(redis argocd-repo-server argocd-application-controller argocd-server)

log() { echo "cluster.sh: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- processes

pid_of() { cat "${PIDS}/$1.pid" 2>/dev/null || true; }

# alive PID: exists and is not a zombie (an exited daemon stays a zombie until
# whatever adopted it reaps it).
alive() {
  local state=""
  kill -0 "$1" 2>/dev/null || return 1
  read -r _ _ state _ < "/proc/$1/stat" 2>/dev/null || return 1
  [[ "${state}" != Z ]]
}

# running NAME: the pid file names a live process whose command line mentions
# NAME (guards against pid reuse).
running() {
  local pid
  pid="$(pid_of "$1")"
  [[ -n "${pid}" ]] && alive "${pid}" &&
    tr '\0' ' ' < "/proc/${pid}/cmdline" 2>/dev/null | grep -q -- "$1"
}

# start NAME BINARY ARGS...: run detached (own session), log to logs/NAME.log.
start() {
  local name="$1"; shift
  [[ -f "${LOGS}/${name}.log" ]] && mv -f "${LOGS}/${name}.log" "${LOGS}/${name}.log.prev"
  log "starting ${name} (log: ${LOGS}/${name}.log)"
  # 8>&-: daemons must not inherit the cluster lock (fd 8) held by `up`.
  setsid "$@" </dev/null >"${LOGS}/${name}.log" 2>&1 8>&- &
  echo $! > "${PIDS}/${name}.pid"
}

# stop NAME: SIGTERM, wait up to 10s, then SIGKILL.
stop() {
  local name="$1" pid i
  pid="$(pid_of "${name}")"
  if [[ -n "${pid}" ]] && running "${name}"; then
    log "stopping ${name} (pid ${pid})"
    kill -TERM "${pid}" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
      alive "${pid}" || break
      sleep 0.1
    done
    if alive "${pid}"; then
      log "${name} did not exit after 10s; sending SIGKILL"
      kill -KILL "${pid}" 2>/dev/null || true
    fi
  fi
  rm -f "${PIDS}/${name}.pid"
}

stop_argocd() {
  local i
  for ((i = ${#ARGOCD_COMPONENTS[@]} - 1; i >= 0; i--)); do
    stop "${ARGOCD_COMPONENTS[i]}"
  done
}

stop_all() {
  local i
  stop_argocd
  for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
    stop "${COMPONENTS[i]}"
  done
}

# wait_for DESC TIMEOUT_S LOGNAME CMD...: poll CMD every 0.5s; on timeout, or if
# LOGNAME's process died, print its log tail and fail.
wait_for() {
  local desc="$1" timeout="$2" name="$3" deadline
  shift 3
  deadline=$(( $(date +%s) + timeout ))
  until "$@" >/dev/null 2>&1; do
    # Only whether it is alive: a just-started daemon's command line is the forked shell's
    # until the exec (CI once read "exited" there under load; the daemon was fine).
    if [[ -n "${name}" && -f "${PIDS}/${name}.pid" ]] && ! alive "$(pid_of "${name}")"; then
      fail "${name} exited while waiting for ${desc}" "${name}"
    fi
    if (( $(date +%s) >= deadline )); then
      fail "timed out after ${timeout}s waiting for ${desc}" "${name}"
    fi
    sleep 0.5
  done
  log "ok: ${desc}"
}

# fail MSG [LOGNAME]: print the log tail, stop what `up` started, exit 1.
# Outside a starting `up` (STARTING=0) it only reports and exits 1.
STARTING=0
fail() {
  log "ERROR: $1"
  if [[ -n "${2:-}" && -f "${LOGS}/$2.log" ]]; then
    log "---- last 40 lines of ${LOGS}/$2.log ----"
    tail -n 40 "${LOGS}/$2.log" >&2 || true
    log "----"
  fi
  trap - EXIT
  [[ "${STARTING}" == 1 ]] || exit 1
  log "cleaning up (logs are kept in ${LOGS})"
  stop_all
  exit 1
}

# ------------------------------------------------------------------ prereqs

APT_UPDATED=0
# need CMD DEBIAN_PACKAGE: install the package with apt if CMD is missing.
need() {
  command -v "$1" >/dev/null && return 0
  if [[ "$(id -u)" != 0 ]]; then
    die "'$1' is missing: run 'sudo apt-get install -y --no-install-recommends $2' (only this step needs root)"
  fi
  log "installing $2 with apt-get (missing: $1)"
  if [[ "${APT_UPDATED}" == 0 ]]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2" >&2
  command -v "$1" >/dev/null || die "installed $2 but '$1' is still not on PATH"
}

bin_dir() { "${BUILD_SH}" --print-bin-dir; }

# ---------------------------------------------------------------------- PKI

# ca NAME CN: self-signed CA (kept across down/up).
ca() {
  [[ -f "${PKI}/$1.crt" && -f "${PKI}/$1.key" ]] && return 0
  openssl req -x509 -new -newkey rsa:2048 -nodes -days 3650 -sha256 \
    -keyout "${PKI}/$1.key" -out "${PKI}/$1.crt" -subj "/CN=$2" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null
}

# cert NAME CN ORG [SAN] [CA]: client (or, with SAN, serving) cert signed by
# CA (default: ca).
cert() {
  local name="$1" cn="$2" org="$3" san="${4:-}" signer="${5:-ca}" ext="${PKI}/$1.ext"
  [[ -f "${PKI}/${name}.crt" && -f "${PKI}/${name}.key" ]] && return 0
  local subj="/CN=${cn}"
  [[ -n "${org}" ]] && subj="/O=${org}${subj}"
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    if [[ -n "${san}" ]]; then
      echo "extendedKeyUsage=serverAuth,clientAuth"
      echo "subjectAltName=${san}"
    else
      echo "extendedKeyUsage=clientAuth"
    fi
  } > "${ext}"
  openssl req -new -newkey rsa:2048 -nodes -keyout "${PKI}/${name}.key" \
    -subj "${subj}" -out "${PKI}/${name}.csr" 2>/dev/null
  openssl x509 -req -in "${PKI}/${name}.csr" -CA "${PKI}/${signer}.crt" -CAkey "${PKI}/${signer}.key" \
    -CAcreateserial -days 3650 -sha256 -extfile "${ext}" -out "${PKI}/${name}.crt" 2>/dev/null
  rm -f "${PKI}/${name}.csr" "${ext}"
}

gen_pki() {
  mkdir -p "${PKI}"
  chmod 700 "${PKI}"
  if [[ ! -f "${PKI}/ca.crt" || ! -f "${PKI}/ca.key" ]]; then
    log "generating PKI in ${PKI}"
    rm -f "${PKI}"/*.crt "${PKI}"/*.key
  fi
  ca ca sluice-local-ca
  # Front proxy (request-header authn) for aggregated API servers; also keeps
  # the controller-manager/scheduler from logging a missing requestheader CA.
  ca front-proxy-ca sluice-local-front-proxy-ca
  cert front-proxy-client front-proxy-client "" "" front-proxy-ca
  # 10.96.0.1 is the `kubernetes` Service ClusterIP (first IP of SERVICE_CIDR).
  cert apiserver kube-apiserver "" \
    "IP:127.0.0.1,DNS:localhost,IP:10.96.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  cert admin sluice-admin system:masters
  cert kube-controller-manager system:kube-controller-manager ""
  cert kube-scheduler system:kube-scheduler ""
  # kwok plays every kubelet (node status, leases, pod status): give it admin.
  cert kwok system:kwok-controller system:masters
  if [[ ! -f "${PKI}/sa.key" ]]; then
    openssl genrsa -out "${PKI}/sa.key" 2048 2>/dev/null
    openssl rsa -in "${PKI}/sa.key" -pubout -out "${PKI}/sa.pub" 2>/dev/null
  fi
}

# kubeconfig FILE CERT_NAME USER: self-contained kubeconfig (embedded certs).
kubeconfig() {
  local file="$1" name="$2" user="$3"
  cat > "${file}.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: ${CLUSTER_NAME}
  cluster:
    server: ${APISERVER_URL}
    certificate-authority-data: $(base64 -w0 < "${PKI}/ca.crt")
users:
- name: ${user}
  user:
    client-certificate-data: $(base64 -w0 < "${PKI}/${name}.crt")
    client-key-data: $(base64 -w0 < "${PKI}/${name}.key")
contexts:
- name: ${CLUSTER_NAME}
  context:
    cluster: ${CLUSTER_NAME}
    user: ${user}
current-context: ${CLUSTER_NAME}
preferences: {}
EOF
  chmod 600 "${file}.tmp"
  mv -f "${file}.tmp" "${file}"
}

# ------------------------------------------------------------------- checks

KCTL=()
kctl() { "${KCTL[@]}" "$@"; }

curl_api() {
  curl -fsS --max-time 5 --cacert "${PKI}/ca.crt" --cert "${PKI}/admin.crt" \
    --key "${PKI}/admin.key" "${APISERVER_URL}$1"
}
etcd_healthy() { curl -fsS --max-time 3 "http://${HOST}:${ETCD_PORT}/health" 2>/dev/null | grep -q '"health":"true"'; }
apiserver_ready() { [[ "$(curl_api /readyz 2>/dev/null)" == ok ]]; }
healthz_ok() { [[ "$(curl -fsSk --max-time 3 "https://${HOST}:$1/healthz" 2>/dev/null)" == ok ]]; }
kwok_ok() { curl -fsS --max-time 3 "http://${HOST}:${KWOK_PORT}/healthz" >/dev/null 2>&1; }
prom_ready() { curl -fsS --max-time 3 "${PROM_URL}/-/ready" >/dev/null 2>&1; }
default_sa() { kctl -n default get serviceaccount default; }
nodes_ready() {
  local n
  n="$(kctl get nodes -l type=kwok \
    -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | grep -c '^True$')"
  [[ "${n}" -ge 3 ]]
}

all_healthy() {
  local c
  for c in "${COMPONENTS[@]}"; do running "${c}" || return 1; done
  [[ -f "${WORK}/.up" ]] && etcd_healthy && apiserver_ready && prom_ready
}

# check_ports: fail early if another process already listens on our ports.
check_ports() {
  local port busy=()
  for port in "${ETCD_PORT}" "${ETCD_PEER_PORT}" "${APISERVER_PORT}" "${KCM_PORT}" \
    "${SCHEDULER_PORT}" "${KWOK_PORT}" "${PROM_PORT}"; do
    if (exec 3<>"/dev/tcp/${HOST}/${port}") 2>/dev/null; then
      busy+=("${port}")
    fi
  done
  if [[ ${#busy[@]} -gt 0 ]]; then
    die "port(s) ${busy[*]} on ${HOST} already in use (see: ss -ltnp | grep -E '$(IFS='|'; echo "${busy[*]}")')"
  fi
}

# -------------------------------------------------------------- components

# The benchmark's 10,000 Rollouts keep about 1 GB in etcd (six 8 KB pod templates each, with
# history until the apiserver compacts it): past the default 2 GiB quota an etcd refuses every
# write. 8 GiB is etcd's suggested maximum.
start_etcd() {
  mkdir -p "${WORK}/etcd-data"
  chmod 700 "${WORK}/etcd-data"
  start etcd "${BIN}/etcd" \
    --name=sluice-local \
    --data-dir="${WORK}/etcd-data" \
    --listen-client-urls="http://${HOST}:${ETCD_PORT}" \
    --advertise-client-urls="http://${HOST}:${ETCD_PORT}" \
    --listen-peer-urls="http://${HOST}:${ETCD_PEER_PORT}" \
    --initial-advertise-peer-urls="http://${HOST}:${ETCD_PEER_PORT}" \
    --initial-cluster="sluice-local=http://${HOST}:${ETCD_PEER_PORT}" \
    --initial-cluster-state=new \
    --unsafe-no-fsync \
    --quota-backend-bytes=8589934592 \
    --log-level=warn
  wait_for "etcd /health" 30 etcd etcd_healthy
}

# The audit log records who wrote what (user agent included), so tests can tell the
# operator's replicas apart without trusting the operator's own logs.
write_audit_policy() {
  cat > "${WORK}/audit-policy.yaml" <<EOF
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
    users: ["sluice-admin"]
    verbs: [create, update, patch, delete, deletecollection]
  - level: None
EOF
}

start_apiserver() {
  write_audit_policy
  echo "${WATCH_CACHE}" > "${WATCH_CACHE_FILE}"
  # A soft memory limit: at the benchmark's 10,000 Rollouts (some 80,000 objects with 8 KB pod
  # templates) the apiserver's heap grew past 15 GB with Go's default collector pacing and the
  # machine ran out of memory; with a limit the collector works harder instead.
  # WATCH_CACHE=false (`make bench` sets it) serves every read and watch from etcd: the watch
  # cache keeps each object, and for a while each version of it, decoded; Rollouts are custom
  # resources, kept as maps, with an 8 KB template in the benchmark. Measured at 1,000 Rollouts:
  # 967 MB of live heap with the cache, 313 MB without (docs/performance.md).
  start kube-apiserver env GOMEMLIMIT=9GiB "${BIN}/kube-apiserver" \
    --watch-cache="${WATCH_CACHE}" \
    --etcd-servers="http://${HOST}:${ETCD_PORT}" \
    --bind-address="${HOST}" \
    --advertise-address="${ADVERTISE_ADDRESS}" \
    --external-hostname="${HOST}" \
    --secure-port="${APISERVER_PORT}" \
    --tls-cert-file="${PKI}/apiserver.crt" \
    --tls-private-key-file="${PKI}/apiserver.key" \
    --client-ca-file="${PKI}/ca.crt" \
    --requestheader-client-ca-file="${PKI}/front-proxy-ca.crt" \
    --requestheader-allowed-names=front-proxy-client \
    --requestheader-username-headers=X-Remote-User \
    --requestheader-group-headers=X-Remote-Group \
    --requestheader-extra-headers-prefix=X-Remote-Extra- \
    --proxy-client-cert-file="${PKI}/front-proxy-client.crt" \
    --proxy-client-key-file="${PKI}/front-proxy-client.key" \
    --authorization-mode=Node,RBAC \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="${PKI}/sa.pub" \
    --service-account-signing-key-file="${PKI}/sa.key" \
    --service-cluster-ip-range="${SERVICE_CIDR}" \
    --allow-privileged=true \
    --audit-policy-file="${WORK}/audit-policy.yaml" \
    --audit-log-path="${LOGS}/audit.log" \
    --audit-log-maxsize=200 \
    --audit-log-maxbackup=1 \
    --profiling="${PROFILING}"
  wait_for "kube-apiserver /readyz" 120 kube-apiserver apiserver_ready
}

# kwok's nodes never fail, so the node lifecycle controller has nothing to find; after a
# kube-apiserver restart its lease informer can lag kwok's renewals by over 40 s, and with the
# default grace it then marks every node NotReady and every pod unready, which kwok does not
# undo (seen in the chaos restart test). A long grace keeps the nodes Ready through restarts.
# Its clients' default rate (20 requests/s, 5 ReplicaSets synced at once) made a thousand pods
# take minutes to appear; the benchmark creates ten thousand, so the limits are raised.
# It keeps every pod and ReplicaSet: about 230 MB of live heap at 1,000 Rollouts and ten times
# that at the benchmark's 10,000, where a 3 GiB soft limit left its collector almost no room
# and had it marking the whole heap again and again; with 6 GiB its heap reached 5.4 GB in the
# first start of 10,000, garbage included, and it stayed at that limit (5,845 MiB resident) in
# the quiet minutes after. 8 GiB leaves it the room its collector's default pace asks for.
start_controller_manager() {
  start kube-controller-manager env GOMEMLIMIT=8GiB "${BIN}/kube-controller-manager" \
    --kubeconfig="${WORK}/kube-controller-manager.kubeconfig" \
    --authentication-kubeconfig="${WORK}/kube-controller-manager.kubeconfig" \
    --authorization-kubeconfig="${WORK}/kube-controller-manager.kubeconfig" \
    --bind-address="${HOST}" \
    --secure-port="${KCM_PORT}" \
    --leader-elect=false \
    --use-service-account-credentials=true \
    --service-account-private-key-file="${PKI}/sa.key" \
    --root-ca-file="${PKI}/ca.crt" \
    --cluster-signing-cert-file="${PKI}/ca.crt" \
    --cluster-signing-key-file="${PKI}/ca.key" \
    --service-cluster-ip-range="${SERVICE_CIDR}" \
    --cluster-name="${CLUSTER_NAME}" \
    --node-monitor-grace-period=5m \
    --kube-api-qps=200 \
    --kube-api-burst=400 \
    --concurrent-replicaset-syncs=20 \
    --concurrent-service-endpoint-syncs=20 \
    --profiling=false
}

# The default profile spreads each workload's pods over zones and nodes, and to find a pod's
# workload it keeps every Service, ReplicaSet, StatefulSet and ReplicationController in
# memory: at the benchmark's 10,000 Rollouts, 60,000 ReplicaSets with 8 KB pod templates, a
# heap near its soft limit, the collector running most of the time, and a relist of them all
# each time etcd's compaction outdates its watch (no watch cache, no bookmarks). kwok's nodes
# are alike and in no zone, so spreading decides nothing here: it is left out.
write_scheduler_config() {
  cat > "${WORK}/kube-scheduler.yaml" <<EOF
apiVersion: kubescheduler.config.k8s.io/v1
kind: KubeSchedulerConfiguration
clientConnection:
  kubeconfig: ${WORK}/kube-scheduler.kubeconfig
  qps: 200
  burst: 400
leaderElection:
  leaderElect: false
profiles:
  - schedulerName: default-scheduler
    pluginConfig:
      - name: PodTopologySpread
        args:
          defaultingType: List
          defaultConstraints: []
EOF
}

start_scheduler() {
  write_scheduler_config
  start kube-scheduler env GOMEMLIMIT=3GiB "${BIN}/kube-scheduler" \
    --config="${WORK}/kube-scheduler.yaml" \
    --authentication-kubeconfig="${WORK}/kube-scheduler.kubeconfig" \
    --authorization-kubeconfig="${WORK}/kube-scheduler.kubeconfig" \
    --bind-address="${HOST}" \
    --secure-port="${SCHEDULER_PORT}" \
    --profiling=false
}

start_kwok() {
  start kwok "${BIN}/kwok" \
    --kubeconfig="${WORK}/kwok.kubeconfig" \
    --config="${E2E_DIR}/kwok/kwok.yaml" \
    --config="${E2E_DIR}/kwok/node-stages.yaml" \
    --config="${E2E_DIR}/kwok/pod-stages.yaml" \
    --manage-all-nodes=false \
    --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
    --node-lease-duration-seconds=40 \
    --cidr=10.244.0.1/16 \
    --node-ip=127.0.1.254 \
    --server-address="${HOST}:${KWOK_PORT}"
}

start_prometheus() {
  mkdir -p "${WORK}/prometheus-data"
  cat > "${WORK}/prometheus.yml" <<EOF
# Generated by e2e/cluster.sh up. Edit, then reload without a restart:
#   curl -X POST ${PROM_URL}/-/reload
global:
  scrape_interval: 2s
  scrape_timeout: 2s
  evaluation_interval: 2s
scrape_configs:
  # Sluice's traffic simulator (serves Istio-style metrics).
  - job_name: istio-sim
    scrape_interval: 2s
    static_configs:
      - targets: ['${HOST}:${SIM_PORT}']
  - job_name: prometheus
    scrape_interval: 2s
    static_configs:
      - targets: ['${HOST}:${PROM_PORT}']
EOF
  start prometheus prometheus \
    --config.file="${WORK}/prometheus.yml" \
    --storage.tsdb.path="${WORK}/prometheus-data" \
    --storage.tsdb.retention.time=1d \
    --web.listen-address="${HOST}:${PROM_PORT}" \
    --web.enable-lifecycle
}

# apply_crds [DIR...]: server-side apply the Istio, Gateway API and crds/ CRDs
# (or just DIRs), then wait until all CRDs are Established.
apply_crds() {
  local dir files=("$@")
  if [[ ${#files[@]} == 0 ]]; then
    while IFS= read -r dir; do
      files+=("${dir}")
    done < <("${BUILD_SH}" --print-crd-dirs)
    # Our own CRDs (filled by the operator work), if any.
    if compgen -G "${REPO_DIR}/crds/*.y*ml" >/dev/null; then
      files+=("${REPO_DIR}/crds")
    fi
  fi
  for dir in "${files[@]}"; do
    log "applying CRDs from ${dir}"
    kctl apply --server-side --force-conflicts --field-manager=sluice-cluster-sh -f "${dir}" >/dev/null ||
      fail "applying CRDs from ${dir} failed" kube-apiserver
  done
  kctl wait --for=condition=Established crd --all --timeout=60s >/dev/null ||
    fail "CRDs not Established within 60s" kube-apiserver
  log "ok: $(kctl get crd --no-headers | wc -l) CRDs Established"
}

# --------------------------------------------------------------- commands

cmd_up() {
  local t0 c
  t0=$(date +%s)
  mkdir -p "${WORK}" "${LOGS}" "${PIDS}"
  exec 8>"${WORK}/.cluster.lock"
  flock 8
  [[ "${WATCH_CACHE}" == true || "${WATCH_CACHE}" == false ]] ||
    die "SLUICE_APISERVER_WATCH_CACHE must be true or false, not '${WATCH_CACHE}'"
  [[ "${PROFILING}" == true || "${PROFILING}" == false ]] ||
    die "SLUICE_APISERVER_PROFILING must be true or false, not '${PROFILING}'"

  if all_healthy; then
    # A cluster is not restarted behind its users' backs: a request for the other watch-cache
    # setting (`make bench` asks for none) is refused, not ignored.
    if [[ -n "${SLUICE_APISERVER_WATCH_CACHE:-}" && -s "${WATCH_CACHE_FILE}" &&
          "$(cat "${WATCH_CACHE_FILE}")" != "${SLUICE_APISERVER_WATCH_CACHE}" ]]; then
      die "the cluster is up with the apiserver's watch cache '$(cat "${WATCH_CACHE_FILE}")', not '${SLUICE_APISERVER_WATCH_CACHE}': make cluster-down first"
    fi
    log "already up"
    # Re-apply crds/ if it changed since the cluster came up.
    if [[ -n "$(find "${REPO_DIR}/crds" -newer "${WORK}/.up" -name '*.y*ml' 2>/dev/null | head -n 1)" ]]; then
      BIN="$(bin_dir)"
      KCTL=("${BIN}/kubectl" --kubeconfig="${KUBECONFIG_FILE}")
      apply_crds "${REPO_DIR}/crds"
      touch "${WORK}/.up"
    fi
    print_usage
    return 0
  fi
  for c in "${COMPONENTS[@]}"; do
    if running "${c}"; then
      log "found a partial cluster; restarting it"
      cmd_down_locked
      break
    fi
  done
  rm -f "${WORK}/.up"
  check_ports

  need curl curl
  need openssl openssl
  need prometheus prometheus
  need flock util-linux
  need setsid util-linux

  log "building/checking tools (e2e/tools/build.sh)"
  BIN="$("${BUILD_SH}" | tail -n 1)"
  [[ -x "${BIN}/kube-apiserver" ]] || die "build.sh did not produce ${BIN}/kube-apiserver"
  KCTL=("${BIN}/kubectl" --kubeconfig="${KUBECONFIG_FILE}")

  gen_pki
  kubeconfig "${KUBECONFIG_FILE}" admin sluice-admin
  kubeconfig "${WORK}/kube-controller-manager.kubeconfig" kube-controller-manager system:kube-controller-manager
  kubeconfig "${WORK}/kube-scheduler.kubeconfig" kube-scheduler system:kube-scheduler
  kubeconfig "${WORK}/kwok.kubeconfig" kwok system:kwok-controller

  # From here on, any unexpected error tears down what was started.
  STARTING=1
  trap 'fail "unexpected error (line ${LINENO})"' EXIT

  start_etcd
  start_apiserver
  start_controller_manager
  start_scheduler
  start_kwok
  start_prometheus

  wait_for "kube-controller-manager /healthz" 60 kube-controller-manager healthz_ok "${KCM_PORT}"
  wait_for "kube-scheduler /healthz" 60 kube-scheduler healthz_ok "${SCHEDULER_PORT}"
  wait_for "kwok /healthz" 60 kwok kwok_ok
  kctl apply -f "${E2E_DIR}/kwok/nodes.yaml" >/dev/null || fail "creating nodes failed" kube-apiserver
  wait_for "3 kwok nodes Ready" 60 kwok nodes_ready
  wait_for "ServiceAccount default/default" 60 kube-controller-manager default_sa
  apply_crds
  wait_for "prometheus /-/ready" 60 prometheus prom_ready

  trap - EXIT
  STARTING=0
  touch "${WORK}/.up"
  log "cluster up in $(( $(date +%s) - t0 ))s"
  print_usage
}

print_usage() {
  cat >&2 <<EOF

Local cluster '${CLUSTER_NAME}' is up (Kubernetes $("${BUILD_SH}" --print-bin-dir | sed -n 's#.*/k8s-\(v[^/]*\)/bin#\1#p'), 3 kwok nodes).
  export KUBECONFIG=${KUBECONFIG_FILE}
  export PATH=$(bin_dir):\$PATH        # kubectl, helm, etcd, kwok of matching versions
  # or: eval "\$(e2e/cluster.sh env)"
  kubectl get nodes
  Prometheus: ${PROM_URL}   (scrapes job istio-sim at ${HOST}:${SIM_PORT} every 2s)
  Logs: ${LOGS}/   status: e2e/cluster.sh status   stop: make cluster-down
EOF
}

cmd_down_locked() {
  # The traffic simulator watches the cluster: left running, it would carry on against the
  # next cluster (a benchmark once measured a stray one's load).
  "${E2E_DIR}/simulator/run.sh" stop >/dev/null 2>&1 || true
  stop_all
  rm -rf "${WORK}/etcd-data" "${WORK}/prometheus-data" "${WORK}/.up" "${WATCH_CACHE_FILE}" "${ARGOCD_WORK}"
}

cmd_down() {
  if [[ ! -d "${WORK}" ]]; then
    log "nothing to do"
    return 0
  fi
  mkdir -p "${PIDS}"
  exec 8>"${WORK}/.cluster.lock"
  flock 8
  cmd_down_locked
  log "cluster down (certs kept in ${PKI}, logs in ${LOGS})"
}

# cmd_restart NAME: stop one component and start it again with the same flags and data
# (fault injection for the reliability tests).
cmd_restart() {
  local name="$1"
  mkdir -p "${PIDS}"
  [[ -f "${WORK}/.up" ]] || die "the cluster is not up"
  BIN="$(bin_dir)"
  KCTL=("${BIN}/kubectl" --kubeconfig="${KUBECONFIG_FILE}")
  stop "${name}"
  case "${name}" in
    etcd) start_etcd ;;
    kube-apiserver)
      if [[ -z "${SLUICE_APISERVER_WATCH_CACHE:-}" && -s "${WATCH_CACHE_FILE}" ]]; then
        WATCH_CACHE="$(cat "${WATCH_CACHE_FILE}")"
      fi
      start_apiserver
      ;;
    prometheus)
      start_prometheus
      wait_for "prometheus /-/ready" 60 prometheus prom_ready
      ;;
    *) die "restart: unknown component '${name}' (etcd, kube-apiserver, prometheus)" ;;
  esac
}

cmd_status() {
  local c pid ok=0 state
  for c in "${COMPONENTS[@]}"; do
    pid="$(pid_of "${c}")"
    if running "${c}"; then state="running"; else state="stopped"; ok=1; fi
    printf '%-24s %-8s pid=%-8s log=%s\n' "${c}" "${state}" "${pid:--}" "${LOGS}/${c}.log"
  done
  printf '%-24s %s\n' "etcd /health" "$(etcd_healthy && echo ok || echo FAIL)"
  printf '%-24s %s\n' "apiserver /readyz" "$([[ -f "${PKI}/admin.crt" ]] && apiserver_ready && echo ok || echo FAIL)"
  printf '%-24s %s\n' "controller-manager" "$(healthz_ok "${KCM_PORT}" && echo ok || echo FAIL)"
  printf '%-24s %s\n' "scheduler" "$(healthz_ok "${SCHEDULER_PORT}" && echo ok || echo FAIL)"
  printf '%-24s %s\n' "kwok" "$(kwok_ok && echo ok || echo FAIL)"
  printf '%-24s %s\n' "prometheus /-/ready" "$(prom_ready && echo ok || echo FAIL)"
  if [[ -f "${ARGOCD_WORK}/.up" ]]; then
    for c in "${ARGOCD_COMPONENTS[@]}"; do
      pid="$(pid_of "${c}")"
      if running "${c}"; then state="running"; else state="stopped"; ok=1; fi
      printf '%-30s %-8s pid=%-8s log=%s\n' "${c}" "${state}" "${pid:--}" "${LOGS}/${c}.log"
    done
  fi
  if apiserver_ready 2>/dev/null && [[ -x "$(bin_dir)/kubectl" ]]; then
    KCTL=("$(bin_dir)/kubectl" --kubeconfig="${KUBECONFIG_FILE}")
    kctl get nodes -o wide 2>&1 || true
  else
    ok=1
  fi
  echo "kubeconfig: ${KUBECONFIG_FILE}"
  echo "prometheus: ${PROM_URL}"
  return "${ok}"
}

# ------------------------------------------------------------------- ArgoCD

redis_ok() { redis-cli -h "${HOST}" -p "${REDIS_PORT}" ping 2>/dev/null | grep -q PONG; }
http_ok() { curl -fsS --max-time 3 "$1" >/dev/null 2>&1; }
argocd_healthy() {
  local c
  for c in "${ARGOCD_COMPONENTS[@]}"; do running "${c}" || return 1; done
  [[ -f "${ARGOCD_WORK}/.up" ]] && http_ok "${ARGOCD_URL}/healthz"
}

# The repository the tests commit to: bare, with a first commit on main so ArgoCD can
# resolve HEAD before any test has pushed.
init_git_repo() {
  [[ -d "${ARGOCD_WORK}/repo.git" ]] && return 0
  local seed="${ARGOCD_WORK}/seed"
  rm -rf "${seed}"
  git init -q --bare -b main "${ARGOCD_WORK}/repo.git"
  git init -q -b main "${seed}"
  echo "Manifests the ArgoCD end-to-end tests commit (tests/argocd.rs)." > "${seed}/README"
  git -C "${seed}" add README
  git -C "${seed}" -c user.name=sluice-e2e -c user.email=e2e@sluice.invalid commit -q -m "seed"
  git -C "${seed}" push -q "${ARGOCD_WORK}/repo.git" main
  rm -rf "${seed}"
}

# The argocd namespace as a plain install has it, plus the settings a test needs: a short
# reconciliation period (ArgoCD polls git), this cluster registered as the destination
# `sluice-local` (admin credentials), and Sluice's health checks and actions, merged
# into argocd-cm under their own field manager exactly as docs/gitops.md tells users to.
argocd_config() {
  kctl create namespace argocd --dry-run=client -o yaml | kctl apply -f - >/dev/null
  kctl apply --server-side --field-manager=sluice-cluster-sh -f - >/dev/null <<EOF
apiVersion: v1
kind: ConfigMap
metadata:
  name: argocd-cm
  namespace: argocd
  labels: {app.kubernetes.io/part-of: argocd}
data:
  timeout.reconciliation: 10s
  timeout.reconciliation.jitter: 0s
  # ArgoCD runs outside the cluster, so it has no in-cluster config: the cluster is
  # registered below under its real address instead.
  cluster.inClusterEnabled: "false"
---
apiVersion: v1
kind: Secret
metadata:
  name: cluster-${CLUSTER_NAME}
  namespace: argocd
  labels: {argocd.argoproj.io/secret-type: cluster}
stringData:
  name: ${CLUSTER_NAME}
  server: ${APISERVER_URL}
  config: |
    {"tlsClientConfig": {"caData": "$(base64 -w0 < "${PKI}/ca.crt")",
     "certData": "$(base64 -w0 < "${PKI}/admin.crt")", "keyData": "$(base64 -w0 < "${PKI}/admin.key")"}}
---
apiVersion: v1
kind: Secret
metadata:
  name: argocd-secret
  namespace: argocd
  labels: {app.kubernetes.io/part-of: argocd}
stringData:
  server.secretkey: $(openssl rand -hex 32)
---
apiVersion: argoproj.io/v1alpha1
kind: AppProject
metadata:
  name: default
  namespace: argocd
spec:
  sourceRepos: ['*']
  destinations: [{server: '*', namespace: '*'}]
  clusterResourceWhitelist: [{group: '*', kind: '*'}]
EOF
  kctl apply --server-side --field-manager=sluice-argocd -f "${REPO_DIR}/config/argocd/argocd-cm.yaml" >/dev/null
}

cmd_argocd_up() {
  local t0 common
  t0=$(date +%s)
  [[ -f "${WORK}/.up" ]] || die "the cluster is not up (make cluster-up)"
  mkdir -p "${ARGOCD_WORK}/tmp" "${PIDS}" "${LOGS}"
  exec 8>"${WORK}/.cluster.lock"
  flock 8
  if argocd_healthy; then
    log "ArgoCD already up"
    return 0
  fi
  need redis-server redis-server
  need redis-cli redis-tools
  need git git
  BIN="$("${BUILD_SH}" | tail -n 1)"
  [[ -x "${BIN}/argocd-application-controller" ]] || die "build.sh did not produce ${BIN}/argocd-application-controller"
  KCTL=("${BIN}/kubectl" --kubeconfig="${KUBECONFIG_FILE}")
  stop_argocd
  # The Application and AppProject CRDs (the last of the CRD dirs): applied by `up` too.
  apply_crds "$("${BUILD_SH}" --print-crd-dirs | tail -n 1)"
  init_git_repo
  argocd_config

  export TMPDIR="${ARGOCD_WORK}/tmp" ARGOCD_GPG_ENABLED=false
  common=(--kubeconfig="${KUBECONFIG_FILE}" --namespace=argocd --redis="${HOST}:${REDIS_PORT}" --loglevel=info)
  start redis redis-server --bind "${HOST}" --port "${REDIS_PORT}" --save "" --appendonly no
  wait_for "redis PING" 30 redis redis_ok
  start argocd-repo-server "${BIN}/argocd-repo-server" --redis="${HOST}:${REDIS_PORT}" \
    --address="${HOST}" --port="${ARGOCD_REPO_PORT}" --metrics-address="${HOST}" \
    --metrics-port="${ARGOCD_REPO_METRICS_PORT}" --disable-tls --loglevel=info
  wait_for "argocd-repo-server /healthz" 60 argocd-repo-server http_ok "http://${HOST}:${ARGOCD_REPO_METRICS_PORT}/healthz"
  start argocd-application-controller "${BIN}/argocd-application-controller" "${common[@]}" \
    --repo-server="${HOST}:${ARGOCD_REPO_PORT}" --repo-server-plaintext \
    --metrics-port="${ARGOCD_CONTROLLER_METRICS_PORT}" --status-processors=2 --operation-processors=2
  wait_for "argocd-application-controller /metrics" 60 argocd-application-controller http_ok "http://${HOST}:${ARGOCD_CONTROLLER_METRICS_PORT}/metrics"
  start argocd-server "${BIN}/argocd-server" "${common[@]}" \
    --repo-server="${HOST}:${ARGOCD_REPO_PORT}" --repo-server-plaintext \
    --address="${HOST}" --port="${ARGOCD_SERVER_PORT}" --metrics-address="${HOST}" \
    --metrics-port="${ARGOCD_SERVER_METRICS_PORT}" --insecure --disable-auth
  wait_for "argocd-server /healthz" 60 argocd-server http_ok "${ARGOCD_URL}/healthz"
  touch "${ARGOCD_WORK}/.up"
  log "ArgoCD up in $(( $(date +%s) - t0 ))s: API ${ARGOCD_URL}, git ${ARGOCD_REPO_URL}"
}

cmd_argocd_down() {
  mkdir -p "${PIDS}"
  exec 8>"${WORK}/.cluster.lock"
  flock 8
  stop_argocd
  if [[ -f "${WORK}/.up" ]] && apiserver_ready; then
    KCTL=("$(bin_dir)/kubectl" --kubeconfig="${KUBECONFIG_FILE}")
    # Waits, so that an argocd-up right after does not write into a terminating namespace.
    kctl delete namespace argocd --ignore-not-found --timeout=60s >/dev/null || true
  fi
  rm -rf "${ARGOCD_WORK}"
  log "ArgoCD down (logs in ${LOGS})"
}

cmd_env() {
  echo "export KUBECONFIG='${KUBECONFIG_FILE}'"
  # shellcheck disable=SC2016 # $PATH is expanded by the shell that evals this.
  printf 'export PATH='\''%s'\'':"$PATH"\n' "$(bin_dir)"
  echo "export SLUICE_PROMETHEUS_URL='${PROM_URL}'"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  restart) cmd_restart "${2:-}" ;;
  kubeconfig) echo "${KUBECONFIG_FILE}" ;;
  prometheus-url) echo "${PROM_URL}" ;;
  env) cmd_env ;;
  argocd-up) cmd_argocd_up ;;
  argocd-down) cmd_argocd_down ;;
  argocd-url) echo "${ARGOCD_URL}" ;;
  argocd-repo) echo "${ARGOCD_REPO_URL}" ;;
  -h|--help|help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' ;;
  *) echo "usage: $0 up|down|status|restart NAME|kubeconfig|prometheus-url|env|argocd-up|argocd-down|argocd-url|argocd-repo" >&2; exit 2 ;;
esac
