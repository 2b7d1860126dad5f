"""The promql gate against a real Prometheus (Debian's package) scraping a real metrics
endpoint this test serves: the simulated agents' packet and drop counters, per node."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from nfctl.controller.rollout import promql
from nfctl.manifest.rollout import PromQLGate
from tests.ci import unavailable
from tests.rollout_sim import Lab, Repo, fleet, lab, policy_yaml

QUERY = "max(rate(sim_dropped_total[4s]) / rate(sim_packets_total[4s]))"
GATES = f"""    - kind: promql
      name: drop-rate
      query: "{QUERY}"
      max: 0.1
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def serve_metrics(the_lab: Lab, port: int) -> web.AppRunner:
    async def metrics(request: web.Request) -> web.Response:
        lines = ["# TYPE sim_packets_total counter", "# TYPE sim_dropped_total counter"]
        for name, agent in the_lab.agents.items():
            lines.append(f'sim_packets_total{{node="{name}"}} {agent.passed + agent.dropped}')
            lines.append(f'sim_dropped_total{{node="{name}"}} {agent.dropped}')
        return web.Response(text="\n".join(lines) + "\n")

    app = web.Application()
    app.add_routes([web.get("/metrics", metrics)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


class Prometheus:
    def __init__(self, folder: Path, target: str) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            unavailable("prometheus is not installed (sudo make setup installs it)")
        self.folder = folder
        self.port = free_port()
        folder.mkdir()
        (folder / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"scrape_configs:\n  - job_name: sim\n    static_configs:\n"
            f"      - targets: ['{target}']\n"
        )
        self.log = (folder / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [
                str(binary),
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def has_data(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, (self.folder / "prometheus.log").read_text()
                try:
                    async with session.get(
                        f"{self.url}/api/v1/query", params={"query": QUERY}
                    ) as resp:
                        body = await resp.json()
                        if body.get("data", {}).get("result"):
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.5)
        raise AssertionError((self.folder / "prometheus.log").read_text()[-3000:])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


async def gate_outcomes(url: str) -> None:
    """A query Prometheus refuses fails; no samples or no answer is undecided."""
    async with aiohttp.ClientSession() as session:

        async def outcome(query: str, at: str = url) -> tuple[bool | None, str]:
            gate = PromQLGate(kind="promql", query=query, max=1.0)
            result = await promql.promql_gate(gate, at, session)
            return result.ok, result.result.message

        ok, message = await outcome("sum(rate(sim_packets_total[")
        assert ok is False and "failed" in message, message
        ok, message = await outcome("sim_packets_total{node='nobody'}")
        assert ok is None and "no samples" in message, message
        ok, message = await outcome("up", f"http://127.0.0.1:{free_port()}")
        assert ok is None and "did not answer" in message, message
        ok, message = await outcome("up")
        assert ok is True and "= 1" in message, message


def test_the_promql_gate_passes_a_good_commit_and_stops_a_harmful_one(tmp_path: Path) -> None:
    async def scenario() -> None:
        repo = Repo(tmp_path / "repo")
        metrics_port = free_port()
        prometheus = Prometheus(tmp_path / "prometheus", f"127.0.0.1:{metrics_port}")
        try:
            async with lab(tmp_path, repo, prometheus_url=prometheus.url) as the_lab:
                runner = await serve_metrics(the_lab, metrics_port)
                try:
                    c1 = repo.commit(
                        "policy",
                        {"rollout.yaml": policy_yaml(gates=GATES, bake="8s", interval="0.5s")},
                    )
                    await the_lab.start_controller()
                    await fleet(the_lab, workers=2)
                    await the_lab.wait_rollout(c1, ("Completed",))
                    await prometheus.has_data()
                    good = repo.commit("good", {"guard/nf.yaml": "# v2\n"})
                    done = await the_lab.wait_rollout(
                        good, ("Completed", "RolledBack"), timeout=120
                    )
                    assert done.state == "Completed", done
                    gate = next(g for g in done.waves[0].gates if g.kind == "promql")
                    assert gate.ok and gate.name == "drop-rate" and gate.value < 0.1, gate
                    assert gate.threshold == 0.1
                    bad = repo.commit("harmful", {"guard/nf.yaml": "# bad\n"})
                    the_lab.bad.add(bad)
                    halted = await the_lab.wait_rollout(
                        bad, ("RolledBack", "Completed"), timeout=120
                    )
                    assert halted.state == "RolledBack", halted
                    gate = next(g for g in halted.waves[0].gates if g.kind == "promql")
                    assert not gate.ok and gate.value > 0.1, gate
                    assert QUERY in gate.message and "not <= 0.1" in gate.message
                    assert [n for n, a in the_lab.agents.items() if bad in a.ever_ran] == ["node-a"]
                    await gate_outcomes(prometheus.url)
                finally:
                    await runner.cleanup()
        finally:
            prometheus.stop()

    asyncio.run(scenario())
