"""Operator control, the ready gate, restarts mid-rollout, newer commits during a rollout,
the policy in force and joining nodes: a real controller (loopback gRPC, SQLite store), a
real Git repository, simulated agents (tests/rollout_sim.py)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.rollout_sim import Lab, Repo, fleet, lab, policy_yaml

REPO_ROOT = Path(__file__).resolve().parents[1]


async def started(the_lab: Lab, repo: Repo, workers: int = 3, **policy: str) -> str:
    c1 = repo.commit(
        "nf and rollout policy", {"guard/nf.yaml": "# nf\n", "rollout.yaml": policy_yaml(**policy)}
    )
    await the_lab.start_controller()
    await fleet(the_lab, workers=workers)
    await the_lab.wait_rollout(c1, ("Completed",))
    await the_lab.wait(
        lambda: all(a.applied == c1 for a in the_lab.agents.values()), what="c1 everywhere"
    )
    return c1


async def cli(the_lab: Lab, *args: str, as_json: bool = True) -> tuple[int, Any]:
    """`nfctl rollout ... -o json` against the lab's controller, as an operator runs it."""
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "nfctl", "rollout", *args, "--controller", the_lab.address,
         "--insecure", *(["-o", "json"] if as_json else [])],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
        env=dict(os.environ, NO_COLOR="1"),
    )  # fmt: skip
    if not as_json:
        return out.returncode, out.stdout + out.stderr
    try:
        return out.returncode, json.loads(out.stdout)
    except json.JSONDecodeError:
        return out.returncode, out.stdout + out.stderr


def test_pause_resume_promote_and_abort(tmp_path: Path) -> None:
    async def scenario() -> None:
        repo = Repo(tmp_path / "repo")
        async with lab(tmp_path, repo) as the_lab:
            c1 = await started(the_lab, repo, on_failure="pause", bake="30s")
            c2 = repo.commit("change", {"guard/nf.yaml": "# v2\n"})
            await the_lab.wait_rollout(c2, ("Progressing",))
            await the_lab.wait(lambda: the_lab.agents["node-a"].applied == c2, what="canary on c2")
            code, paused = await cli(the_lab, "pause", "--reason", "change freeze")
            assert code == 0 and paused["state"] == "Paused", paused
            code, again = await cli(the_lab, "pause")
            assert code == 3 and "not Progressing" in again  # refused, with the reason
            code, resumed = await cli(the_lab, "resume")
            assert code == 0 and resumed["state"] == "Progressing"
            # promote: the canary wave passes without its 30 s bake; the next wave starts
            code, promoted = await cli(the_lab, "promote", "--reason", "looks fine")
            assert code == 0 and promoted["waves"][0]["state"] == "Passed", promoted
            await the_lab.wait(
                lambda: the_lab.agents["node-b"].applied == c2, what="wave 2 approved"
            )
            assert the_lab.agents["node-d"].applied == c1  # wave 3 still waits
            code, aborted = await cli(the_lab, "abort", "--reason", "changed my mind")
            assert code == 0 and aborted["state"] == "Aborted"
            await the_lab.wait(
                lambda: all(a.applied == c1 for a in the_lab.agents.values()),
                what="every node back on c1",
            )
            assert c2 not in the_lab.agents["node-d"].ever_ran
            code, status = await cli(the_lab, "status")
            assert code == 1 and status["state"] == "Aborted"  # exit 1: not a good outcome
            code, history = await cli(the_lab, "history")
            assert code == 0 and [r["revision"] for r in history] == [c2, c1]
            assert the_lab.controller is not None
            await the_lab.controller.fleet.flush_async()
            reasons = [e.reason for e in the_lab.controller.store.history(revision=c2)]
            for reason in ("RolloutPause", "RolloutResume", "RolloutPromote", "RolloutAbort"):
                assert reason in reasons, reasons
            messages = " ".join(e.message for e in the_lab.controller.store.history(revision=c2))
            assert "change freeze" in messages and "changed my mind" in messages

    asyncio.run(scenario())


