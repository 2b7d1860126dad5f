#!/usr/bin/env bash
# Create the Secrets that deploy/ references, with real keys instead of the placeholders:
#   nfctl-controller-tls   ca.crt, controller.crt, controller.key
#   nfctl-agent-tls        ca.crt, <node>.crt, <node>.key for every node
#   nfctl-controller-auth  operator-token, webhook-secret
#   nfctl-git-credentials  token and/or ssh-privatekey (only with --git-token/--git-ssh-key)
#
# Usage: deploy/gen-secrets.sh [--namespace NS] [--dir DIR] [--nodes n1,n2,...]
#                              [--git-token FILE] [--git-ssh-key FILE] [--apply]
# Without --apply the Secret manifests are printed (feed them to your secret manager);
# with --apply they are applied and the workloads restarted to pick them up.
# Nodes default to `kubectl get nodes`. Keys stay in DIR (default ./nfctl-certs): keep
# operator.crt/.key there for `nfctl get ... --tls-cert`, and re-run with --nodes when
# nodes join (the CA is reused if DIR already has one).
set -euo pipefail

NS=nfctl-system
DIR=./nfctl-certs
NODES=""
GIT_TOKEN=""
GIT_SSH_KEY=""
APPLY=0
die() { echo "gen-secrets: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --namespace) NS=$2; shift 2 ;;
    --dir) DIR=$2; shift 2 ;;
    --nodes) NODES=$2; shift 2 ;;
    --git-token) GIT_TOKEN=$2; shift 2 ;;
    --git-ssh-key) GIT_SSH_KEY=$2; shift 2 ;;
    --apply) APPLY=1; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

command -v kubectl >/dev/null || die "kubectl is required"
NFCTL=${NFCTL:-$(command -v nfctl || echo "$(dirname "$0")/../.venv/bin/nfctl")}
[ -x "$NFCTL" ] || die "nfctl not found (make setup, or set NFCTL=/path/to/nfctl)"

if [ -z "$NODES" ]; then
  NODES=$(kubectl get nodes -o jsonpath='{.items[*].metadata.name}' | tr ' ' ',')
  [ -n "$NODES" ] || die "no nodes found: pass --nodes"
fi

SVC=nfctl-controller
NAMES="$SVC,$SVC.$NS,$SVC.$NS.svc,$SVC.$NS.svc.cluster.local,localhost,127.0.0.1"
mkdir -p "$DIR"
chmod 700 "$DIR"
"$NFCTL" certs init --dir "$DIR" --controller-names "$NAMES" --nodes "$NODES" >&2
for f in operator-token webhook-secret; do
  [ -s "$DIR/$f" ] || (umask 077; openssl rand -hex 32 >"$DIR/$f")
done

secret() {  # name, then --from-file=... arguments
  local name=$1
  shift
  kubectl create secret generic "$name" --namespace "$NS" "$@" --dry-run=client -o yaml
  echo "---"
}

agent_files=(--from-file="ca.crt=$DIR/ca.crt")
IFS=',' read -r -a node_list <<<"$NODES"
for node in "${node_list[@]}"; do
  [ -f "$DIR/$node.crt" ] || die "nfctl certs init made no $DIR/$node.crt"
  agent_files+=(--from-file="$node.crt=$DIR/$node.crt" --from-file="$node.key=$DIR/$node.key")
done

manifests=$(
  secret nfctl-controller-tls --from-file="ca.crt=$DIR/ca.crt" \
    --from-file="controller.crt=$DIR/controller.crt" --from-file="controller.key=$DIR/controller.key"
  secret nfctl-agent-tls "${agent_files[@]}"
  secret nfctl-controller-auth --from-file="operator-token=$DIR/operator-token" \
    --from-file="webhook-secret=$DIR/webhook-secret"
  git_files=()
  [ -n "$GIT_TOKEN" ] && git_files+=(--from-file="token=$GIT_TOKEN")
  [ -n "$GIT_SSH_KEY" ] && git_files+=(--from-file="ssh-privatekey=$GIT_SSH_KEY")
  if [ ${#git_files[@]} -gt 0 ]; then secret nfctl-git-credentials "${git_files[@]}"; fi
)

if [ "$APPLY" -eq 1 ]; then
  printf '%s\n' "$manifests" | kubectl apply -f -
  kubectl -n "$NS" rollout restart daemonset/nfctl-agent deployment/nfctl-controller
  echo "gen-secrets: applied; operator credentials: $DIR/operator.crt, $DIR/operator.key," \
       "$DIR/operator-token; webhook secret: $DIR/webhook-secret" >&2
else
  printf '%s\n' "$manifests"
fi
