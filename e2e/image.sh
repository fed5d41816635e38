#!/usr/bin/env bash
# Build the operator's OCI image without a container engine (`make image`):
#
#   1. the `sluice` binary, statically linked (glibc with crt-static: no libc in the image);
#   2. a root file system: /sluice, CA certificates, /etc/passwd and /etc/group with the
#      non-root user 65532 (nonroot);
#   3. one layer from it, with GNU tar (sorted, owned by root, fixed mtime: reproducible);
#   4. crane (github.com/google/go-containerregistry, built by e2e/tools/build.sh) puts the
#      layer on an empty OCI base in a registry it serves on loopback for the build's length,
#      sets user, entrypoint, platform, OCI labels and annotations, and writes:
#        target/image/oci/                    an OCI image layout
#        target/image/sluice-<tag>.tar        a `docker load` tarball, tagged sluice:<tag>
#        target/image/sluice-<tag>.cdx.json   a CycloneDX SBOM (cargo-cyclonedx, crates.io)
#        target/image/digest                  the manifest digest
#
# Settings (environment): SLUICE_IMAGE_PROFILE (release; `dev` for a quick debug image, as
# `make test` uses), SLUICE_IMAGE_TAG (the crate version), SLUICE_IMAGE_OUT (target/image),
# SLUICE_IMAGE_SOURCE (the git remote, for org.opencontainers.image.source).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${ROOT}"
PROFILE="${SLUICE_IMAGE_PROFILE:-release}"
VERSION="$(awk -F'"' '/^version = /{print $2; exit}' Cargo.toml)"
TAG="${SLUICE_IMAGE_TAG:-${VERSION}}"
OUT="${SLUICE_IMAGE_OUT:-${ROOT}/target/image}"
TOOLS_DIR="${SLUICE_TOOLS_DIR:-${HOME}/.cache/sluice/tools}"
BUILD_LOCK="${SLUICE_BUILD_LOCK:-/tmp/sluice-build.lock}"
CYCLONEDX_VERSION=0.5.9
CYCLONEDX_ROOT="${TOOLS_DIR}/cargo-cyclonedx-${CYCLONEDX_VERSION}"
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt

log() { echo "image.sh: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ -f "${CA_BUNDLE}" ]] || die "no CA bundle at ${CA_BUNDLE} (Debian: apt-get install ca-certificates)"
CRANE="$(e2e/tools/build.sh | tail -1)/crane"
[[ -x "${CRANE}" ]] || die "crane was not built (e2e/tools/build.sh)"

# 1. The static binary. Only the final link takes crt-static; the dependencies are the ones
# the ordinary build already compiled.
log "building sluice (${PROFILE}, static)"
flock "${BUILD_LOCK}" cargo rustc --locked --quiet --profile "${PROFILE}" --bin sluice -- \
  -C target-feature=+crt-static
case "${PROFILE}" in dev) target_dir=debug ;; *) target_dir="${PROFILE}" ;; esac
BIN="${ROOT}/target/${target_dir}/sluice"
if readelf -lW "${BIN}" | grep -q 'Requesting program interpreter'; then
  die "${BIN} is dynamically linked"
fi

# 2. The root file system.
WORK="$(mktemp -d)"
REGISTRY_PID=""
cleanup() {
  [[ -n "${REGISTRY_PID}" ]] && kill "${REGISTRY_PID}" 2>/dev/null || true
  rm -rf "${WORK}"
}
trap cleanup EXIT
FS="${WORK}/rootfs"
mkdir -p "${FS}/etc/ssl/certs" "${FS}/tmp"
chmod 1777 "${FS}/tmp"
# Without debug symbols: they are for the build machine, not the cluster.
objcopy --strip-debug "${BIN}" "${FS}/sluice"
chmod 0755 "${FS}/sluice"
cp "${CA_BUNDLE}" "${FS}/etc/ssl/certs/ca-certificates.crt"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' > "${FS}/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' > "${FS}/etc/group"

# 3. The layer, reproducible: the commit's time, sorted names, numeric root ownership.
EPOCH="$(git log -1 --format=%ct 2>/dev/null || echo 0)"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@${EPOCH}" --format=posix \
  --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
  -C "${FS}" -cf "${WORK}/layer.tar" .

# 4. The image, through a registry crane serves on loopback for the length of the build.
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"${CRANE}" registry serve --address "127.0.0.1:${PORT}" >"${WORK}/registry.log" 2>&1 &
REGISTRY_PID=$!
for _ in $(seq 50); do
  "${CRANE}" catalog "127.0.0.1:${PORT}" --insecure >/dev/null 2>&1 && break
  sleep 0.1