def test_a_halted_rollout_waits_for_an_operator_with_on_failure_pause(tmp_path: Path) -> None:
    async def scenario() -> None:
        repo = Repo(tmp_path / "repo")
        async with lab(tmp_path, repo) as the_lab:
            await started(the_lab, repo, on_failure="pause", bake="2s")
            bad = repo.commit("harmful", {"guard/nf.yaml": "# bad\n"})
            the_lab.bad.add(bad)
            halted = await the_lab.wait_rollout(bad, ("Halted", "Completed", "RolledBack"))
            assert halted.state == "Halted" and halted.waves[0].state == "Failed"
            await asyncio.sleep(1.0)  # nothing moves by itself
            assert the_lab.agents["node-a"].applied == bad
            assert all(bad not in a.ever_ran for n, a in the_lab.agents.items() if n != "node-a")
            code, status = await cli(the_lab, "status")
            assert code == 1 and status["state"] == "Halted"
            gate = status["waves"][0]["gates"]
            assert any(g["kind"] == "verdict" and not g["ok"] for g in gate), gate
            code, text = await cli(the_lab, "status", as_json=False)
            assert code == 1 and "Halted" in text and "FAIL verdict-guard" in text, text

    asyncio.run(scenario())


def test_a_node_not_ready_within_the_deadline_fails_the_ready_gate(tmp_path: Path) -> None:
    async def scenario() -> None:
        repo = Repo(tmp_path / "repo")
        async with lab(tmp_path, repo) as the_lab:
            c1 = await started(the_lab, repo, deadline="2s")
            c2 = repo.commit("does not come up on node-a", {"guard/nf.yaml": "# v2\n"})
            the_lab.agents["node-a"].refuse.add(c2)
            done = await the_lab.wait_rollout(c2, ("RolledBack", "Completed", "Halted"))
            assert done.state == "RolledBack", done
            ready = next(g for g in done.waves[0].gates if g.kind == "ready")
            assert not ready.ok and "node-a" in ready.message
            assert "progressDeadline 2 s" in ready.message
            await the_lab.wait(lambda: the_lab.agents["node-a"].applied == c1, what="rolled back")

    asyncio.run(scenario())


async def restart_mid_rollout(tmp_path: Path, db: str | None = None) -> None:
    """Stop the controller while wave 2 bakes, start a new one on the same store: the
    rollout completes, no wave starts twice, no node gets a second approve command."""
    repo = Repo(tmp_path / "repo")
    async with lab(tmp_path, repo, db=db) as the_lab:
        await started(the_lab, repo, bake="2s")
        c2 = repo.commit("change", {"guard/nf.yaml": "# v2\n"})

        async def in_wave_two() -> bool:
            r = await the_lab.rollout(c2)
            return r is not None and r.current_wave == 1 and r.waves[1].state == "Baking"

        for _ in range(300):
            if await in_wave_two():
                break
            await asyncio.sleep(0.05)
        assert await in_wave_two()
        port = the_lab.controller.ports["grpc"] if the_lab.controller else 0
        await the_lab.stop_controller()
        await asyncio.sleep(0.5)
        await the_lab.start_controller(port)
        await the_lab.reconnect_agents()
        done = await the_lab.wait_rollout(c2, ("Completed", "RolledBack", "Halted"))
        assert done.state == "Completed", done
        # one approve command per node for c2, wave 1 and 2 nodes included
        commands = {n: len(a.commands(c2)) for n, a in the_lab.agents.items()}
        assert commands == dict.fromkeys(the_lab.agents, 1), commands
        assert the_lab.controller is not None
        await the_lab.controller.fleet.flush_async()
        events = the_lab.controller.store.history(revision=c2)
        started_waves = [e.message.split(":")[0] for e in events if e.reason == "WaveStarted"]
        assert len(started_waves) == 3 == len(set(started_waves)), started_waves


def test_a_restarted_controller_resumes_without_repeating_a_wave(tmp_path: Path) -> None:
    asyncio.run(restart_mid_rollout(tmp_path))


