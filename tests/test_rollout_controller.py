"""The rollout engine end to end on the controller side: a real controller on loopback
gRPC with its SQLite store, a real Git repository, simulated agents (tests/rollout_sim.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.rollout_sim import NF, Repo, fleet, lab, policy_yaml


def first_policy(repo: Repo, **policy: str) -> str:
    return repo.commit(
        "nf and rollout policy", {"guard/nf.yaml": "# nf\n", "rollout.yaml": policy_yaml(**policy)}
    )


def approvals_of(agent_history: list[tuple[float, str, str]], revision: str) -> list[float]:
    return [t for t, rev, _ in agent_history if rev == revision]


def test_a_good_commit_goes_wave_by_wave_to_every_node(tmp_path: Path) -> None:
    async def scenario() -> None:
        repo = Repo(tmp_path / "repo")
        c1 = first_policy(repo)
        async with lab(tmp_path, repo) as the_lab:
            await the_lab.start_controller()
            await fleet(the_lab, workers=3)
            # the first policy rolls out as without one: every node at once
            first = await the_lab.wait_rollout(c1, ("Completed",))
            assert "first RolloutPolicy" in first.message
            await the_lab.wait(
                lambda: all(a.applied == c1 for a in the_lab.agents.values()), what="c1 everywhere"
            )
            c2 = repo.commit("good change", {"guard/nf.yaml": "# nf v2\n"})
            done = await the_lab.wait_rollout(c2, ("Completed", "RolledBack", "Halted"))
            assert done.state == "Completed", done
            assert done.previous_revision == c1
            assert [w.name for w in done.waves] == ["canary", "half", "all"]
            assert list(done.waves[0].nodes) == ["node-a"]
            assert [w.state for w in done.waves] == ["Passed"] * 3
            gates = {g.kind: g for g in done.waves[0].gates}
            assert gates["ready"].ok and gates["verdict"].ok, gates
            assert all(a.applied == c2 for a in the_lab.agents.values())
            # each wave's nodes got c2 only after the previous wave passed
            first_at = {n: approvals_of(a.history, c2) for n, a in the_lab.agents.items()}
            assert all(len(times) == 1 for times in first_at.values()), first_at
            canary_passed = done.waves[0].finished_at
            for wave in done.waves[1:]:
                for node in wave.nodes:
                    assert first_at[node][0] >= canary_passed
            assert the_lab.controller is not None
            await the_lab.controller.fleet.flush_async()
            events = the_lab.controller.store.history(revision=c2, limit=100)
            reasons = [e.reason for e in events if e.node == "controller/rollout"]
            assert reasons[0] == "RolloutStarted" and reasons[-1] == "RolloutCompleted"
            assert reasons.count("WavePassed") == 3

    asyncio.run(scenario())


def test_a_harmful_commit_is_stopped_after_the_canary_and_rolled_back(tmp_path: Path) -> None:
    async def scenario() -> None:
        repo = Repo(tmp_path / "repo")
        c1 = first_policy(repo, bake="3s")
        async with lab(tmp_path, repo) as the_lab:
            await the_lab.start_controller()
            await fleet(the_lab, workers=3)
            await the_lab.wait_rollout(c1, ("Completed",))
            await the_lab.wait(
                lambda: all(a.applied == c1 for a in the_lab.agents.values()), what="c1 everywhere"
            )
            bad = repo.commit("blocklist the whole customer prefix", {"guard/nf.yaml": "# bad\n"})
            the_lab.bad.add(bad)
            done = await the_lab.wait_rollout(bad, ("RolledBack", "Completed", "Halted"))
            assert done.state == "RolledBack", done
            canary = done.waves[0]
            assert canary.state == "RolledBack"
            verdict = next(g for g in canary.gates if g.kind == "verdict")
            assert not verdict.ok
            assert verdict.value > 0.25 and verdict.baseline < 0.02, verdict
            assert f"nf {NF}: drop ratio" in verdict.message
            await the_lab.wait(
                lambda: the_lab.agents["node-a"].applied == c1, what="canary back on c1"
            )
            # the rest of the fleet never ran the harmful commit
            assert [n for n, a in the_lab.agents.items() if bad in a.ever_ran] == ["node-a"]
            assert all(w.state == "Pending" for w in done.waves[1:])
            assert the_lab.controller is not None
            await the_lab.controller.fleet.flush_async()
            events = the_lab.controller.store.history(revision=bad, limit=100)
            failed = [e for e in events if e.reason == "GateFailed"]
            assert failed and "drop ratio" in failed[0].message and "canary" in failed[0].message
            assert any(e.reason == "RolledBack" and "node-a" in e.message for e in events)
            # a harmful commit is never rolled out again by itself
            await asyncio.sleep(1.0)
            again = await the_lab.rollout(bad)
            assert again is not None and again.id == done.id and again.state == "RolledBack"
            assert bad not in the_lab.agents["node-b"].ever_ran

    asyncio.run(scenario())
