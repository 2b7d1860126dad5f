#!/usr/bin/env bash
# Database VM (NFCTL_LAB_HA=1): Debian's PostgreSQL, reachable from the lab network only,
# with a role and database `nfctl` for the controller replicas (password scram-sha-256,
# derived from the lab's secret by the Vagrantfile). Idempotent.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

: "${NFCTL_DB_IP:?}" "${NFCTL_DB_PASSWORD:?}" "${NFCTL_CONTROLLER_IP:?}" "${NFCTL_CONTROLLER2_IP:?}"

apt-get update -qq
apt-get install -y -qq --no-install-recommends postgresql >/dev/null
CONF_DIR=$(find /etc/postgresql -mindepth 2 -maxdepth 2 -type d -name main | sort -V | tail -n 1)
[ -n "$CONF_DIR" ] || { echo "provision: no PostgreSQL cluster under /etc/postgresql" >&2; exit 1; }

# Listen on the lab address too; only the two controllers may log in, as nfctl, to nfctl.
cat >"$CONF_DIR/conf.d/nfctl-lab.conf" <<CONF
listen_addresses = 'localhost,$NFCTL_DB_IP'
password_encryption = scram-sha-256
max_connections = 100
CONF
HBA=$CONF_DIR/pg_hba.conf
sed -i '/# nfctl-lab$/d' "$HBA"
for ip in "$NFCTL_CONTROLLER_IP" "$NFCTL_CONTROLLER2_IP"; do
  echo "host nfctl nfctl $ip/32 scram-sha-256 # nfctl-lab" >>"$HBA"
done
systemctl restart postgresql

psql_admin() { runuser -u postgres -- psql -v ON_ERROR_STOP=1 -qtA "$@"; }
for _ in $(seq 30); do psql_admin -c 'SELECT 1' >/dev/null 2>&1 && break; sleep 1; done
# The password goes from the environment through psql's quoting (:'pw'), never into argv.
if [ "$(psql_admin -c "SELECT 1 FROM pg_roles WHERE rolname = 'nfctl'")" != 1 ]; then
  psql_admin -c 'CREATE ROLE nfctl LOGIN'
fi
NFCTL_DB_PASSWORD=$NFCTL_DB_PASSWORD psql_admin <<'SQL'
\getenv pw NFCTL_DB_PASSWORD
ALTER ROLE nfctl PASSWORD :'pw';
SQL
if [ "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = 'nfctl'")" != 1 ]; then
  psql_admin -c 'CREATE DATABASE nfctl OWNER nfctl'
fi
echo "provision: PostgreSQL ready on $NFCTL_DB_IP:5432 (database nfctl; the controllers" \
     "apply the schema themselves at start)"
