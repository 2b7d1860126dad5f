"""Kubernetes-native deployment (issue 16), asserted on the rendered manifests: the agent
reads its own Node (RBAC), probes that mean something on local-only ports, metrics behind
an authenticating proxy, a preflight init container, selectors that no overlay changes,
resources sized from BENCHMARKS.md, the uninstall Job, and the image's build files.

No Kubernetes API server can run on this machine: the rendered objects are validated
against the API's schemas (kubernetes-validate --strict) and checked here; the agent's API
client is tested against a real HTTPS server in tests/test_k8s_node.py."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_deploy import (
    DEPLOY,
    NAMESPACE,
    OVERLAYS,
    REPO_ROOT,
    Rendered,
    container,
    flags,
    kubernetes_validate,
    pod_spec,
    render,
    run,
    volume,
)

TARGETS = ["base", *(f"overlays/{o}" for o in OVERLAYS)]
PROXY = "metrics-proxy"


@pytest.fixture(params=TARGETS)
def target(request: pytest.FixtureRequest) -> Rendered:
    return render(str(request.param))


def quantity(text: str | int) -> float:
    """A Kubernetes quantity in bytes (memory) or cores (cpu)."""
    value = str(text)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}
    for suffix, factor in units.items():
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * factor
    return float(value)


def bound_rules(rendered: Rendered, sa: str) -> list[dict[str, Any]]:
    """Every RBAC rule granted to ServiceAccount sa in our namespace."""
    rules: list[dict[str, Any]] = []
    for kind, role_kind in (("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")):
        for binding in rendered.of_kind(kind):
            subjects = binding.get("subjects", [])
            if not any(
                s["kind"] == "ServiceAccount" and s["name"] == sa and s["namespace"] == NAMESPACE
                for s in subjects
            ):
                continue
            ref = binding["roleRef"]
            assert ref["kind"] == role_kind, binding
            rules += rendered.get(role_kind, ref["name"])["rules"]
    return rules


def allows(rules: list[dict[str, Any]], group: str, resource: str, verb: str) -> bool:
    return any(
        group in r.get("apiGroups", [])
        and resource in r.get("resources", [])
        and verb in r["verbs"]
        for r in rules
    )


# ------------------------------------------------------------------ 1. the agent's Node


def test_agent_may_get_and_watch_nodes_and_nothing_more(target: Rendered) -> None:
    rules = bound_rules(target, "nfctl-agent")
    assert allows(rules, "", "nodes", "get") and allows(rules, "", "nodes", "watch")
    for verb in ("list", "update", "patch", "delete", "create"):
        assert not allows(rules, "", "nodes", verb), verb
    assert not any("secrets" in r.get("resources", []) for r in rules)
    assert not any("*" in r["verbs"] or "*" in r.get("resources", []) for r in rules)
    # the token the agent needs is mounted (the SA itself does not automount)
    assert pod_spec(target.agent)["automountServiceAccountToken"] is True
    assert bound_rules(target, "nfctl-controller") == []


def test_agent_labels_come_from_its_node(target: Rendered) -> None:
    agent = container(target.agent, "agent")
    got = flags(agent["args"])
    assert "--kube-node-labels" in got
    config = next(c for c in target.of_kind("ConfigMap") if "NFCTL_LABELS" in c["data"])
    # no literal label set shared by every node: extra labels only, empty by default
    assert config["data"]["NFCTL_LABELS"] == ""


# ------------------------------------------------------------------ 2. probes and metrics


def test_agent_probes_are_local_and_mean_something(target: Rendered) -> None:
    agent = container(target.agent, "agent")
    got = flags(agent["args"])
    host, _, port = got["--health-addr"].rpartition(":")
    assert host == "127.0.0.1"
    for kind, path in (
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ):
        probe = agent[kind]["httpGet"]
        assert (probe["host"], str(probe["port"]), probe["path"]) == (host, port, path), kind
    # a pass may legitimately take the Git timeout plus a compile worker's (60 + 300 s):
    # only a loop stuck longer than that is restarted
    from nfctl.agent.config import AgentConfig
    from nfctl.compiler.client import WORKER_TIMEOUT_SECONDS

    stall = float(got.get("--liveness-stall") or AgentConfig.model_fields["liveness_stall"].default)
    assert stall >= WORKER_TIMEOUT_SECONDS + AgentConfig.model_fields["timeout"].default


def test_agent_metrics_only_through_authenticating_proxy(target: Rendered) -> None:
    spec = pod_spec(target.agent)
    agent = container(target.agent, "agent")
    metrics_addr = flags(agent["args"])["--metrics-addr"]
    assert metrics_addr.startswith("127.0.0.1:")
    assert not agent.get("ports"), "the agent itself listens on no node address"
    proxy = container(target.agent, PROXY)
    assert "kube-rbac-proxy" in proxy["image"]
    pflags = flags(proxy["args"])
    assert pflags["--upstream"] == f"http://{metrics_addr}/"
    listen_port = int(pflags["--secure-listen-address"].rpartition(":")[2])
    assert {p["containerPort"] for p in proxy["ports"]} == {listen_port}
    annotations = target.agent["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(listen_port)
    assert annotations["prometheus.io/scheme"] == "https"
    assert proxy["securityContext"]["runAsNonRoot"] is True
    rules = bound_rules(target, "nfctl-agent")  # the proxy reviews scrapers' tokens
    assert allows(rules, "authentication.k8s.io", "tokenreviews", "create")
    assert allows(rules, "authorization.k8s.io", "subjectaccessreviews", "create")
    reader = target.get("ClusterRole", "nfctl-metrics-reader")
    assert reader["rules"] == [{"nonResourceURLs": ["/metrics"], "verbs": ["get"]}]
    assert spec["hostNetwork"] is True  # why a NetworkPolicy could not do this job


def test_controller_health_port_priority_and_non_root(target: Rendered) -> None:
    dep = target.controller
    spec = pod_spec(dep)
    ctr = container(dep, "controller")
    got = flags(ctr["args"])
    health_port = int(got["--health-listen"].rpartition(":")[2])
    public = {int(got[f].rpartition(":")[2]) for f in ("--listen", "--webhook-addr")}
    assert health_port not in public
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert ctr[kind]["grpc"]["port"] == health_port, kind
        assert "httpGet" not in ctr[kind] and "tcpSocket" not in ctr[kind]
    assert spec["priorityClassName"] == "system-cluster-critical"
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert ctr["securityContext"]["allowPrivilegeEscalation"] is False
    # metrics: restricted by NetworkPolicy (the controller has its own network namespace)
    policies = [
        p
        for p in target.of_kind("NetworkPolicy")
        if p["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name")
        == "nfctl-controller"
    ]
    metrics_port = int(got["--metrics-addr"].rpartition(":")[2])
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            if any(p["port"] == metrics_port for p in rule.get("ports", [])):
                assert rule.get("from"), "metrics must not be open to every source"
            assert all(p["port"] != health_port for p in rule.get("ports", []))


# ------------------------------------------------------------------ 3. preflight


def test_preflight_init_container(target: Rendered) -> None:
    spec = pod_spec(target.agent)
    names = [c["name"] for c in spec["initContainers"]]
    assert names.index("mount-bpffs") < names.index("preflight")
    pre = container(target.agent, "preflight", init=True)
    agent = container(target.agent, "agent")
    assert pre["image"] == agent["image"]
    assert pre["args"][:2] == ["doctor", "--preflight"]
    env = {
        e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in pre["env"] if "valueFrom" in e
    }
    assert env == {
        "NODE_NAME": "spec.nodeName",
        "POD_NAME": "metadata.name",
        "POD_NAMESPACE": "metadata.namespace",
        "POD_UID": "metadata.uid",
    }
    # it checks with exactly the agent's privileges and host mounts
    assert pre["securityContext"]["capabilities"] == agent["securityContext"]["capabilities"]
    assert not pre["securityContext"].get("privileged")
    agent_mounts = {m["mountPath"] for m in agent["volumeMounts"]}
    assert {"/sys/fs/bpf", "/lib/modules", "/usr/src"} <= agent_mounts
    assert {"/sys/fs/bpf", "/lib/modules", "/usr/src"} <= {
        m["mountPath"] for m in pre["volumeMounts"]
    }
    rules = bound_rules(target, "nfctl-agent")
    assert allows(rules, "", "events", "create")
    # a node without /usr/src still starts: the image carries fallback headers
    assert volume(target.agent, "usr-src")["hostPath"]["type"] == "DirectoryOrCreate"


# ------------------------------------------------------------------ 5. kustomize labels


def test_no_kustomization_uses_common_labels() -> None:
    for path in DEPLOY.glob("**/kustomization.yaml"):
        data = yaml.safe_load(path.read_text())
        assert "commonLabels" not in data, path
        for entry in data.get("labels", []):
            assert entry.get("includeSelectors") is False, path


def _selectors(rendered: Rendered) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in ("DaemonSet", "Deployment"):
        for obj in rendered.of_kind(kind):
            out[f"{kind}/{obj['metadata']['name']}"] = obj["spec"]["selector"]
    for svc in rendered.of_kind("Service"):
        out[f"Service/{svc['metadata']['name']}"] = svc["spec"]["selector"]
    for pol in rendered.of_kind("NetworkPolicy"):
        out[f"NetworkPolicy/{pol['metadata']['name']}"] = pol["spec"]["podSelector"]
    return out


def test_selectors_identical_across_overlays() -> None:
    """Selectors are immutable: switching overlays (or upgrading) must not change them."""
    base = _selectors(render("base"))
    assert base
    for overlay in OVERLAYS:
        rendered = render(f"overlays/{overlay}")
        assert _selectors(rendered) == base, overlay
        env = f"nfctl.io/environment={overlay}"
        for workload in (rendered.agent, rendered.controller):
            for labels in (
                workload["metadata"]["labels"],
                workload["spec"]["template"]["metadata"]["labels"],
            ):
                assert labels.get("nfctl.io/environment") == overlay, env
                assert labels.get("app.kubernetes.io/part-of") == "nfctl"
            assert workload["spec"]["selector"]["matchLabels"].keys() == {"app.kubernetes.io/name"}


# ------------------------------------------------------------------ 5. resources


def _memory(ctr: dict[str, Any], part: str) -> float:
    return quantity(ctr["resources"][part]["memory"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_resources_sized_from_benchmarks(overlay: str) -> None:
    rendered = render(f"overlays/{overlay}")
    agent = container(rendered.agent, "agent")
    steady, peak = 145e6, 220e6  # BENCHMARKS.md: agent + warm worker; during a compile
    assert steady <= _memory(agent, "requests") <= 1.5 * steady
    assert _memory(agent, "limits") >= 1.5 * peak
    ctr = container(rendered.controller, "controller")
    if overlay == "production":  # 10,000 agents with mTLS: 1,122 MB steady, 1,233 MB peak
        assert 1122e6 <= _memory(ctr, "requests") <= 1.3 * 1122e6
        assert _memory(ctr, "limits") >= 1.2 * 1233e6
    for part in ("requests", "limits"):
        assert _memory(ctr, part) <= _memory(ctr, "limits")


# ------------------------------------------------------------------ 4. uninstall


def test_uninstall_job_renders_validates_and_reaches_every_node(tmp_path: Path) -> None:
    rendered = render("uninstall")
    out = tmp_path / "uninstall.yaml"
    out.write_text(rendered.text)
    run([*kubernetes_validate(), "--strict", "--quiet", str(out)])
    (job,) = rendered.of_kind("Job")
    assert rendered.docs == [job], "applying the uninstall kustomization creates only the Job"
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"]
    pod = spec["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["tolerations"] == [{"operator": "Exists"}]
    anti = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["topologyKey"] == "kubernetes.io/hostname"
    assert anti[0]["labelSelector"]["matchLabels"].items() <= (
        spec["template"]["metadata"]["labels"].items()
    )
    (ctr,) = pod["containers"]
    assert ctr["args"][0] == "teardown" and "--purge-state" in ctr["args"]
    agent = container(render("overlays/production").agent, "agent")
    agent_flags, job_flags = flags(agent["args"]), flags(ctr["args"])
    for flag in ("--bpffs-dir", "--state-dir"):
        assert job_flags[flag] == agent_flags[flag], flag
    assert ctr["securityContext"]["capabilities"] == agent["securityContext"]["capabilities"]
    paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"]}
    assert set(paths.values()) == {"/sys/fs/bpf", "/var/lib/nfctl"}
    # the CLI it runs exists with these flags
    help_text = subprocess.run(
        [sys.executable, "-m", "nfctl", "teardown", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    ).stdout
    for flag in job_flags:
        assert flag in help_text, flag


# ------------------------------------------------------------------ 5. image


def test_image_is_multi_stage_pinned_locked_and_non_root() -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)", dockerfile, re.M)
    assert len(stages) >= 2 and re.search(r"^FROM \S+ AS build", dockerfile, re.M)
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", dockerfile, re.M)
    assert base and re.fullmatch(r"debian:bookworm-\d{8}-slim(@sha256:[0-9a-f]{64})?", base[1])
    assert all(s == "${BASE_IMAGE}" for s in stages)
    assert "--require-hashes -r /src/requirements.lock" in dockerfile
    assert re.search(r"^USER 65532", dockerfile, re.M)
    assert "--make-fallback /opt/nfctl/kernel-headers" in dockerfile
    assert "COPY --from=build /opt/nfctl/kernel-headers" in dockerfile
    # the final stage has no compiler toolchain, pip cache or sources
    final = dockerfile[dockerfile.rindex("FROM ") :]
    assert "linux-headers" not in final and "python3-venv" not in final


def test_lock_file_pins_the_tested_venv() -> None:
    """requirements.lock pins, hashed, a version within pyproject's tested range of every
    runtime dependency (which version pip picks on a given machine may differ: Debian's own
    PyYAML satisfies the range here, PyPI's on a bare machine)."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    text = (REPO_ROOT / "requirements.lock").read_text()
    pins = {
        canonicalize_name(name): version
        for name, version in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+) \\$", text, re.M)
    }
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    for spec in project["dependencies"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in requirements.lock (re-run pip-compile)"
        assert req.specifier.contains(pins[name], prereleases=True), (req.name, pins[name])
    entries = re.split(r"\n(?=\S)", text.split("\n\n", 1)[-1].strip())
    for entry in entries:
        if "==" in entry:
            assert "--hash=sha256:" in entry, entry[:80]


def test_kustomize_renders_uninstall_with_namespace() -> None:
    rendered = render("uninstall")
    for doc in rendered.docs:
        assert doc["metadata"]["namespace"] == NAMESPACE
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "nfctl"
