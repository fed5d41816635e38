#!/usr/bin/env bash
# Starts / stops the traffic simulator (sluice-traffic-sim) for the local e2e cluster.
#
#   e2e/simulator/run.sh start [KUBECONFIG]   build, start in the background, wait for /healthz
#   e2e/simulator/run.sh stop                 stop it (SIGTERM, then SIGKILL after 10s)
#   e2e/simulator/run.sh restart [KUBECONFIG]
#   e2e/simulator/run.sh status               exit 0 if running and healthy
#
# KUBECONFIG defaults to e2e/.work/kubeconfig. The simulator's own settings come from the
# environment: SIM_LISTEN (127.0.0.1:19100), SIM_TICK_MS (1000), SIM_RPS (50), RUST_LOG (info).
# Pid file: e2e/.work/sim.pid; log: e2e/.work/logs/simulator.log.
set -euo pipefail

SIM_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
E2E_DIR="$(dirname "${SIM_DIR}")"
REPO_DIR="$(dirname "${E2E_DIR}")"
WORK_DIR="${E2E_DIR}/.work"
PID_FILE="${WORK_DIR}/sim.pid"
LOG_DIR="${WORK_DIR}/logs"
LOG_FILE="${LOG_DIR}/simulator.log"
BUILD_LOCK="${BUILD_LOCK:-/tmp/sluice-build.lock}"
export SIM_LISTEN="${SIM_LISTEN:-127.0.0.1:19100}"

log() { printf '[simulator] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

running_pid() {
  [[ -f "${PID_FILE}" ]] || return 1
  local pid
  pid="$(cat "${PID_FILE}" 2>/dev/null || true)"
  [[ "${pid}" =~ ^[0-9]+$ ]] || return 1
  kill -0 "${pid}" 2>/dev/null || return 1
  # Guard against a recycled pid belonging to something else.
  grep -q 'sluice-traffic-sim' "/proc/${pid}/cmdline" 2>/dev/null || return 1
  echo "${pid}"
}

healthy() {
  curl -fsS -m 2 "http://${SIM_LISTEN}/healthz" >/dev/null 2>&1
}

target_dir() {
  # Honour CARGO_TARGET_DIR / a custom target dir via cargo metadata.
  (cd "${REPO_DIR}" && cargo metadata --format-version 1 --no-deps 2>/dev/null) |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p'
}

build() {
  log "building sluice-simulator"
  (cd "${REPO_DIR}" && flock "${BUILD_LOCK}" cargo build -q -p sluice-simulator) ||
    die "cargo build -p sluice-simulator failed"
  local dir
  dir="$(target_dir)"
  [[ -n "${dir}" ]] || dir="${REPO_DIR}/target"
  BIN="${dir}/debug/sluice-traffic-sim"
  [[ -x "${BIN}" ]] || die "built binary not found at ${BIN}"
}

start() {
  local kubeconfig="${1:-${WORK_DIR}/kubeconfig}"
  [[ -f "${kubeconfig}" ]] || die "kubeconfig ${kubeconfig} not found (is the cluster up? e2e/cluster.sh up)"
  kubeconfig="$(cd "$(dirname "${kubeconfig}")" && pwd)/$(basename "${kubeconfig}")"
  local pid
  if pid="$(running_pid)"; then
    if healthy; then
      log "already running (pid ${pid}) on ${SIM_LISTEN}"
      return 0
    fi
    log "pid ${pid} is running but not healthy; restarting"
    stop
  fi
  build
  mkdir -p "${LOG_DIR}"
  log "starting ${BIN} (KUBECONFIG=${kubeconfig}, listen ${SIM_LISTEN}); log ${LOG_FILE}"
  KUBECONFIG="${kubeconfig}" nohup "${BIN}" >>"${LOG_FILE}" 2>&1 </dev/null &
  pid=$!
  echo "${pid}" >"${PID_FILE}"
  local i
  for i in $(seq 1 100); do
    if ! kill -0 "${pid}" 2>/dev/null; then
      rm -f "${PID_FILE}"
      tail -n 20 "${LOG_FILE}" >&2 || true
      die "simulator exited during startup (see ${LOG_FILE})"
    fi
    if healthy; then
      log "ready after ${i} checks: http://${SIM_LISTEN}/metrics  /state  /healthz"
      return 0
    fi
    sleep 0.2
  done
  tail -n 20 "${LOG_FILE}" >&2 || true
  die "simulator did not answer /healthz within 20s (pid ${pid} left running; run '$0 stop')"
}

stop() {
  local pid
  if ! pid="$(running_pid)"; then
    rm -f "${PID_FILE}"
    log "not running"
    return 0
  fi
  log "stopping pid ${pid}"
  kill -TERM "${pid}" 2>/dev/null || true
  local i
  for i in $(seq 1 50); do
    kill -0 "${pid}" 2>/dev/null || break
    sleep 0.2
  done
  if kill -0 "${pid}" 2>/dev/null; then
    log "pid ${pid} ignored SIGTERM; killing"
    kill -KILL "${pid}" 2>/dev/null || true
  fi
  rm -f "${PID_FILE}"
}

status() {
  local pid
  if pid="$(running_pid)"; then
    if healthy; then
      log "running (pid ${pid}), healthy on ${SIM_LISTEN}"
      return 0
    fi
    log "running (pid ${pid}) but /healthz on ${SIM_LISTEN} does not answer"
    return 1
  fi
  log "not running"
  return 1
}

case "${1:-}" in
  start) shift; start "$@" ;;
  stop) stop ;;
  restart) shift; stop; start "$@" ;;
  status) status ;;
  *) echo "usage: $0 start [KUBECONFIG] | stop | restart [KUBECONFIG] | status" >&2; exit 2 ;;
esac
