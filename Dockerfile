# nfctl image: the node agent (DaemonSet), the controller (Deployment) and the CLI.
#
#   docker build -t nfctl:dev .       (scripts/container-smoke.sh: build + nfctl doctor)
#   docker run --rm nfctl:dev version
#
# BCC compiles against the *node's* kernel headers: they are not in the image. At run time
# mount the host's /lib/modules and /usr/src read-only (deploy/ does), plus /sys/fs/bpf.
#
# BASE_IMAGE must be Debian 12 (bookworm): python3-bpfcc is Debian's BCC build for its
# own Python 3.11, reached from the venv through --system-site-packages. Where no image
# registry is reachable, scripts/container-smoke.sh builds this base with debootstrap.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

ARG DEBIAN_FRONTEND=noninteractive
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/nfctl/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# Runtime packages only: BCC (with its LLVM/clang), netlink tooling, Git transports
# (https via ca-certificates, ssh via openssh-client) and gpg for signature checks.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 python3-venv python3-bpfcc \
      iproute2 git openssh-client gnupg ca-certificates mount \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb

COPY . /opt/nfctl/src

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
    /opt/nfctl/venv/bin/pip install --no-cache-dir /opt/nfctl/src; \
    mkdir -p /opt/nfctl/bpf /var/lib/nfctl; \
    cp -r /opt/nfctl/src/bpf/. /opt/nfctl/bpf/; \
    rm -rf /tmp/pip-ca.pem /opt/nfctl/src; \
    /opt/nfctl/venv/bin/python -c "import bcc, nfctl; print('bcc', bcc.__file__)"; \
    nfctl version

LABEL org.opencontainers.image.title="nfctl" \
      org.opencontainers.image.description="GitOps controller for eBPF network functions (agent, controller, CLI)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="debian:bookworm"

# The agent needs root inside the container (its capabilities are set by the pod spec).
USER 0
WORKDIR /var/lib/nfctl
ENTRYPOINT ["nfctl"]
CMD ["--help"]
