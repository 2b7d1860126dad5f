#!/usr/bin/env bash
# One-shot, idempotent machine setup for nfctl (Debian/Ubuntu, as root).
# Installs system packages, makes kernel headers visible to BCC, mounts bpffs
# and builds .venv with access to Debian's python3-bpfcc.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)

die() { echo "setup: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (sudo make setup): BCC, netns and bpffs need it"
command -v apt-get >/dev/null || die "this setup supports Debian/Ubuntu (apt-get) only; install BCC (python3-bpfcc), kernel headers and iproute2 by hand, then run: python3 -m venv --system-site-packages .venv && .venv/bin/pip install -e '.[dev]'"

case "$(uname -m)" in
  x86_64) DEB_ARCH=amd64 ;;
  aarch64) DEB_ARCH=arm64 ;;
  *) DEB_ARCH=$(dpkg --print-architecture) ;;
esac

PACKAGES=(python3-bpfcc bpfcc-tools libbpf1 "linux-headers-$DEB_ARCH" iproute2 iputils-ping iperf3
          bpftool tcpdump python3-venv python3-dev git gnupg openssl make ca-certificates
          kmod procps postgresql)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# ---- deployment and benchmark tooling (tests/test_deploy.py, test_controller_scale_smoke) -
# vagrant for `vagrant validate`; shellcheck for the shell scripts (tests fail without it
# under CI=true); prometheus for promtool and tests/test_monitoring.py. kubectl with kustomize
# v5 comes from PyPI into .venv (Debian 12's kubernetes-client is too old for kustomize
# `labels`). NFCTL_SKIP_DEPLOY_TOOLS=1 skips this (the
# Vagrant lab's VMs set it: they run agents, not deployment checks).
if [ "${NFCTL_SKIP_DEPLOY_TOOLS:-0}" != 1 ]; then
  deploy_tools=()
  command -v vagrant >/dev/null || deploy_tools+=(vagrant)
  # promtool + prometheus for tests/test_monitoring.py (deploy/monitoring rules and config)
  command -v promtool >/dev/null || deploy_tools+=(prometheus)
  command -v shellcheck >/dev/null || deploy_tools+=(shellcheck)
  # Go and its gRPC/protobuf sources: the Go simulated agents of controller_scale
  # (--generator go, benchmarks/simagent; tests/test_controller_scale_smoke.py)
  for p in golang-go golang-google-grpc-dev golang-google-protobuf-dev; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || deploy_tools+=("$p")
  done
  if [ ${#deploy_tools[@]} -gt 0 ]; then
    echo "setup: installing ${deploy_tools[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${deploy_tools[@]}" >/dev/null \
      || echo "setup: warning: could not install ${deploy_tools[*]}; the tests need them" >&2
  fi
fi
# ---- end of deployment tooling -----------------------------------------------------------

# BCC compiles against /lib/modules/$(uname -r)/build. Kernels built outside
# Debian (cloud/VM kernels) ship no headers there: link the nearest Debian ones.
PYTHONPATH="$ROOT" /usr/bin/python3 -m nfctl.kernel_headers --link || die "no usable kernel headers (see above)"

# bpffs: where nfctl pins programs and maps so they outlive the agent.
if ! mount | grep -q " /sys/fs/bpf type bpf"; then
  mount -t bpf bpf /sys/fs/bpf || die "cannot mount bpffs at /sys/fs/bpf"
fi

PY=/usr/bin/python3
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import bcc" 2>/dev/null; then
  rm -rf .venv
  "$PY" -m venv --system-site-packages .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[dev]'
.venv/bin/python -c "import bcc, pyroute2, git, grpc" || die "python dependencies did not import"
echo "setup: ok (.venv ready, kernel headers at /lib/modules/$(uname -r)/build)"
