"""Deployment assets: Kubernetes manifests (deploy/), the Vagrant lab (vagrant/), the container
image files and the shell scripts.

Every kustomize overlay is rendered with `kubectl kustomize` and checked with
`kubernetes-validate --strict`, then the properties the agent and controller rely on are
asserted on the rendered objects. kubectl, vagrant, kubernetes-validate and shellcheck are
required: a missing one skips on a developer machine but FAILS under CI=true
(scripts/setup.sh installs them)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.ci import unavailable

REPO_ROOT = Path(__file__).resolve().parents[1]
DEPLOY = REPO_ROOT / "deploy"
VAGRANT = REPO_ROOT / "vagrant"
# overlays/ha (several replicas on PostgreSQL, no PVC, no placeholder Secrets) has its own
# contract: tests/test_deploy_ha.py, which also runs this file's generic checks on it
OVERLAYS = sorted(
    p.parent.name
    for p in (DEPLOY / "overlays").glob("*/kustomization.yaml")
    if p.parent.name != "ha"
)
NAMESPACE = "nfctl-system"
# The oldest Kubernetes the manifests target (securityContext.appArmorProfile is 1.30+).
MIN_KUBERNETES = "1.30.0"

AGENT_CAPS = {"BPF", "NET_ADMIN", "SYS_ADMIN", "PERFMON"}
CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding"}
METRICS_PROXY = "metrics-proxy"  # kube-rbac-proxy: its own image
# The CLI contract of `nfctl agent` / `nfctl controller` (see deploy/README.md).
AGENT_FLAGS = {
    "--repo", "--ref", "--path", "--node", "--labels", "--labels-file", "--interval",
    "--state-dir", "--bpffs-dir", "--https-token-file", "--ssh-key-file",
    "--verify-signatures", "--trusted-keys", "--drift", "--metrics-addr", "--controller",
    "--tls-ca", "--tls-cert", "--tls-key", "--insecure", "--config", "--once",
    "--health-addr", "--liveness-stall", "--kube-node-labels", "--kube-api",
    "--kube-token-file", "--kube-ca-file",
}  # fmt: skip
CONTROLLER_FLAGS = {
    "--listen", "--db", "--tls-ca", "--tls-cert", "--tls-key", "--insecure",
    "--operator-token-file", "--webhook-addr", "--webhook-secret-file", "--metrics-addr",
    "--stale-after", "--health-listen", "--enroll-listen", "--tls-ca-key", "--enroll-token-file",
    "--enroll-cert-hours",
}  # fmt: skip
SHELL_SCRIPTS = sorted(
    {
        *REPO_ROOT.glob("scripts/*.sh"),
        *DEPLOY.glob("**/*.sh"),
        *VAGRANT.glob("**/*.sh"),
    }
    - set(VAGRANT.glob(".vagrant/**/*.sh"))
)


def require_tool(path: str | None, name: str) -> str:
    """The tool's path; skip without it, but fail under CI=true, where it must exist."""
    if path:
        return path
    unavailable(f"{name} is not installed (sudo make setup installs it)")


def run(
    cmd: list[str], cwd: Path = REPO_ROOT, timeout: float = 120, env: dict[str, str] | None = None
) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    return proc.stdout


def kubectl() -> str:
    return require_tool(shutil.which("kubectl"), "kubectl")


def kubernetes_validate() -> list[str]:
    beside = Path(sys.executable).parent / "kubernetes-validate"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("kubernetes-validate")
    if found:
        return [found]
    try:
        import kubernetes_validate  # noqa: F401
    except ImportError:
        require_tool(None, "kubernetes-validate (pip install -e '.[dev]')")
    return [sys.executable, "-m", "kubernetes_validate"]


# ----------------------------------------------------------------------------- rendering


