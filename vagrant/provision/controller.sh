#!/usr/bin/env bash
# Controller VM: lab CA and certificates (nfctl certs init), the NF Git repository seeded
# from bpf/ and served over smart HTTP, and the nfctl controller as a systemd service.
# Idempotent: re-provisioning keeps the CA, the keys and the repository's history.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

: "${NFCTL_LAB_SECRET:?}" "${NFCTL_CONTROLLER_IP:?}" "${NFCTL_WORKERS:?}"
SRC=/opt/nfctl
LAB=$SRC/vagrant
TLS=/etc/nfctl/tls
NFCTL=$SRC/.venv/bin/nfctl
PY=$SRC/.venv/bin/python

apt-get install -y -qq --no-install-recommends git lighttpd >/dev/null
systemctl disable --now lighttpd >/dev/null 2>&1 || true   # our own instance serves the lab

# ---- certificates: CA, controller (by name and IP), one client cert per worker, operator
# With NFCTL_LAB_HA=1 the one controller certificate also names controller2, which runs
# with the same certificate, tokens and secrets (published encrypted below).
CONTROLLER_NAMES="controller,$NFCTL_CONTROLLER_IP,localhost,127.0.0.1"
if [ "${NFCTL_LAB_HA:-0}" = 1 ]; then
  CONTROLLER_NAMES="$CONTROLLER_NAMES,controller2,${NFCTL_CONTROLLER2_IP:?}"
fi
install -d -m 0700 "$TLS"
if [ ! -s "$TLS/ca.crt" ]; then
  "$NFCTL" certs init --dir "$TLS" --controller-names "$CONTROLLER_NAMES" \
    --nodes "$NFCTL_WORKERS"
fi
for f in operator-token webhook-secret; do
  [ -s "/etc/nfctl/$f" ] || (umask 077; openssl rand -hex 32 >"/etc/nfctl/$f")
done

# ---- each worker's CA + key pair, published encrypted with the lab's shared secret
install -d -m 0755 /srv/lab-www/lab-certs
IFS=',' read -r -a workers <<<"$NFCTL_WORKERS"
for node in "${workers[@]}"; do
  tar -C "$TLS" -c ca.crt "$node.crt" "$node.key" \
    | openssl enc -aes-256-cbc -pbkdf2 -salt -pass env:NFCTL_LAB_SECRET \
        -out "/srv/lab-www/lab-certs/$node.tar.enc"
done
if [ "${NFCTL_LAB_HA:-0}" = 1 ]; then
  tar -C /etc/nfctl -c tls/ca.crt tls/controller.crt tls/controller.key tls/operator.crt \
      tls/operator.key operator-token webhook-secret \
    | openssl enc -aes-256-cbc -pbkdf2 -salt -pass env:NFCTL_LAB_SECRET \
        -out /srv/lab-www/lab-certs/controller2.tar.enc
fi
chmod 0644 /srv/lab-www/lab-certs/*.tar.enc

# ---- the NF repository: bare repo served read-only, work clone for lab commits
IFACE=${NFCTL_LAB_IFACE:-$(ip -o -4 addr show | awk -v ip="$NFCTL_CONTROLLER_IP" \
  '{split($4, a, "/"); if (a[1] == ip) print $2}')}
[ -n "$IFACE" ] || { echo "provision: no interface holds $NFCTL_CONTROLLER_IP" >&2; exit 1; }
"$PY" "$LAB/lab/labctl.py" seed --src "$SRC/bpf" --iface "$IFACE"
install -m 0755 "$LAB/lab/post-receive" /srv/git/nf-repo.git/hooks/post-receive

# ---- the database: the SQLite file, or (NFCTL_LAB_HA=1) PostgreSQL on the db VM
# shared with controller2; the unit reads NFCTL_DB from this file.
"$LAB/provision/controller-db.sh"

# ---- services
install -d -m 0755 /etc/nfctl/lab
install -m 0644 "$LAB/lab/lighttpd.conf" /etc/nfctl/lab/lighttpd.conf
install -m 0644 "$LAB/systemd/nfctl-git-http.service" "$LAB/systemd/nfctl-controller.service" \
  /etc/systemd/system/
systemctl daemon-reload
systemctl enable nfctl-git-http nfctl-controller
systemctl restart nfctl-git-http nfctl-controller

for _ in $(seq 60); do
  curl -fsS "http://127.0.0.1:9080/healthz" >/dev/null 2>&1 && break
  sleep 1
done
curl -fsS "http://127.0.0.1:9080/healthz" >/dev/null \
  || { journalctl -u nfctl-controller -n 50 --no-pager; exit 1; }
git ls-remote "http://$NFCTL_CONTROLLER_IP/git/nf-repo.git" main \
  || { journalctl -u nfctl-git-http -n 50 --no-pager; exit 1; }
echo "provision: controller ready (gRPC :9443, webhook :9080, metrics :9102," \
     "repo http://$NFCTL_CONTROLLER_IP/git/nf-repo.git, NFs on $IFACE)"
