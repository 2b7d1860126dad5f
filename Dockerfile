# nfctl image: the node agent (DaemonSet), the controller (Deployment) and the CLI.
#
#   docker build -t nfctl:dev .       (scripts/container-smoke.sh: build + nfctl doctor)
#   docker run --rm nfctl:dev version
#
# Two stages: `build` makes the virtualenv from requirements.lock (exact versions and
# hashes of the tested venv) and the fallback kernel headers; the final stage holds only
# runtime packages, the venv and the headers. No compiler or pip cache ships.
#
# BCC compiles against the *node's* kernel headers, mounted from the host (/lib/modules,
# /usr/src). Nodes without headers (many managed node images) use the fallback tree in
# /opt/nfctl/kernel-headers (Debian 12's, merged; BCC is pointed at it with
# BCC_KERNEL_SOURCE): `nfctl doctor` and the agent's status say when it is in use.
#
# BASE_IMAGE must be Debian 12 (bookworm): python3-bpfcc is Debian's BCC build for its
# own Python 3.11, reached from the venv through --system-site-packages. It is pinned to
# an exact dated tag (no registry was reachable to resolve a digest where this was written:
# pin `debian:bookworm-20241202-slim@sha256:...` when you build with one). Where no
# registry is reachable, scripts/container-smoke.sh builds this base with debootstrap.
#
# requirements.lock: pip-compile --generate-hashes --strip-extras --constraint <pip freeze
# of the tested venv> pyproject.toml (see deploy/README.md, "Image").
ARG BASE_IMAGE=debian:bookworm-20241202-slim
# Debian 12 has exactly this BCC; an upgrade must be a deliberate, tested change.
ARG BCC_VERSION=0.26.0+ds-1

# ------------------------------------------------------------------------------ build
FROM ${BASE_IMAGE} AS build
ARG BCC_VERSION
ARG DEBIAN_FRONTEND=noninteractive
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1

RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 python3-venv python3-bpfcc="${BCC_VERSION}" ca-certificates \
      "linux-headers-$(dpkg --print-architecture)" \
 && rm -rf /var/lib/apt/lists/*

COPY requirements.lock /src/requirements.lock
COPY pyproject.toml README.md /src/
COPY nfctl /src/nfctl

# The optional build secret "extra-ca" (a PEM bundle) lets pip work behind a TLS-intercepting
# proxy; it is used for this step only and never stored in the image (Docker: BuildKit):
#   docker build --secret id=extra-ca,src=/usr/local/share/ca-certificates/proxy.crt .
RUN --mount=type=secret,id=extra-ca \
    set -eu; \
    if [ -s /run/secrets/extra-ca ]; then \
      cat /etc/ssl/certs/ca-certificates.crt /run/secrets/extra-ca > /tmp/pip-ca.pem; \
      export PIP_CERT=/tmp/pip-ca.pem; \
    fi; \
    python3 -m venv --system-site-packages /opt/nfctl/venv; \
    /opt/nfctl/venv/bin/pip install --no-cache-dir --require-hashes -r /src/requirements.lock; \
    /opt/nfctl/venv/bin/pip install --no-cache-dir --no-deps /src; \
    rm -f /tmp/pip-ca.pem

# Fallback headers: the newest installed Debian header set, merged into one tree for this
# architecture only (nfctl.kernel_headers is stdlib-only).
RUN PYTHONPATH=/src python3 -m nfctl.kernel_headers --make-fallback /opt/nfctl/kernel-headers

# ------------------------------------------------------------------------------ runtime
FROM ${BASE_IMAGE}
ARG BCC_VERSION
ARG DEBIAN_FRONTEND=noninteractive
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NFCTL_FALLBACK_HEADERS=/opt/nfctl/kernel-headers \
    PATH=/opt/nfctl/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# Runtime packages only: BCC (with its LLVM/clang), netlink tooling, Git transports
# (https via ca-certificates, ssh via openssh-client), gpg for signature checks, and
# mount/unshare (util-linux) for bpffs and the compile sandbox.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 python3-bpfcc="${BCC_VERSION}" \
      iproute2 git openssh-client gnupg ca-certificates mount util-linux \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb \
 && groupadd --system --gid 65532 nfctl \
 && useradd --system --uid 65532 --gid 65532 --home-dir /var/lib/nfctl --no-create-home nfctl \
 && mkdir -p /var/lib/nfctl && chown 65532:65532 /var/lib/nfctl

COPY --from=build /opt/nfctl/venv /opt/nfctl/venv
COPY --from=build /opt/nfctl/kernel-headers /opt/nfctl/kernel-headers
COPY bpf /opt/nfctl/bpf

RUN /opt/nfctl/venv/bin/python -c "import bcc, nfctl; print('bcc', bcc.__file__)" \
 && nfctl version

LABEL org.opencontainers.image.title="nfctl" \
      org.opencontainers.image.description="GitOps controller for eBPF network functions (agent, controller, CLI)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/debian:bookworm-20241202-slim"

# Non-root by default (the controller, the CLI). The agent and the uninstall Job run as
# uid 0 with a few capabilities, set by their pod specs (runAsUser: 0).
USER 65532:65532
WORKDIR /var/lib/nfctl
ENTRYPOINT ["nfctl"]
CMD ["--help"]