def test_a_newer_commit_during_a_rollout_waits_for_it_to_end(tmp_path: Path) -> None:
    async def scenario() -> None:
        repo = Repo(tmp_path / "repo")
        async with lab(tmp_path, repo) as the_lab:
            await started(the_lab, repo, bake="1.5s")
            c2 = repo.commit("change", {"guard/nf.yaml": "# v2\n"})
            await the_lab.wait_rollout(c2, ("Progressing",))
            c3 = repo.commit("another", {"guard/nf.yaml": "# v3\n"})
            c4 = repo.commit("and another", {"guard/nf.yaml": "# v4\n"})
            await asyncio.sleep(1.0)
            assert await the_lab.rollout(c4) is None  # queued while c2 rolls out
            done = await the_lab.wait_rollout(c2, ("Completed",))
            newest = await the_lab.wait_rollout(c4, ("Completed",))
            assert newest.previous_revision == c2 and newest.started_at >= done.updated_at
            assert await the_lab.rollout(c3) is None  # only the newest queued commit
            assert all(a.applied == c4 for a in the_lab.agents.values())

    asyncio.run(scenario())


def test_the_policy_in_force_is_the_last_completed_revisions(tmp_path: Path) -> None:
    """A harmful commit that also deletes the verdict gate is still judged by it."""

    async def scenario() -> None:
        repo = Repo(tmp_path / "repo")
        async with lab(tmp_path, repo) as the_lab:
            c1 = await started(the_lab, repo, bake="2s")
            weaker = policy_yaml(gates="    - kind: ready\n", bake="0s")
            bad = repo.commit("harmful, and no more gates", {"rollout.yaml": weaker})
            the_lab.bad.add(bad)
            done = await the_lab.wait_rollout(bad, ("RolledBack", "Completed", "Halted"))
            assert done.state == "RolledBack" and done.policy.endswith(f"@{c1[:12]}"), done
            # a policy that does not parse is refused, reported, and never in force
            broken = repo.commit("broken policy", {"rollout.yaml": "spec: [\n"})
            await the_lab.wait_rollout(broken, ("Completed",))
            assert the_lab.controller is not None
            await the_lab.controller.fleet.flush_async()
            refused = [
                e for e in the_lab.controller.store.history(revision=broken)
                if e.reason == "PolicyRefused"
            ]  # fmt: skip
            assert refused and "rollout.yaml:2: error: YAML syntax error" in refused[0].message
            bad2 = repo.commit("harmful again", {"guard/nf.yaml": "# bad 2\n"})
            the_lab.bad.add(bad2)
            judged = await the_lab.wait_rollout(bad2, ("RolledBack", "Completed", "Halted"))
            assert judged.state == "RolledBack" and judged.policy.endswith(f"@{c1[:12]}")

    asyncio.run(scenario())


def test_a_joining_node_gets_the_last_completed_revision(tmp_path: Path) -> None:
    async def scenario() -> None:
        repo = Repo(tmp_path / "repo")
        async with lab(tmp_path, repo) as the_lab:
            await started(the_lab, repo, bake="30s")
            c2 = repo.commit("change", {"guard/nf.yaml": "# v2\n"})
            await the_lab.wait(lambda: the_lab.agents["node-a"].applied == c2, what="canary")
            c1 = (await the_lab.rollout(c2)).previous_revision  # type: ignore[union-attr]
            late = await the_lab.add_agent("node-z", role="canary")
            await the_lab.wait(lambda: late.applied == c1, what="joining node on c1")
            assert late.history[0][3] == "registered"  # told at registration, not by command

    asyncio.run(scenario())