done
REF="127.0.0.1:${PORT}/sluice:${TAG}"
REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
SOURCE="${SLUICE_IMAGE_SOURCE:-$(git config --get remote.origin.url 2>/dev/null || echo "https://github.com/sluice-dev/sluice")}"
CREATED="$(date -u -d "@${EPOCH}" +%Y-%m-%dT%H:%M:%SZ)"
export SOURCE_DATE_EPOCH="${EPOCH}"
"${CRANE}" append --insecure --oci-empty-base -f "${WORK}/layer.tar" -t "${REF}" >/dev/null
oci=()
for kv in "source=${SOURCE}" "revision=${REVISION}" "version=${TAG}" "licenses=Apache-2.0" \
  "title=sluice" "created=${CREATED}" \
  "description=Progressive delivery operator for Kubernetes"; do
  oci+=(-l "org.opencontainers.image.${kv}" -a "org.opencontainers.image.${kv}")
done
"${CRANE}" mutate --insecure "${REF}" -t "${REF}" --set-platform linux/amd64 \
  --entrypoint /sluice --user 65532:65532 --workdir / "${oci[@]}" >/dev/null

rm -rf "${OUT}"
mkdir -p "${OUT}"
"${CRANE}" pull --insecure --format oci "${REF}" "${OUT}/oci"
"${CRANE}" digest --insecure "${REF}" > "${OUT}/digest"
# The docker-load tarball names the image sluice:<tag>, not the loopback registry.
"${CRANE}" copy --insecure "${REF}" "127.0.0.1:${PORT}/sluice:${TAG}" >/dev/null 2>&1 || true
( cd "${WORK}" && "${CRANE}" pull --insecure "${REF}" image.tar )
python3 - "${WORK}/image.tar" "${OUT}/sluice-${TAG}.tar" "sluice:${TAG}" <<'PY'
# Rewrite RepoTags in the tarball's manifest.json: a tar in, a tar out (Python's tarfile).
import io, json, sys, tarfile
src, dst, tag = sys.argv[1:]
with tarfile.open(src) as tin, tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as tout:
    for member in tin.getmembers():
        data = tin.extractfile(member).read() if member.isfile() else None
        if member.name == "manifest.json":
            manifest = json.loads(data)
            for image in manifest:
                image["RepoTags"] = [tag]
            data = json.dumps(manifest).encode()
            member.size = len(data)
        tout.addfile(member, io.BytesIO(data) if data is not None else None)
PY

# The SBOM: every crate compiled into the binary.
if [[ ! -x "${CYCLONEDX_ROOT}/bin/cargo-cyclonedx" ]]; then
  log "installing cargo-cyclonedx ${CYCLONEDX_VERSION} into ${CYCLONEDX_ROOT} (once)"
  flock "${BUILD_LOCK}" cargo install cargo-cyclonedx --version "${CYCLONEDX_VERSION}" --locked \
    --root "${CYCLONEDX_ROOT}" --quiet
fi
PATH="${CYCLONEDX_ROOT}/bin:${PATH}" cargo cyclonedx --manifest-path "${ROOT}/Cargo.toml" \
  --format json --spec-version 1.5 --no-build-deps --override-filename sbom -qq
mv -f "${ROOT}/sbom.json" "${OUT}/sluice-${TAG}.cdx.json"
find "${ROOT}/e2e/simulator" -maxdepth 1 -name 'sbom.json' -delete

python3 - "${OUT}" "${TAG}" "${FS}/sluice" <<'PY'
import json, os, sys
out, tag, binary = sys.argv[1:]
sbom = json.load(open(f"{out}/sluice-{tag}.cdx.json"))
def count(components):
    return sum(1 + count(c.get("components", [])) for c in components)
mib = lambda n: f"{n / 1048576:.1f} MiB"
print(f"image.sh: sluice:{tag} {open(f'{out}/digest').read().strip()}")
print(f"image.sh:   image tarball {mib(os.path.getsize(f'{out}/sluice-{tag}.tar'))}, "
      f"binary {mib(os.path.getsize(binary))}, SBOM {count(sbom.get('components', []))} components")
print(f"image.sh:   {out}/oci  {out}/sluice-{tag}.tar  {out}/sluice-{tag}.cdx.json")
PY
