"""The verdict gate's minimum sample (minPackets): judged only once the wave and its
baseline saw enough packets; until then waiting for data, past the bake time up to the
progress deadline, where a wave without traffic fails with the reason. Pure: the policy
parser, the judgement, and the decision (tests/test_rollout_engine_decide.py's World)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nfctl.controller.rollout.plan import judge_verdicts
from nfctl.manifest.rollout import DEFAULT_MIN_PACKETS, VerdictGate, parse_policy
from tests.rollout_sim import NF, policy_yaml
from tests.test_rollout_engine_decide import NEW, OLD, T0, World, policy_of

REPO_ROOT = Path(__file__).resolve().parents[1]


def with_min_packets(value: str) -> str:
    return policy_yaml().replace(
        "maxIncrease: 0.05", f"maxIncrease: 0.05\n      minPackets: {value}"
    )


def test_min_packets_defaults_to_100_and_is_read_from_the_policy() -> None:
    default = policy_of()
    gate = default.spec.gates[0]
    assert isinstance(gate, VerdictGate) and gate.min_packets == DEFAULT_MIN_PACKETS == 100
    policy, problems = parse_policy(with_min_packets("5000"), "rollout.yaml")
    assert policy is not None, problems
    gate = policy.spec.gates[0]
    assert isinstance(gate, VerdictGate) and gate.min_packets == 5000


@pytest.mark.parametrize(
    ("value", "expected"),
    [("-1", "greater than or equal to 0"), ("lots", "valid integer"), ("2.5", "valid integer"),
     ("true", "valid integer"), ("10000000000", "less than or equal to")],
)  # fmt: skip
def test_a_bad_min_packets_is_refused_with_file_and_line(value: str, expected: str) -> None:
    policy, problems = parse_policy(with_min_packets(value), "rollout.yaml")
    assert policy is None
    shown = [str(p) for p in problems]
    assert any(p.startswith("rollout.yaml:23") and expected in p for p in shown), shown
    assert any("minPackets" in p for p in shown), shown


def test_nfctl_validate_refuses_a_bad_min_packets_with_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "rollout.yaml").write_text(with_min_packets("-5"))
    out = subprocess.run(
        [sys.executable, "-m", "nfctl", "validate", str(tmp_path), "--no-compile"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "rollout.yaml:23" in out.stdout + out.stderr and "minPackets" in out.stdout + out.stderr


def test_one_dropped_packet_of_three_is_not_a_verdict() -> None:
    """0 of 3 and 1 of 3 dropped are both 'waiting for data', not pass and fail."""
    for wave in ((0, 3), (1, 3)):
        judged = judge_verdicts(
            NF, 0.05, wave, others=(0, 1000), pre_update=(0, 0), min_packets=100
        )
        assert judged.ok is None and f"only 3 packets of nf {NF} seen on the wave" in judged.message
    enough = judge_verdicts(
        NF, 0.05, (1, 300), others=(0, 1000), pre_update=(0, 0), min_packets=100
    )
    assert enough.ok is True
    harmful = judge_verdicts(NF, 0.05, (90, 300), (0, 1000), (0, 0), min_packets=100)
    assert harmful.ok is False


def test_the_baseline_needs_min_packets_too() -> None:
    thin = judge_verdicts(NF, 0.05, (0, 500), others=(1, 20), pre_update=(0, 0), min_packets=100)
    assert thin.ok is None and "only 20 packets" in thin.message and "baseline" in thin.message
    # the nodes not yet updated saw too few, the wave's own pre-update window enough
    own = judge_verdicts(NF, 0.05, (0, 500), others=(1, 20), pre_update=(2, 400), min_packets=100)
    assert own.ok is True and "before the update" in own.message
    # no baseline at all (a first wave taking every node): an absolute limit, as before
    alone = judge_verdicts(NF, 0.05, (10, 500), others=(0, 0), pre_update=(0, 0), min_packets=100)
    assert alone.ok is True and alone.baseline == 0.0 and "no baseline traffic" in alone.message


def test_a_wave_without_traffic_waits_past_its_bake_and_fails_at_the_progress_deadline() -> None:
    world = World(policy_of(bake="2s", interval="1s", deadline="20s"))
    world.start(T0)
    world.advance(T0 + 1)  # the canary runs NEW, no packet flows
    world.traffic(0, {})
    past_bake = world.advance(T0 + 10)
    assert past_bake.rollout.state == "Progressing"
    assert past_bake.rollout.waves[0].state == "Baking"  # waiting for data, not passed
    verdict = next(o for o in past_bake.evaluated if o.result.kind == "verdict")
    assert verdict.ok is None and verdict.waiting
    assert world.advance(T0 + 10.5).empty  # waiting is judged every interval, not every step
    failed = world.advance(T0 + 21)
    assert failed.rollout.state == "RolledBack" and failed.halted_by == f"verdict-{NF}"
    gate = next(g for g in failed.rollout.waves[0].gates if g.kind == "verdict")
    assert gate.message == (
        f"verdict gate verdict-{NF}: only 0 packets of nf {NF} seen on the wave, "
        "minPackets 100 within progressDeadline 20 s"
    )
    assert [(a.node, a.revision) for a in failed.approvals] == [("node-a", OLD)]


def test_traffic_arriving_before_the_deadline_lets_the_wave_pass() -> None:
    world = World(policy_of(bake="2s", interval="1s", deadline="20s"))
    world.start(T0)
    world.advance(T0 + 1)
    assert world.advance(T0 + 5).rollout.waves[0].state == "Baking"  # no traffic yet
    world.traffic(150, {})
    passed = world.advance(T0 + 8)
    assert passed.rollout.waves[0].state == "Passed", passed.rollout.waves[0]
    assert passed.rollout.current_wave == 1 and {a.revision for a in passed.approvals} == {NEW}
