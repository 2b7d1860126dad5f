#!/usr/bin/env bash
# Create the Secrets that deploy/ references, with real keys instead of the placeholders:
#   nfctl-controller-tls   ca.crt, ca.key, controller.crt, controller.key (the controller
#                          signs the nodes' enrolled certificates with ca.key)
#   nfctl-agent-tls        ca.crt, bootstrap-token: NO private key. Each agent makes its
#                          own key on its node and enrols (deploy/README.md, "Trust model")
#   nfctl-controller-auth  operator-token, webhook-secret, bootstrap-token
#   nfctl-git-credentials  token and/or ssh-privatekey (only with --git-token/--git-ssh-key)
#
# Usage: deploy/gen-secrets.sh [--namespace NS] [--dir DIR] [--force-dir-in-repo]
#                              [--git-token FILE] [--git-ssh-key FILE] [--apply]
# Without --apply the Secret manifests are printed (feed them to your secret manager);
# with --apply they are applied and the workloads restarted to pick them up.
# Keys stay in DIR (default $XDG_STATE_HOME/nfctl/NS, i.e. ~/.local/state/nfctl/NS): keep
# operator.crt/.key there for `nfctl get ... --tls-cert`; the CA is reused if DIR has one.
# DIR may not be inside this repository (keys there end up in commits and image layers)
# unless --force-dir-in-repo.
set -euo pipefail

NS=nfctl-system
DIR=""
FORCE_IN_REPO=0
GIT_TOKEN=""
GIT_SSH_KEY=""
APPLY=0
die() { echo "gen-secrets: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --namespace) NS=$2; shift 2 ;;
    --dir) DIR=$2; shift 2 ;;
    --force-dir-in-repo) FORCE_IN_REPO=1; shift ;;
    --git-token) GIT_TOKEN=$2; shift 2 ;;
    --git-ssh-key) GIT_SSH_KEY=$2; shift 2 ;;
    --apply) APPLY=1; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

command -v kubectl >/dev/null || die "kubectl is required"
REPO=$(cd "$(dirname "$0")/.." && pwd -P)
NFCTL=${NFCTL:-$(command -v nfctl || echo "$REPO/.venv/bin/nfctl")}
[ -x "$NFCTL" ] || die "nfctl not found (make setup, or set NFCTL=/path/to/nfctl)"

if [ -z "$DIR" ]; then
  STATE=${XDG_STATE_HOME:-${HOME:?HOME is not set}/.local/state}
  DIR="$STATE/nfctl/$NS"
fi
DIR=$(realpath -m "$DIR")  # symlinks resolved, nothing created yet
case "$DIR/" in
  "$REPO/"*)
    if [ "$FORCE_IN_REPO" -ne 1 ]; then
      die "$DIR is inside the repository $REPO: keys there end up in commits and image layers; choose a --dir outside it (or --force-dir-in-repo)"
    fi
    echo "gen-secrets: warning: writing keys inside the repository ($DIR)" >&2 ;;
esac
mkdir -p "$DIR"
chmod 700 "$DIR"

SVC=nfctl-controller
NAMES="$SVC,$SVC.$NS,$SVC.$NS.svc,$SVC.$NS.svc.cluster.local,localhost,127.0.0.1"
"$NFCTL" certs init --dir "$DIR" --controller-names "$NAMES" >&2
for f in operator-token webhook-secret bootstrap-token; do
  [ -s "$DIR/$f" ] || (umask 077; openssl rand -hex 32 >"$DIR/$f")
done

secret() {  # name, then --from-file=... arguments
  local name=$1
  shift
  kubectl create secret generic "$name" --namespace "$NS" "$@" --dry-run=client -o yaml
  echo "---"
}

manifests=$(
  secret nfctl-controller-tls --from-file="ca.crt=$DIR/ca.crt" --from-file="ca.key=$DIR/ca.key" \
    --from-file="controller.crt=$DIR/controller.crt" --from-file="controller.key=$DIR/controller.key"
  secret nfctl-agent-tls --from-file="ca.crt=$DIR/ca.crt" \
    --from-file="bootstrap-token=$DIR/bootstrap-token"
  secret nfctl-controller-auth --from-file="operator-token=$DIR/operator-token" \
    --from-file="webhook-secret=$DIR/webhook-secret" \
    --from-file="bootstrap-token=$DIR/bootstrap-token"
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
echo "gen-secrets: keys are in $DIR (outside the repository)" >&2
