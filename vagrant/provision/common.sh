#!/usr/bin/env bash
# Every lab VM: install nfctl from the synced copy of the project with `make setup`
# (BCC, kernel headers, iproute2, .venv), and name the lab hosts.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

: "${NFCTL_CONTROLLER_IP:?}" "${NFCTL_WORKERS:?}" "${NFCTL_WORKER_IPS:?}"

apt-get update -qq
apt-get install -y -qq --no-install-recommends make rsync curl openssl ca-certificates >/dev/null
# Headers of the running kernel when the archive still has them; otherwise setup.sh links
# the nearest Debian headers (nfctl.kernel_headers --link).
apt-get install -y -qq --no-install-recommends "linux-headers-$(uname -r)" >/dev/null 2>&1 \
  || echo "provision: linux-headers-$(uname -r) not in the archive; setup.sh will link the nearest"

cd /opt/nfctl
make setup
ln -sf /opt/nfctl/.venv/bin/nfctl /usr/local/bin/nfctl
install -d -m 0755 /etc/nfctl /var/lib/nfctl

# Lab host names on every VM.
sed -i '/# nfctl-lab$/d' /etc/hosts
echo "$NFCTL_CONTROLLER_IP controller # nfctl-lab" >>/etc/hosts
IFS=',' read -r -a names <<<"$NFCTL_WORKERS"
IFS=',' read -r -a ips <<<"$NFCTL_WORKER_IPS"
for i in "${!names[@]}"; do
  echo "${ips[$i]} ${names[$i]} # nfctl-lab" >>/etc/hosts
done
if [ "${NFCTL_LAB_HA:-0}" = 1 ]; then
  echo "$NFCTL_CONTROLLER2_IP controller2 # nfctl-lab" >>/etc/hosts
  echo "$NFCTL_DB_IP db # nfctl-lab" >>/etc/hosts
fi
nfctl version
