#!/usr/bin/env bash
# Runs every fuzz target under fuzz/ for SECONDS each (default 15) with cargo-fuzz
# (libFuzzer, coverage-guided). cargo-fuzz needs a nightly toolchain; it is built once from
# crates.io into the tools cache, like the Go tools of e2e/tools.
#
# Usage: e2e/fuzz.sh [SECONDS]        (make fuzz; make test runs it with 15)
#
# New inputs go to e2e/.work/fuzz/<target>; the committed seeds in fuzz/corpus/<target> are
# only read. A crash stops the run with the input's path: copy it into fuzz/corpus/<target>
# (tests/fuzz_corpus.rs then replays it on stable in every make test) and fix the code.
set -euo pipefail

SECONDS_EACH="${1:-15}"
# make test passes a fixed seed, so its short run explores the same inputs every time (a
# failure there reproduces); make fuzz leaves it unset, to explore anew.
SEED="${SLUICE_FUZZ_SEED:-}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS_DIR="${SLUICE_TOOLS_DIR:-${HOME}/.cache/sluice/tools}"
CARGO_FUZZ_VERSION=0.13.2
CARGO_FUZZ_ROOT="${TOOLS_DIR}/cargo-fuzz-${CARGO_FUZZ_VERSION}"
WORK="${SLUICE_E2E_WORK_DIR:-${REPO}/e2e/.work}/fuzz"
# A development build without a sanitizer: the targets are safe Rust, so AddressSanitizer
# adds nothing but build time (3 min instead of 9 on 2 cores); debug assertions stay on.
FLAGS=(--dev --sanitizer none)

log() { echo "fuzz.sh: $*" >&2; }

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  log "no nightly toolchain (cargo-fuzz needs one); trying: rustup toolchain install nightly"
  if ! rustup toolchain install nightly --profile minimal >&2; then
    log "SKIPPED: no nightly toolchain here. The committed corpus still runs on stable (tests/fuzz_corpus.rs)."
    exit 0
  fi
fi
if [[ ! -x "${CARGO_FUZZ_ROOT}/bin/cargo-fuzz" ]]; then
  log "building cargo-fuzz ${CARGO_FUZZ_VERSION} into ${CARGO_FUZZ_ROOT}"
  cargo install cargo-fuzz --version "${CARGO_FUZZ_VERSION}" --locked --root "${CARGO_FUZZ_ROOT}" >&2
fi
export PATH="${CARGO_FUZZ_ROOT}/bin:${PATH}"

cd "${REPO}/fuzz"
cargo +nightly fuzz build "${FLAGS[@]}" >&2
for target in $(cargo +nightly fuzz list); do
  mkdir -p "${WORK}/${target}"
  log "${target}: ${SECONDS_EACH}s"
  if ! cargo +nightly fuzz run "${FLAGS[@]}" "${target}" "${WORK}/${target}" "corpus/${target}" \
      -- -max_total_time="${SECONDS_EACH}" -print_final_stats=1 ${SEED:+-seed="${SEED}"} >"${WORK}/${target}.log" 2>&1; then
    tail -n 40 "${WORK}/${target}.log" >&2
    log "${target} FAILED; the input is under ${REPO}/fuzz/artifacts/${target}/ (log: ${WORK}/${target}.log)"
    exit 1
  fi
  runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "${WORK}/${target}.log" | tail -n 1)"
  log "${target}: ${runs:-?} inputs, 0 panics"
done
