"""The lab's Prometheus: Debian's `prometheus` in the hub namespace, with the shipped
deploy/monitoring/prometheus config and alert rules, scraping every lab agent and the
controller (file_sd target lists, each agent labelled with its node name). Rollout
policies gate on it with PromQL; operators query it like the one they already run."""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "deploy" / "monitoring" / "prometheus"
PORT = 9090
# the lab judges rollouts within seconds: scrape every second (production keeps 15 s)
SCRAPE_INTERVAL = "1s"


class PrometheusError(RuntimeError):
    pass


def binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        raise PrometheusError(
            "prometheus is not installed (Debian: apt-get install prometheus; "
            "scripts/setup.sh installs it)"
        )
    return path


def write_config(folder: Path, agents: dict[str, str], controller: str) -> Path:
    """The shipped prometheus.yml and rules in folder, with the lab's targets; returns the
    config file. agents: node name -> host:port of its /metrics."""
    folder.mkdir(parents=True, exist_ok=True)
    for item in CONFIG_DIR.iterdir():
        if item.is_file():
            shutil.copy(item, folder / item.name)
    config_file = folder / "prometheus.yml"
    config = yaml.safe_load(config_file.read_text())
    config["global"] = {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL}
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    targets = folder / "targets"
    targets.mkdir(exist_ok=True)
    (targets / "agents.json").write_text(
        json.dumps([{"targets": [addr], "labels": {"node": n}} for n, addr in agents.items()])
    )
    (targets / "controller.json").write_text(json.dumps([{"targets": [controller]}]))
    return config_file


def command(folder: Path, listen: str) -> list[str]:
    return [
        binary(),
        f"--config.file={folder / 'prometheus.yml'}",
        f"--storage.tsdb.path={folder / 'data'}",
        f"--web.listen-address={listen}",
        "--storage.tsdb.retention.time=1d",
    ]


class PrometheusClient:
    """The HTTP API of a Prometheus server (what a PromQL gate asks)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as reply:
                return bool(reply.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise PrometheusError(f"prometheus at {self.url} not ready after {timeout:.0f}s")
            time.sleep(0.2)

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                body = json.loads(reply.read())
        except (OSError, ValueError) as exc:
            raise PrometheusError(f"query {expr!r}: {exc}") from None
        if body.get("status") != "success":
            raise PrometheusError(f"query {expr!r}: {body.get('error', body)}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def targets_up(self, job: str) -> dict[str, bool]:
        """instance -> up, for the job's targets."""
        return {
            r["metric"].get("node") or r["metric"]["instance"]: r["value"][1] == "1"
            for r in self.query(f'up{{job="{job}"}}')
        }
