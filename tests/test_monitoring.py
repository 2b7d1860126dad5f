"""deploy/monitoring: alert rules checked and unit-tested by promtool, the scrape config
checked by promtool and loaded by a real Prometheus that scrapes a real agent and controller,
the dashboard's queries answered by that Prometheus, and the kustomize directory rendered.

promtool and prometheus (Debian's `prometheus` package, installed by scripts/setup.sh) and
kubectl are required: a missing one skips on a developer machine but FAILS under CI=true."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from nfctl.lab.topology import Topology, nsenter
from tests.agent_harness import GitDaemon, GitRepo, wait_until
from tests.ci import unavailable
from tests.conftest import require_kernel
from tests.controller_harness import (
    ControllerProcess,
    NodeAgent,
    Pki,
    hub_python,
    new_topology,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
MONITORING = REPO_ROOT / "deploy" / "monitoring"
PROMETHEUS_DIR = MONITORING / "prometheus"
RULES = PROMETHEUS_DIR / "nfctl-alerts.rules.yaml"
DASHBOARD = MONITORING / "grafana" / "nfctl-dashboard.json"
METRIC_RE = re.compile(r"\b(nfctl_[a-z0-9_]+|process_[a-z_]+|up)\b")
# Panels whose series exist as soon as one agent with the counter and blocklist NFs reports
# to a controller (others need webhooks, drift, operator RPCs or other NFs first).
LIVE_PANELS = {
    "Agents connected",
    "Nodes stale",
    "Nodes not Ready",
    "Nodes per NF and state",
    "NF versions in the fleet",
    "Ready",
    "NFs by state",
    "Reconcile p95",
    "Compile p95",
    "Git fetch failures /min",
    "Agent resident memory",
    "NFs on nodes",
    "counter: packets /s",
    "counter: bits /s",
    "blocklist: drops /s",
}


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    unavailable(f"{name} is not installed (sudo make setup installs it)")


def run(cmd: list[str], cwd: Path = REPO_ROOT) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    )
    return proc.stdout + proc.stderr


def rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(RULES.read_text())["groups"]
    return groups


def alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in rule_groups() for r in g["rules"]}


def dashboard_panels() -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = json.loads(DASHBOARD.read_text())["panels"]
    return [p for p in panels if p["type"] != "row"]


def dashboard_query(expr: str) -> str:
    """A panel's query as Grafana sends it with the node variable at "All"."""
    return expr.replace("$node", ".*")


def exported_metric_names() -> set[str]:
    """Every metric the code or the library NFs' manifests declare."""
    names: set[str] = set()
    sources = ("nfctl/agent/metrics.py", "nfctl/controller/metrics.py")
    for source in (*sources, "nfctl/controller/rollout/metrics.py"):
        names |= set(re.findall(r'"(nfctl_[a-z0-9_]+)"', (REPO_ROOT / source).read_text()))
    for manifest in (REPO_ROOT / "bpf").glob("*/nf.yaml"):
        names |= set(re.findall(r"metric:\s*(nfctl_[a-z0-9_]+)", manifest.read_text()))
    return names


def base_name(metric: str) -> str:
    return re.sub(r"_(bucket|count|sum)$", "", metric)


# -- static checks ---------------------------------------------------------------------------


def test_promtool_checks_the_rules() -> None:
    promtool = require_tool("promtool")
    out = run([promtool, "check", "rules", str(RULES)])
    assert f"SUCCESS: {len(alerts())} rules found" in out


def test_promtool_unit_tests_every_alert() -> None:
    """Each alert fires on realistic series in nfctl-alerts.test.yaml, and a node next to it
    that must not alert stays quiet."""
    promtool = require_tool("promtool")
    out = run([promtool, "test", "rules", "nfctl-alerts.test.yaml"], cwd=PROMETHEUS_DIR)
    assert "SUCCESS" in out
    tested = set(
        re.findall(r"alertname: (\w+)", (PROMETHEUS_DIR / "nfctl-alerts.test.yaml").read_text())
    )
    untested = (
        set(alerts())
        - tested
        - {"NfctlControllerDown", "NfctlGitFetchFailing", "NfctlFunctionDegraded"}
    )
    assert not untested, f"alerts without a promtool test: {untested}"


