"""The rollout engine on a real controller (loopback gRPC, SQLite store, a real Git
repository, simulated agents: tests/rollout_sim.py): its Prometheus metrics scraped over
HTTP while a rollout runs, and the verdict gate's minPackets on a canary without traffic."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.rollout_sim import NF, Lab, Repo, fleet, lab, policy_yaml

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(the_lab: Lab) -> Samples:
    assert the_lab.controller is not None
    url = f"http://127.0.0.1:{the_lab.controller.ports['metrics']}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        text = await response.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("nfctl_rollout_")
    }


def infos(samples: Samples) -> list[tuple[str, str]]:
    """(revision, state) of nfctl_rollout_info's samples."""
    return [
        (dict(labels)["revision"], dict(labels)["state"])
        for (name, labels), v in samples.items()
        if name == "nfctl_rollout_info" and v == 1
    ]


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


async def start(the_lab: Lab, repo: Repo, **policy: str) -> str:
    c1 = repo.commit(
        "nf and rollout policy", {"guard/nf.yaml": "# nf\n", "rollout.yaml": policy_yaml(**policy)}
    )
    await the_lab.start_controller()
    await fleet(the_lab, workers=3)
    await the_lab.wait_rollout(c1, ("Completed",))
    await the_lab.wait(
        lambda: all(a.applied == c1 for a in the_lab.agents.values()), what="c1 everywhere"
    )
    return c1


def test_rollout_metrics_follow_a_rollout_and_count_gates_and_halts(tmp_path: Path) -> None:
    async def scenario() -> None:
        repo = Repo(tmp_path / "repo")
        async with lab(tmp_path, repo, metrics_addr="127.0.0.1:0") as the_lab:
            c1 = await start(the_lab, repo, bake="2s")
            c2 = repo.commit("good change", {"guard/nf.yaml": "# v2\n"})
            seen: list[Samples] = []
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                seen.append(await scrape(the_lab))
                if (c2, "Completed") in infos(seen[-1]):
                    break
                await asyncio.sleep(0.2)
            done = await the_lab.wait_rollout(c2, ("Completed",), timeout=5)
            assert (c2, "Progressing") in {i for s in seen for i in infos(s)}
            assert infos(seen[-1]) == [(c2, "Completed")]
            waves = [
                w
                for s in seen
                if infos(s) == [(c2, "Progressing")]
                and (w := value(s, "nfctl_rollout_wave")) is not None
            ]
            assert 0.0 in waves and 1.0 in waves and waves == sorted(waves), waves
            assert value(seen[-1], "nfctl_rollout_wave") == len(done.waves) == 3
            assert value(seen[-1], "nfctl_rollout_waves") == 3
            # nodes: pending while the canary bakes, then every node applied
            pending = [value(s, "nfctl_rollout_nodes", state="pending") for s in seen]
            assert any(p and p >= 3 for p in pending), pending
            assert value(seen[-1], "nfctl_rollout_nodes", state="applied") == 4
            assert value(seen[-1], "nfctl_rollout_nodes", state="pending") == 0
            passes = value(
                seen[-1],
                "nfctl_rollout_gate_evaluations_total",
                gate=f"verdict-{NF}",
                result="pass",
            )
            assert passes is not None and passes >= 3  # at least once per wave
            # a harmful commit: the halt is counted by gate, the state is RolledBack
            bad = repo.commit("harmful", {"guard/nf.yaml": "# bad\n"})
            the_lab.bad.add(bad)
            await the_lab.wait_rollout(bad, ("RolledBack",))
            await asyncio.sleep(0.5)  # one more engine step records it for the gauges
            after = await scrape(the_lab)
            assert value(after, "nfctl_rollout_halts_total", gate=f"verdict-{NF}") == 1
            fails = value(
                after, "nfctl_rollout_gate_evaluations_total", gate=f"verdict-{NF}", result="fail"
            )
            assert fails == 1
            states = {
                dict(ls)["state"] for (n, ls), v in after.items() if n == "nfctl_rollout_info"
            }
            assert states == {"RolledBack"}
            assert c1 != bad

    asyncio.run(scenario())


def test_a_follower_exports_no_rollout_gauges(tmp_path: Path) -> None:
    async def scenario() -> None:
        repo = Repo(tmp_path / "repo")
        async with lab(tmp_path, repo, metrics_addr="127.0.0.1:0") as the_lab:
            c1 = await start(the_lab, repo)
            assert the_lab.controller is not None and the_lab.controller.rollouts is not None
            for _ in range(100):  # the gauges follow the engine's next step
                leading = await scrape(the_lab)
                if infos(leading):
                    break
                await asyncio.sleep(0.1)
            assert infos(leading) == [(c1, "Completed")], leading
            the_lab.controller.rollouts.is_leader = lambda: False  # as when leadership is lost
            assert the_lab.controller.rollouts.metrics is not None
            the_lab.controller.rollouts.metrics.is_leader = lambda: False
            following = await scrape(the_lab)
            gauges = ("nfctl_rollout_info", "nfctl_rollout_wave", "nfctl_rollout_nodes")
            assert not any(n in gauges for n, _ in following), following

    asyncio.run(scenario())


def test_a_canary_without_traffic_fails_the_verdict_gate_at_the_progress_deadline(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        repo = Repo(tmp_path / "repo")
        async with lab(tmp_path, repo) as the_lab:
            c1 = await start(the_lab, repo, bake="1s", deadline="6s")
            the_lab.agents["node-a"].packets = 0  # the canary sees no packet
            c2 = repo.commit("change", {"guard/nf.yaml": "# v2\n"})
            progressing = await the_lab.wait_rollout(c2, ("Progressing",))
            await asyncio.sleep(3.0)  # past the 1 s bake: waiting for data, not passed
            waiting = await the_lab.rollout(c2)
            assert waiting is not None and waiting.state == "Progressing", waiting
            assert waiting.waves[0].state == "Baking" and waiting.current_wave == 0
            done = await the_lab.wait_rollout(c2, ("RolledBack", "Completed", "Halted"))
            assert done.state == "RolledBack", done
            verdict = next(g for g in done.waves[0].gates if g.kind == "verdict")
            assert verdict.message.startswith(
                f"verdict gate verdict-{NF}: only 0 packets of nf {NF} seen on the wave, "
                "minPackets 100 within progressDeadline 6 s"
            ), verdict.message
            assert done.waves[0].finished_at - progressing.waves[0].started_at >= 6
            await the_lab.wait(lambda: the_lab.agents["node-a"].applied == c1, what="rolled back")
            assert all(c2 not in a.ever_ran for n, a in the_lab.agents.items() if n != "node-a")

    asyncio.run(scenario())