class Rendered:
    def __init__(self, name: str, text: str) -> None:
        self.name = name
        self.text = text
        self.docs: list[dict[str, Any]] = [d for d in yaml.safe_load_all(text) if d]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        matches = [d for d in self.of_kind(kind) if d["metadata"]["name"] == name]
        assert len(matches) == 1, f"{self.name}: expected one {kind}/{name}, got {len(matches)}"
        return matches[0]

    @property
    def agent(self) -> dict[str, Any]:
        return self.get("DaemonSet", "nfctl-agent")

    @property
    def controller(self) -> dict[str, Any]:
        return self.get("Deployment", "nfctl-controller")


_RENDERS: dict[str, Rendered] = {}


def render(target: str) -> Rendered:
    if target not in _RENDERS:
        text = run([kubectl(), "kustomize", str(DEPLOY / target)])
        _RENDERS[target] = Rendered(target, text)
    return _RENDERS[target]


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> Rendered:
    return render(f"overlays/{request.param}")


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def container(workload: dict[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    key = "initContainers" if init else "containers"
    found = [c for c in pod_spec(workload).get(key, []) if c["name"] == name]
    assert len(found) == 1, f"no {key[:-1]} {name!r}"
    return found[0]


def volume(workload: dict[str, Any], name: str) -> dict[str, Any]:
    found = [v for v in pod_spec(workload)["volumes"] if v["name"] == name]
    assert len(found) == 1, f"no volume {name!r}"
    return found[0]


def mount(ctr: dict[str, Any], path: str) -> dict[str, Any]:
    found = [m for m in ctr.get("volumeMounts", []) if m["mountPath"] == path]
    assert len(found) == 1, f"{ctr['name']}: no mount at {path}"
    return found[0]


def flags(args: list[str]) -> dict[str, str]:
    out = {}
    for arg in args:
        if arg.startswith("--"):
            key, _, value = arg.partition("=")
            out[key] = value
    return out


# ----------------------------------------------------------------------------- kustomize


def test_overlays_exist() -> None:
    assert {"lab", "production"} <= set(OVERLAYS), OVERLAYS


@pytest.mark.parametrize(
    "target", ["base", "placeholder-secrets"] + [f"overlays/{o}" for o in OVERLAYS]
)
def test_renders_and_validates_strict(target: str, tmp_path: Path) -> None:
    rendered = render(target)
    assert rendered.docs, f"{target} rendered nothing"
    out = tmp_path / "rendered.yaml"
    out.write_text(rendered.text)
    validate = kubernetes_validate()
    for version in (None, MIN_KUBERNETES):
        version_args = ["-k", version] if version else []
        run([*validate, "--strict", "--quiet", *version_args, str(out)])


def test_common_labels_and_namespace(overlay: Rendered) -> None:
    for doc in overlay.docs:
        meta = doc["metadata"]
        where = f"{overlay.name}: {doc['kind']}/{meta['name']}"
        assert meta.get("labels", {}).get("app.kubernetes.io/part-of") == "nfctl", where
        if doc["kind"] == "Namespace":
            assert meta["name"] == NAMESPACE
        elif doc["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in meta, where
        else:
            assert meta.get("namespace") == NAMESPACE, where


def test_agent_daemonset_host_access(overlay: Rendered) -> None:
    ds = overlay.agent
    spec = pod_spec(ds)
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec.get("tolerations"), "the agent must tolerate tainted nodes"
    assert spec["serviceAccountName"] == "nfctl-agent"
    overlay.get("ServiceAccount", "nfctl-agent")

    bpffs = volume(ds, "bpffs")["hostPath"]
    assert bpffs["path"] == "/sys/fs/bpf"
    # Bidirectional propagation (only a privileged container may ask for it) is confined to
    # the init container that mounts bpffs on the host.
    init = container(ds, "mount-bpffs", init=True)
    assert mount(init, "/sys/fs/bpf")["mountPropagation"] == "Bidirectional"
    assert init["securityContext"]["privileged"] is True

    agent = container(ds, "agent")
    assert mount(agent, "/sys/fs/bpf")["mountPropagation"] == "HostToContainer"
    for path in ("/lib/modules", "/usr/src"):
        assert mount(agent, path).get("readOnly") is True, path
        vol = next(v for v in spec["volumes"] if v["name"] == mount(agent, path)["name"])
        assert vol["hostPath"]["path"] == path
    state = mount(agent, "/var/lib/nfctl")
    assert volume(ds, state["name"])["hostPath"]["path"] == "/var/lib/nfctl"


def test_agent_least_privilege(overlay: Rendered) -> None:
    agent = container(overlay.agent, "agent")
    sc = agent["securityContext"]
    assert sc["privileged"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == AGENT_CAPS
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    # Only the one-shot init container is privileged.
    spec = pod_spec(overlay.agent)
    privileged = [
        c["name"]
        for c in spec.get("initContainers", []) + spec["containers"]
        if c.get("securityContext", {}).get("privileged")
    ]
    assert privileged == ["mount-bpffs"]


def test_agent_node_name_args_and_probes(overlay: Rendered) -> None:
    agent = container(overlay.agent, "agent")
    env = {e["name"]: e for e in agent["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    args = agent["args"]
    assert args[0] == "agent"
    got = flags(args)
    assert set(got) <= AGENT_FLAGS, f"flags outside the CLI contract: {set(got) - AGENT_FLAGS}"
    assert got["--node"] == "$(NODE_NAME)"
    assert got["--bpffs-dir"] == "/sys/fs/bpf/nfctl"
    assert got["--state-dir"] == "/var/lib/nfctl"
    assert "--insecure" not in got
    # its own identity, made on the node by the `enroll` init container, not from a Secret
    identity = "/var/lib/nfctl/identity"
    assert (got["--tls-cert"], got["--tls-key"]) == (f"{identity}/node.crt", f"{identity}/node.key")
    # Every $(VAR) must be defined in the container's env, or Kubernetes passes it verbatim.
    for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", " ".join(args)):
        assert var in env, f"args use $({var}) but env does not define it"
    # ...and every ConfigMap key it reads exists in the rendered ConfigMap.
    for entry in agent["env"]:
        ref = entry.get("valueFrom", {}).get("configMapKeyRef")
        if ref:
            assert ref["key"] in overlay.get("ConfigMap", ref["name"])["data"], ref

    # metrics and probes on 127.0.0.1 (see tests/test_k8s_deploy.py)
    assert got["--metrics-addr"].startswith("127.0.0.1:")
    probes = {kind: agent[kind]["httpGet"] for kind in ("livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    for probe in probes.values():
        assert got["--health-addr"] == f"{probe['host']}:{probe['port']}"


def test_agent_identity_is_made_on_the_node(overlay: Rendered) -> None:
    """Each agent enrols its own key (hostPath, never a Secret); only the enrolment
    containers see the bootstrap token; the controller holds the CA key to sign."""
    ds = overlay.agent
    spec = pod_spec(ds)
    names = [c["name"] for c in spec["initContainers"]]
    assert names.index("enroll") > names.index("mount-bpffs")
    for ctr in (container(ds, "enroll", init=True), container(ds, "enroll-renew")):
        script = " ".join(ctr["args"])
        assert "nfctl certs enroll" in script and '--node "$NODE_NAME"' in script
        assert "--dir /var/lib/nfctl/identity" in script
        state = mount(ctr, "/var/lib/nfctl")
        assert volume(ds, state["name"])["hostPath"]["path"] == "/var/lib/nfctl"
        mount(ctr, "/etc/nfctl/bootstrap")
        assert ctr["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert "--keep" in " ".join(container(ds, "enroll-renew")["args"])
    # an agent that has an identity starts while the controller is down
    init_script = " ".join(container(ds, "enroll", init=True)["args"])
    assert init_script.rstrip().endswith("|| test -s /var/lib/nfctl/identity/node.crt")
    agent = container(ds, "agent")
    assert all(m["mountPath"] != "/etc/nfctl/bootstrap" for m in agent["volumeMounts"])
    assert volume(ds, "tls")["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    secrets = {s["metadata"]["name"]: s for s in overlay.of_kind("Secret")}
    if "nfctl-agent-tls" in secrets:  # lab placeholders: the shape real ones must have
        assert set(secrets["nfctl-agent-tls"]["stringData"]) == {"ca.crt", "bootstrap-token"}
    got = flags(container(overlay.controller, "controller")["args"])
    assert got["--tls-ca-key"].startswith("/etc/nfctl/tls/")
    assert got["--enroll-token-file"].startswith("/etc/nfctl/auth/")


def test_every_container_has_requests_and_limits(overlay: Rendered) -> None:
    for workload in overlay.of_kind("DaemonSet") + overlay.of_kind("Deployment"):
        spec = pod_spec(workload)
        for ctr in spec.get("initContainers", []) + spec["containers"]:
            res = ctr.get("resources", {})
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(part, {})), (ctr["name"], part)


def test_controller_deployment_service_pvc(overlay: Rendered) -> None:
    dep = overlay.controller
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"]["type"] == "Recreate"  # SQLite on a ReadWriteOnce volume
    ctr = container(dep, "controller")
    assert ctr["args"][0] == "controller"
    got = flags(ctr["args"])
    assert set(got) <= CONTROLLER_FLAGS, f"outside the CLI contract: {set(got) - CONTROLLER_FLAGS}"
    assert "--insecure" not in got
    db_dir = str(Path(got["--db"]).parent)
    claim = volume(dep, mount(ctr, db_dir)["name"])["persistentVolumeClaim"]["claimName"]
    pvc = overlay.get("PersistentVolumeClaim", claim)
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert ctr["livenessProbe"] and ctr["readinessProbe"]
    assert ctr["securityContext"]["privileged"] is False
    assert ctr["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod_spec(dep)["securityContext"]["runAsNonRoot"] is True

    svc = overlay.get("Service", "nfctl-controller")
    ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
    assert ports == {"grpc": 9443, "enroll": 9445, "webhook": 9080, "metrics": 9102}
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    for flag, port in (
        ("--listen", 9443),
        ("--enroll-listen", 9445),
        ("--webhook-addr", 9080),
        ("--metrics-addr", 9102),
    ):
        assert got[flag].endswith(f":{port}"), flag


def test_network_policy_selects_controller(overlay: Rendered) -> None:
    pod_labels = overlay.controller["spec"]["template"]["metadata"]["labels"]
    selecting = [
        p
        for p in overlay.of_kind("NetworkPolicy")
        if p["spec"]["podSelector"].get("matchLabels", {}).items() <= pod_labels.items()
    ]
    allowed = {
        port["port"]
        for p in selecting
        for rule in p["spec"].get("ingress", [])
        for port in rule.get("ports", [])
    }
    assert {9443, 9445, 9080, 9102} <= allowed


def test_secrets(overlay: Rendered) -> None:
    """Lab renders placeholder Secrets (clearly marked); production never ships them, so
    applying it cannot overwrite real keys."""
    referenced = set()
    for workload in (overlay.agent, overlay.controller):
        for vol in pod_spec(workload)["volumes"]:
            if "secret" in vol:
                referenced.add(vol["secret"]["secretName"])
    assert {"nfctl-agent-tls", "nfctl-controller-tls", "nfctl-git-credentials"} <= referenced
    secrets = {s["metadata"]["name"]: s for s in overlay.of_kind("Secret")}
    if overlay.name.endswith("production"):
        assert not secrets
        return
    assert referenced <= set(secrets)
    for secret in secrets.values():
        assert secret["metadata"]["annotations"]["nfctl.io/placeholder"].startswith("true")
        for value in secret["stringData"].values():
            assert "REPLACE-ME" in value


def test_overlays_differ_where_intended() -> None:
    lab, prod = render("overlays/lab"), render("overlays/production")
    lab_img = container(lab.agent, "agent")["image"]
    prod_img = container(prod.agent, "agent")["image"]
    assert lab_img == "localhost/nfctl:dev"
    assert prod_img != lab_img
    assert "--https-token-file" in flags(container(prod.agent, "agent")["args"])
    # The same image everywhere in an overlay.
    for rendered in (lab, prod):
        images = {
            c["image"]
            for w in (rendered.agent, rendered.controller)
            for c in pod_spec(w).get("initContainers", []) + pod_spec(w)["containers"]
            if c["name"] != METRICS_PROXY
        }
        assert len(images) == 1, images


# ----------------------------------------------------------------------------- vagrant


def test_vagrant_validate() -> None:
    vagrant_bin = require_tool(shutil.which("vagrant"), "vagrant")
    env = {**os.environ, "VAGRANT_CHECKPOINT_DISABLE": "1"}  # no version check over the network
    # No provider can run here: validate the configuration, ignoring provider blocks...
    cmd = [vagrant_bin, "validate", "--ignore-provider"]
    out = run(cmd, cwd=VAGRANT, timeout=180, env=env)
    assert "validated successfully" in out
    # ...and, where the vagrant-libvirt plugin is installed, the libvirt block too.
    proc = subprocess.run(
        [vagrant_bin, "validate"],
        cwd=VAGRANT,
        env={**env, "VAGRANT_DEFAULT_PROVIDER": "libvirt"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    if "could not be found" not in proc.stdout + proc.stderr:
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_vagrant_lab_files() -> None:
    vagrantfile = (VAGRANT / "Vagrantfile").read_text()
    for needle in ("debian/bookworm64", ":libvirt", ":virtualbox", "private_network"):
        assert needle in vagrantfile, needle
    for machine in ("controller", "worker1", "worker2"):
        assert f'"{machine}"' in vagrantfile, machine
    agent_unit = (VAGRANT / "systemd" / "nfctl-agent.service").read_text()
    controller_unit = (VAGRANT / "systemd" / "nfctl-controller.service").read_text()
    for unit, contract in ((agent_unit, AGENT_FLAGS), (controller_unit, CONTROLLER_FLAGS)):
        for section in ("[Unit]", "[Service]", "[Install]"):
            assert section in unit
        used = set(re.findall(r"(--[a-z][a-z-]+)", unit))
        assert used <= contract, used - contract
        assert "--tls-cert" in used and "--insecure" not in used


# ----------------------------------------------------------------------------- scripts, image


def test_shell_scripts_parse() -> None:
    assert len(SHELL_SCRIPTS) >= 6, SHELL_SCRIPTS
    for script in SHELL_SCRIPTS:
        run(["bash", "-n", str(script)])


def test_shell_scripts_shellcheck() -> None:
    shellcheck = require_tool(shutil.which("shellcheck"), "shellcheck")
    run([shellcheck, "-x", *map(str, SHELL_SCRIPTS)])


def test_dockerfile() -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=debian:bookworm", dockerfile, re.M)
    assert "python3-bpfcc" in dockerfile and "iproute2" in dockerfile
    assert "venv --system-site-packages" in dockerfile
    assert re.search(r'^ENTRYPOINT \["nfctl"\]', dockerfile, re.M)
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv"} <= set(ignored)


def test_container_smoke_skips_without_engine(tmp_path: Path) -> None:
    """With no engine on PATH the smoke test explains itself and exits 0."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "mktemp", "rm", "dirname", "cat", "tail", "tr", "env"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    proc = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "container-smoke.sh")],
        env={"PATH": str(bin_dir), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "skipped: no container engine" in proc.stdout