def test_promtool_checks_the_scrape_config(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    for item in PROMETHEUS_DIR.iterdir():
        shutil.copy(item, tmp_path / item.name)
    out = run([promtool, "check", "config", str(tmp_path / "prometheus.yml")])
    assert "is valid prometheus config file syntax" in out and "SUCCESS: 1 rule files found" in out
    jobs = {
        j["job_name"]
        for j in yaml.safe_load((tmp_path / "prometheus.yml").read_text())["scrape_configs"]
    }
    assert jobs == {"nfctl-agent", "nfctl-controller"}


def test_rules_and_dashboard_use_metrics_the_code_exports() -> None:
    known = exported_metric_names() | {"up"}
    exprs = [r["expr"] for r in alerts().values()]
    exprs += [t["expr"] for p in dashboard_panels() for t in p["targets"]]
    used = {base_name(m) for e in exprs for m in METRIC_RE.findall(e)}
    used = {m for m in used if not m.startswith("process_")}
    assert used - known == set(), f"unknown metrics: {used - known}"
    # and each job the alerts name is one the scrape config defines
    assert {"nfctl-agent", "nfctl-controller"} <= set(re.findall(r'job="([\w-]+)"', "".join(exprs)))


def test_prometheus_rule_resource_equals_the_rule_file() -> None:
    resource = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert resource["kind"] == "PrometheusRule"
    assert resource["spec"] == yaml.safe_load(RULES.read_text())


def test_kustomize_renders_monitoring_objects() -> None:
    kubectl = require_tool("kubectl")
    objects = [d for d in yaml.safe_load_all(run([kubectl, "kustomize", str(MONITORING)])) if d]
    by_kind = {o["kind"]: o for o in objects}
    assert set(by_kind) == {"ConfigMap", "PodMonitor", "ServiceMonitor", "PrometheusRule"}
    assert all(o["metadata"]["namespace"] == "nfctl-system" for o in objects)
    config_map = by_kind["ConfigMap"]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(config_map["data"]["nfctl-dashboard.json"])
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == ["Fleet (controller)", "Node (agent)", "Network functions"]
    # the monitors select the pods/Service of deploy/base and name the jobs the alerts use
    base = [
        d
        for d in yaml.safe_load_all(run([kubectl, "kustomize", str(REPO_ROOT / "deploy" / "base")]))
        if d
    ]
    [daemonset] = [d for d in base if d["kind"] == "DaemonSet"]
    [service] = [d for d in base if d["kind"] == "Service"]
    agent_pod = daemonset["spec"]["template"]["metadata"]["labels"]
    pod_monitor = by_kind["PodMonitor"]["spec"]
    assert pod_monitor["selector"]["matchLabels"].items() <= agent_pod.items()
    assert agent_pod[pod_monitor["jobLabel"]] == "nfctl-agent"
    service_monitor = by_kind["ServiceMonitor"]["spec"]
    assert (
        service_monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert service["metadata"]["labels"][service_monitor["jobLabel"]] == "nfctl-controller"
    assert {p["name"] for p in service["spec"]["ports"]} >= {
        service_monitor["endpoints"][0]["port"]
    }


# -- a real Prometheus scraping a real agent and controller ------------------------------------


class Prometheus:
    """Debian's prometheus in the hub namespace, with the shipped prometheus.yml and rules
    (only the scrape/evaluation interval shortened so the test does not wait 15 s a sample)."""

    def __init__(
        self, topo: Topology, folder: Path, agents: dict[str, str], controller: str
    ) -> None:
        self.topo = topo
        self.folder = folder
        self.address = f"{topo.hub_ip}:9090"
        for item in PROMETHEUS_DIR.iterdir():
            shutil.copy(item, folder / item.name)
        config = yaml.safe_load((folder / "prometheus.yml").read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        (folder / "targets").mkdir()
        (folder / "targets" / "agents.json").write_text(
            json.dumps([{"targets": [addr], "labels": {"node": n}} for n, addr in agents.items()])
        )
        (folder / "targets" / "controller.json").write_text(json.dumps([{"targets": [controller]}]))
        self.log_path = folder / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Prometheus:
        self.log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [
                *nsenter(self.topo.hub),
                require_tool("prometheus"),
                f"--config.file={self.folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.folder / 'data'}",
                f"--web.listen-address={self.address}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=self.folder,
        )
        wait_until(lambda: self.ready(), 60, what=f"prometheus ready\n{self.output()}")
        return self

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited:\n{self.output()}")
        return "Server is ready to receive web requests" in self.output()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        self.proc = None
        self.log.close()

    def output(self) -> str:
        return self.log_path.read_text()[-4000:]

    def api(self, path: str, **params: str) -> Any:
        url = f"http://{self.address}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        body = hub_python(
            self.topo,
            f"import urllib.request; print(urllib.request.urlopen({url!r}).read().decode())",
        )
        reply = json.loads(body)
        assert reply["status"] == "success", reply
        return reply["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result


@pytest.fixture
def topo() -> Iterator[Topology]:
    require_kernel()
    topology = new_topology(1)
    try:
        yield topology
    finally:
        topology.destroy()


@pytest.mark.kernel
def test_real_prometheus_scrapes_agent_and_controller(topo: Topology, tmp_path: Path) -> None:
    require_tool("prometheus")
    node = topo.node("node1")
    pki = Pki(tmp_path / "pki", topo, ["node1"])
    gitdir = tmp_path / "git"
    repo = GitRepo(gitdir / "nfs-repo")
    repo.add_library_nf("counter")
    repo.add_library_nf("blocklist")
    revision = repo.commit("counter and blocklist")
    git = GitDaemon(gitdir, topo.hub, topo.hub_ip)
    git.start()
    controller = ControllerProcess(topo, pki, tmp_path / "ctl" / "controller.db").start()
    agent = NodeAgent(
        topo, "node1", pki, git.url("nfs-repo"), tmp_path, "--metrics-addr", f"{node.ip}:9101"
    ).start()
    (tmp_path / "prom").mkdir()
    prometheus = Prometheus(
        topo, tmp_path / "prom", {"node1": f"{node.ip}:9101"}, f"{topo.hub_ip}:9102"
    )
    try:
        wait_until(
            lambda: agent.status().get("lastAppliedRevision") == revision,
            120,
            what=f"node1 at {revision[:12]}",
        )
        prometheus.start()
        pings = subprocess.run(
            ["ip", "netns", "exec", topo.hub, "ping", "-c", "5", "-i", "0.2", node.ip],
            capture_output=True,
            text=True,
            check=False,
        )
        assert pings.returncode == 0, pings.stdout + pings.stderr

        def up() -> dict[str, float]:
            return {r["metric"]["job"]: float(r["value"][1]) for r in prometheus.query("up")}

        assert wait_until(
            lambda: up() == {"nfctl-agent": 1.0, "nfctl-controller": 1.0},
            60,
            what="both targets up",
        )

        def series(expr: str) -> list[dict[str, Any]]:
            return prometheus.query(expr)

        [ready] = wait_until(
            lambda: series('nfctl_agent_ready{node="node1"} == 1'), 30, what="agent ready series"
        )
        assert (
            ready["metric"]["job"] == "nfctl-agent"
            and ready["metric"]["instance"] == f"{node.ip}:9101"
        )
        [connected] = series("nfctl_controller_agents_connected")
        assert connected["value"][1] == "1"
        applied = series('nfctl_agent_function_info{state="Applied"}')
        assert {r["metric"]["nf"] for r in applied} == {"counter", "blocklist"}
        assert {r["metric"]["revision"] for r in applied} == {revision[:12]}
        fleet = series('nfctl_controller_functions{state="Applied"}')
        assert {r["metric"]["nf"] for r in fleet} == {"counter", "blocklist"}
        icmp = wait_until(
            lambda: series(
                'sum(nfctl_nf_counter_packets_total{node="node1", key=~".*proto=1.*"}) >= 5'
            ),
            30,
            what="the pings counted",
        )
        assert float(icmp[0]["value"][1]) >= 5

        # the rules loaded and evaluate without error on real data; none fires for a healthy node
        groups = prometheus.api("rules")["groups"]
        loaded = {r["name"]: r for g in groups for r in g["rules"]}
        assert set(loaded) == set(alerts())
        wait_until(
            lambda: all(
                r["health"] == "ok" for g in prometheus.api("rules")["groups"] for r in g["rules"]
            ),
            30,
            what="every rule evaluated",
        )
        firing = [a for a in prometheus.api("alerts")["alerts"] if a["state"] != "inactive"]
        assert firing == [], firing

        # each dashboard query runs; those about what is deployed here return series
        wait_until(lambda: series("rate(nfctl_nf_counter_bytes_total[1m])"), 30, what="two samples")
        empty = []
        for panel in dashboard_panels():
            for target in panel["targets"]:
                result = prometheus.query(dashboard_query(target["expr"]))
                if panel["title"] in LIVE_PANELS and not result:
                    empty.append(panel["title"])
        assert empty == [], f"dashboard panels without data: {empty}"

        # the agent stops: Prometheus sees it down, the controller's view still has it
        agent.stop()
        wait_until(lambda: up().get("nfctl-agent") == 0.0, 30, what="agent target down")
    finally:
        prometheus.stop()
        agent.teardown()
        controller.stop()
        git.stop()
