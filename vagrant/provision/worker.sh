#!/usr/bin/env bash
# Worker VM: fetch this node's TLS key pair from the controller (encrypted with the lab's
# shared secret) and run the nfctl agent as a systemd service.
set -euo pipefail

: "${NFCTL_LAB_SECRET:?}" "${NFCTL_CONTROLLER_IP:?}" "${NFCTL_NODE:?}"
LAB=/opt/nfctl/vagrant
TLS=/etc/nfctl/tls

# The controller may still be provisioning (libvirt brings VMs up in parallel): wait.
install -d -m 0700 "$TLS"
url="http://$NFCTL_CONTROLLER_IP/lab-certs/$NFCTL_NODE.tar.enc"
for i in $(seq 120); do
  if curl -fsS -o /tmp/nfctl-certs.enc "$url" 2>/dev/null; then break; fi
  [ "$i" -eq 120 ] && { echo "provision: no certificates at $url after 10 min" >&2; exit 1; }
  sleep 5
done
openssl enc -d -aes-256-cbc -pbkdf2 -pass env:NFCTL_LAB_SECRET -in /tmp/nfctl-certs.enc \
  | tar -C "$TLS" -x --no-same-owner
rm -f /tmp/nfctl-certs.enc
chmod 0600 "$TLS"/*.key

cat >/etc/nfctl/agent.env <<ENV
NODE_NAME=$NFCTL_NODE
NFCTL_REPO=http://$NFCTL_CONTROLLER_IP/git/nf-repo.git
NFCTL_REF=main
NFCTL_PATH=nfs
NFCTL_LABELS=role=edge,lab=vagrant
NFCTL_INTERVAL=5
NFCTL_CONTROLLER=${NFCTL_CONTROLLERS:-$NFCTL_CONTROLLER_IP:9443}
ENV

install -m 0644 "$LAB/systemd/nfctl-agent.service" /etc/systemd/system/
systemctl daemon-reload
systemctl enable nfctl-agent
systemctl restart nfctl-agent

for _ in $(seq 120); do
  curl -fsS http://127.0.0.1:9101/readyz >/dev/null 2>&1 && break
  sleep 1
done
if ! curl -fsS http://127.0.0.1:9101/readyz >/dev/null; then
  journalctl -u nfctl-agent -n 80 --no-pager
  echo "provision: agent on $NFCTL_NODE is not ready" >&2
  exit 1
fi
nfctl status || true
echo "provision: agent on $NFCTL_NODE ready"
