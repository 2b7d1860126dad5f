#!/usr/bin/env bash
# End-to-end check of the Vagrant lab, run on the host from vagrant/ after `vagrant up`:
#   1. every worker runs main's commit (from the controller: nfctl get functions -o json)
#   2. worker2 -> worker1 ping passes (baseline)
#   3. commit "block worker2's address" to the NF repository on the controller
#   4. wait until every worker reports the new revision
#   5. worker2 -> worker1 is dropped by worker1's XDP blocklist; other traffic passes
#      (controller <-> workers, worker2 -> controller)
#   6. git revert, wait for the revert on every worker, worker2 -> worker1 passes again
# With NFCTL_LAB_HA=1 (two controller replicas on PostgreSQL), step 4 also waits for the
# revision in controller2's fleet view: either replica shows every worker.
# The block is reverted on failure and on Ctrl-C too. Exit 0 only if every step passed.
set -euo pipefail
cd "$(dirname "$0")"

NET=${NFCTL_LAB_NET:-192.168.56}
CONTROLLER_IP=$NET.10
WORKER1_IP=$NET.11
WORKER2_IP=$NET.12
NODES=worker1,worker2
TIMEOUT=${NFCTL_LAB_TIMEOUT:-180}
LABCTL="sudo /opt/nfctl/.venv/bin/python /opt/nfctl/vagrant/lab/labctl.py"
VMS="controller worker1 worker2"
[ "${NFCTL_LAB_HA:-0}" = 1 ] && VMS="db controller controller2 worker1 worker2"

RESULTS=()
BLOCK_SHA=""
REVERTED=0
FAILED=0

on() {  # on VM COMMAND...: run a command in a lab VM, its exit code is ours
  local vm=$1
  shift
  vagrant ssh "$vm" -c "$*" -- -q -o LogLevel=ERROR </dev/null
}

record() {  # record STEP ok|FAIL DETAIL
  RESULTS+=("$(printf '%-48s %-4s %s' "$1" "$2" "$3")")
  echo "lab-check: [$2] $1 $3"
  [ "$2" = ok ] || FAILED=1
}

ping_ok() {  # ping_ok FROM_VM TO_IP: 0 if at least one reply
  on "$1" "ping -c 5 -i 0.3 -W 1 -q $2" >/dev/null 2>&1
}

wait_revision() {  # wait_revision SHA
  on controller "$LABCTL wait-revision --sha $1 --nodes $NODES --timeout $TIMEOUT"
}

summary() {
  local rc=$?
  if [ -n "$BLOCK_SHA" ] && [ "$REVERTED" -eq 0 ]; then
    echo "lab-check: reverting the blocklist commit before exiting"
    on controller "$LABCTL revert $BLOCK_SHA" >/dev/null || echo "lab-check: revert failed: run '$LABCTL revert $BLOCK_SHA' on the controller"
  fi
  echo
  echo "==================== nfctl Vagrant lab ===================="
  printf '%s\n' "${RESULTS[@]}"
  echo "==========================================================="
  if [ "$rc" -ne 0 ] || [ "$FAILED" -ne 0 ]; then
    echo "lab-check: FAILED"
    exit 1
  fi
  echo "lab-check: all checks passed"
}
trap summary EXIT

command -v vagrant >/dev/null || { echo "lab-check: vagrant is not installed" >&2; exit 1; }
for vm in $VMS; do
  vagrant status "$vm" --machine-readable | grep -q ",state,running" \
    || { echo "lab-check: VM $vm is not running: vagrant up" >&2; exit 1; }
done

# 1. initial deploy
HEAD=$(on controller "$LABCTL head" | tr -d '\r' | tail -n 1)
if wait_revision "$HEAD"; then
  record "initial deploy on $NODES" ok "${HEAD:0:12}"
else
  record "initial deploy on $NODES" FAIL "${HEAD:0:12} not reported by every worker"
  exit 1
fi

# 2. baseline
if ping_ok worker2 "$WORKER1_IP"; then
  record "baseline: worker2 -> worker1" ok "replies"
else
  record "baseline: worker2 -> worker1" FAIL "no reply before any block"
  exit 1
fi

# 3-4. block worker2 by a commit
BLOCK_SHA=$(on controller "$LABCTL block $WORKER2_IP" | tr -d '\r' | tail -n 1)
record "commit: blocklist += $WORKER2_IP" ok "${BLOCK_SHA:0:12}"
start=$(date +%s)
if wait_revision "$BLOCK_SHA"; then
  record "block commit applied on $NODES" ok "$(( $(date +%s) - start ))s"
else
  record "block commit applied on $NODES" FAIL "not within ${TIMEOUT}s"
  exit 1
fi
if [ "${NFCTL_LAB_HA:-0}" = 1 ]; then
  if on controller2 "$LABCTL wait-revision --sha $BLOCK_SHA --nodes $NODES --timeout $TIMEOUT"; then
    record "controller2 shows it on $NODES (one fleet)" ok ""
  else
    record "controller2 shows it on $NODES (one fleet)" FAIL "not within ${TIMEOUT}s"
  fi
fi

# 5. enforcement: the blocked source is dropped, other traffic passes
if ping_ok worker2 "$WORKER1_IP"; then
  record "worker2 -> worker1 dropped (blocked source)" FAIL "replies still arrive"
else
  record "worker2 -> worker1 dropped (blocked source)" ok "no reply"
fi
for pair in "controller $WORKER1_IP" "worker1 $CONTROLLER_IP" "controller $WORKER2_IP" \
            "worker2 $CONTROLLER_IP"; do
  read -r from to <<<"$pair"
  if ping_ok "$from" "$to"; then
    record "$from -> $to passes" ok "replies"
  else
    record "$from -> $to passes" FAIL "no reply"
  fi
done

# 6. revert
REVERTED=1   # set before the attempt: never revert twice (that would block again)
REVERT_SHA=$(on controller "$LABCTL revert $BLOCK_SHA" | tr -d '\r' | tail -n 1)
record "git revert of the block" ok "${REVERT_SHA:0:12}"
if wait_revision "$REVERT_SHA"; then
  record "revert applied on $NODES" ok ""
else
  record "revert applied on $NODES" FAIL "not within ${TIMEOUT}s"
  exit 1
fi
if ping_ok worker2 "$WORKER1_IP"; then
  record "worker2 -> worker1 passes again" ok "replies"
else
  record "worker2 -> worker1 passes again" FAIL "still dropped after the revert"
fi
