#!/usr/bin/env bash
# Second controller replica (NFCTL_LAB_HA=1): the controller VM's certificate, operator
# token and webhook secret (published encrypted with the lab's shared secret), the shared
# PostgreSQL, and the same nfctl-controller.service. The Git server stays on `controller`.
set -euo pipefail

: "${NFCTL_LAB_SECRET:?}" "${NFCTL_CONTROLLER_IP:?}"
LAB=/opt/nfctl/vagrant

# The controller VM may still be provisioning: wait for its bundle.
install -d -m 0700 /etc/nfctl/tls
url="http://$NFCTL_CONTROLLER_IP/lab-certs/controller2.tar.enc"
for i in $(seq 120); do
  if curl -fsS -o /tmp/nfctl-controller2.enc "$url" 2>/dev/null; then break; fi
  [ "$i" -eq 120 ] && { echo "provision: no controller bundle at $url after 10 min" >&2; exit 1; }
  sleep 5
done
(umask 077
 openssl enc -d -aes-256-cbc -pbkdf2 -pass env:NFCTL_LAB_SECRET -in /tmp/nfctl-controller2.enc \
   | tar -C /etc/nfctl -x --no-same-owner)
rm -f /tmp/nfctl-controller2.enc
chmod 0600 /etc/nfctl/tls/*.key /etc/nfctl/operator-token /etc/nfctl/webhook-secret

"$LAB/provision/controller-db.sh"

install -m 0644 "$LAB/systemd/nfctl-controller.service" /etc/systemd/system/
systemctl daemon-reload
systemctl enable nfctl-controller
systemctl restart nfctl-controller
for _ in $(seq 60); do
  curl -fsS "http://127.0.0.1:9080/healthz" >/dev/null 2>&1 && break
  sleep 1
done
curl -fsS "http://127.0.0.1:9080/healthz" >/dev/null \
  || { journalctl -u nfctl-controller -n 50 --no-pager; exit 1; }
echo "provision: controller2 ready (gRPC :9443, same fleet view as controller)"