def test_a_webhook_push_starts_the_rollout_without_waiting_for_the_next_fetch(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        import time

        import aiohttp

        repo = Repo(tmp_path / "repo")
        secret = tmp_path / "secret"
        secret.write_text("s3cret")
        async with lab(
            tmp_path, repo, webhook_addr="127.0.0.1:0", webhook_secret_file=secret
        ) as the_lab:
            c1 = await started(the_lab, repo, workers=1)
            assert the_lab.controller is not None and the_lab.controller.rollouts is not None
            the_lab.controller.rollouts.observer.fetch_interval = 3600.0  # only a push fetches now
            c2 = repo.commit("change", {"guard/nf.yaml": "# v2\n"})
            await asyncio.sleep(1.0)
            assert await the_lab.rollout(c2) is None
            pushed = time.monotonic()
            url = f"http://127.0.0.1:{the_lab.controller.ports['webhook']}/hooks/gitlab"
            async with aiohttp.ClientSession() as session:
                body = {"ref": "refs/heads/main", "after": c2, "project": {"name": "repo"}}
                async with session.post(url, json=body, headers={"X-Gitlab-Token": "s3cret"}) as r:
                    assert r.status == 200, await r.text()
            started_rollout = await the_lab.wait_rollout(c2, ("Progressing", "Completed"), 10)
            assert started_rollout.previous_revision == c1
            assert time.monotonic() - pushed < 5

    asyncio.run(scenario())


def test_controller_rollout_flags_are_checked() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "nfctl", "controller", "--insecure", "--listen", "127.0.0.1:0",
         "--db", ":memory:", "--source", "/nonexistent", "--source-interval", "0"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "--source-interval" in out.stderr, out.stdout + out.stderr


def test_the_last_wave_is_judged_against_its_own_figures_before_the_update(
    tmp_path: Path,
) -> None:
    """No node is left to compare with: the wave's nodes before their update are the
    baseline. (Only the last wave has a verdict gate, so the harm reaches it.)"""

    async def scenario() -> None:
        repo = Repo(tmp_path / "repo")
        waves = """
    - name: canary
      selector: {role: canary}
      bake: 1s
    - name: all
      bake: 2s
      gates:
        - kind: verdict
          nf: guard
          maxIncrease: 0.05
"""
        async with lab(tmp_path, repo) as the_lab:
            c1 = await started(the_lab, repo, waves=waves, gates="    - kind: ready\n")
            await asyncio.sleep(1.0)  # the fleet counts packets on c1
            bad = repo.commit("harmful", {"guard/nf.yaml": "# bad\n"})
            the_lab.bad.add(bad)
            done = await the_lab.wait_rollout(bad, ("RolledBack", "Completed", "Halted"))
            assert done.state == "RolledBack" and done.waves[1].name == "all", done
            assert done.waves[0].state == "Passed"
            verdict = next(g for g in done.waves[1].gates if g.kind == "verdict")
            assert not verdict.ok and "before the update" in verdict.message, verdict
            assert 0.005 < verdict.baseline < 0.02 and verdict.value > 0.25
            await the_lab.wait(
                lambda: all(a.applied == c1 for a in the_lab.agents.values()),
                what="every approved node back on c1",
            )

    asyncio.run(scenario())


def test_an_approval_a_node_never_got_is_sent_once_more(tmp_path: Path) -> None:
    async def scenario() -> None:
        repo = Repo(tmp_path / "repo")
        async with lab(tmp_path, repo) as the_lab:
            await started(the_lab, repo, bake="0s")
            assert the_lab.controller is not None and the_lab.controller.rollouts is not None
            the_lab.controller.rollouts.applier.resend_after = 1.0
            c2 = repo.commit("change", {"guard/nf.yaml": "# v2\n"})
            the_lab.agents["node-a"].lose_once.add(c2)
            done = await the_lab.wait_rollout(c2, ("Completed", "RolledBack"), timeout=60)
            assert done.state == "Completed", done
            assert len(the_lab.agents["node-a"].commands(c2)) == 1  # the second one arrived
            assert all(len(a.commands(c2)) == 1 for a in the_lab.agents.values())

    asyncio.run(scenario())


def test_status_watch_follows_a_rollout_wave_by_wave_until_it_completes(tmp_path: Path) -> None:
    async def scenario() -> None:
        repo = Repo(tmp_path / "repo")
        async with lab(tmp_path, repo) as the_lab:
            # each wave bakes longer than the CLI takes to start on a loaded machine (~1-3 s),
            # so the watch is up while wave 0 still runs
            await started(the_lab, repo, bake="4s")
            c2 = repo.commit("change", {"guard/nf.yaml": "# v2\n"})
            await the_lab.wait_rollout(c2, ("Progressing",))
            code, out = await asyncio.wait_for(
                cli(the_lab, "status", "-w", "--interval", "0.2", "-o", "json", as_json=False), 90
            )
            assert code == 0, out
            docs, text = [], out.strip()
            while text:
                doc, end = json.JSONDecoder().raw_decode(text)
                docs.append(doc)
                text = text[end:].lstrip()
            assert all(d["revision"] == c2 for d in docs)
            assert docs[-1]["state"] == "Completed"
            waves = [d.get("currentWave", 0) for d in docs]
            # every wave seen, in order (a completed rollout points past its last wave)
            assert waves == sorted(waves) and {0, 1, 2} <= set(waves), waves
            assert len(docs) >= 3  # one document per change, not one at the end

    asyncio.run(scenario())
