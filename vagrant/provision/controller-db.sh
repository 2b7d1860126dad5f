#!/usr/bin/env bash
# Both controller VMs: which database nfctl-controller.service uses (/etc/nfctl/controller.env,
# NFCTL_DB). Without NFCTL_LAB_HA the embedded SQLite file; with it the PostgreSQL URL of
# the db VM, whose port is awaited here (libvirt provisions the VMs in parallel; the
# controller would otherwise exit until the database is up).
set -euo pipefail

install -d -m 0755 /etc/nfctl
if [ "${NFCTL_LAB_HA:-0}" != 1 ]; then
  (umask 077; echo "NFCTL_DB=/var/lib/nfctl/controller.db" >/etc/nfctl/controller.env)
  exit 0
fi
: "${NFCTL_DB_URL:?}" "${NFCTL_DB_IP:?}" "${NFCTL_DB_PASSWORD:?}"
# libpq takes the password from PGPASSWORD: in the unit's environment (readable by root
# only), never in the --db URL on the command line
(umask 077; printf 'NFCTL_DB=%s\nPGPASSWORD=%s\n' "$NFCTL_DB_URL" "$NFCTL_DB_PASSWORD" \
  >/etc/nfctl/controller.env)
for i in $(seq 120); do
  (exec 3<>"/dev/tcp/$NFCTL_DB_IP/5432") 2>/dev/null && break
  [ "$i" -eq 120 ] && { echo "provision: PostgreSQL on $NFCTL_DB_IP:5432 not up after 10 min" >&2; exit 1; }
  sleep 5
done
echo "provision: controller uses PostgreSQL on $NFCTL_DB_IP (shared by the replicas)"
