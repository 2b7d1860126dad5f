"""RolloutPolicy parsing (errors with file:line) and the pure wave/gate planning."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nfctl.controller.rollout.plan import (
    NodeView,
    delta,
    judge_verdicts,
    max_unavailable,
    next_approvals,
    select_waves,
    wave_settings,
)
from nfctl.manifest.rollout import RolloutPolicy, parse_duration, parse_policy
from tests.rollout_sim import policy_yaml

REPO_ROOT = Path(__file__).resolve().parents[1]


def parsed(text: str) -> RolloutPolicy:
    policy, problems = parse_policy(text, "rollout.yaml")
    assert policy is not None, [str(p) for p in problems]
    return policy


def problems_of(text: str) -> list[str]:
    policy, problems = parse_policy(text, "rollout.yaml")
    assert policy is None
    return [str(p) for p in problems]


def test_a_valid_policy_parses_with_defaults_and_units() -> None:
    policy = parsed(policy_yaml(bake="2m", deadline="90s", interval="500ms"))
    assert policy.spec.waves[0].bake == 120.0
    assert policy.spec.progress_deadline == 90.0 and policy.spec.interval == 0.5
    assert policy.spec.on_failure.value == "rollback"
    assert [g.kind for g in policy.gates_of(0)] == ["ready", "verdict"]


@pytest.mark.parametrize(
    ("change", "line", "expected"),
    [
        (("maxIncrease: 0.05", "maxIncrease: 5"), 22, "less than or equal to 1"),
        (("bake: 1s", "bake: soon"), 12, "invalid duration 'soon'"),
        (("onFailure: rollback", "onFailure: pray"), 6, "'rollback' or 'pause'"),
        (("count: 50%", "count: 150%"), 14, "between 1% and 100%"),
        (("nf: guard", "nf: Guard!"), 21, "not a valid NetworkFunction name"),
        (("kind: verdict", "kind: vibes"), 20, "ready, verdict or promql"),
        (("name: canary", "nmae: canary"), 10, "unknown field"),
    ],
)
def test_a_bad_policy_is_refused_with_file_and_line(
    change: tuple[str, str], line: int, expected: str
) -> None:
    text = policy_yaml().replace(*change, 1)
    found = problems_of(text)
    assert any(p.startswith(f"rollout.yaml:{line}") and expected in p for p in found), found


def test_yaml_errors_and_wrong_kinds_are_located() -> None:
    assert problems_of("spec: [\n")[0].startswith("rollout.yaml:")
    assert "duplicate key 'spec'" in problems_of(policy_yaml() + "spec: {}\n")[0]
    wrong = problems_of(policy_yaml().replace("kind: RolloutPolicy", "kind: NetworkFunction"))
    assert wrong[0].startswith("rollout.yaml:2")
    both = policy_yaml().replace("count: 50%", "count: 2\n      selector: {a: b}")
    assert any("selector or a count" in p for p in problems_of(both))


def test_durations() -> None:
    assert parse_duration("1.5m") == 90 and parse_duration(3) == 3.0
    for bad in ("-1s", "1d", True, "8h" * 2, 10**9):
        with pytest.raises(ValueError):
            parse_duration(bad)


def node(name: str, **labels: str) -> NodeView:
    return NodeView(name=name, labels=labels)


def test_waves_take_selector_then_percent_then_the_rest() -> None:
    policy = parsed(policy_yaml())
    nodes = [node("n1", role="worker"), node("n2", role="canary"), node("n3"), node("n4")]
    nodes += [node("n5"), node("n6")]
    waves = select_waves(policy, nodes)
    # 50% of six nodes: three, taken in name order from those the canary wave left
    assert waves == [("canary", ["n2"]), ("half", ["n1", "n3", "n4"]), ("all", ["n5", "n6"])]


def test_nodes_no_wave_takes_form_a_rest_wave_judged_by_the_policy_gates() -> None:
    policy = parsed(policy_yaml(waves="\n    - name: canary\n      selector: {role: canary}\n"))
    waves = select_waves(policy, [node("a", role="canary"), node("b"), node("c")])
    assert waves == [("canary", ["a"]), ("rest", ["b", "c"])]
    bake, gates = wave_settings(policy, 1)
    assert bake == 0 and [g.kind for g in gates] == ["ready", "verdict"]


def test_max_unavailable_limits_nodes_in_flight() -> None:
    policy = parsed(policy_yaml().replace("  onFailure", "  maxUnavailable: 2\n  onFailure"))
    wave = ["a", "b", "c", "d", "e"]
    limit = max_unavailable(policy, len(wave))
    assert limit == 2
    views = {n: NodeView(n, applied="old", ready=True) for n in wave}
    assert next_approvals(wave, set(), views, "new", limit) == ["a", "b"]
    assert next_approvals(wave, {"a", "b"}, views, "new", limit) == []
    views["a"] = NodeView("a", applied="new", ready=True)
    assert next_approvals(wave, {"a", "b"}, views, "new", limit) == ["c"]


def test_verdict_judgement_against_others_then_own_pre_update_figures() -> None:
    bad = judge_verdicts("guard", 0.05, wave=(300, 1000), others=(10, 1000), pre_update=(0, 0))
    assert not bad.ok and bad.value == 0.3 and bad.baseline == 0.01
    assert bad.threshold == pytest.approx(0.06)
    fine = judge_verdicts("guard", 0.05, wave=(50, 1000), others=(0, 0), pre_update=(40, 1000))
    assert fine.ok and fine.baseline == 0.04 and "before the update" in fine.message
    idle = judge_verdicts("guard", 0.0, wave=(0, 0), others=(5, 10), pre_update=(0, 0))
    assert idle.ok and "no packets" in idle.message


def test_counter_deltas_survive_a_reset() -> None:
    assert delta((15, 100), (5, 40)) == (10, 60)
    assert delta((3, 10), (5, 40)) == (3, 10)  # the NF left its attach point and came back
    assert delta(None, (1, 1)) == (0, 0)


def test_nfctl_validate_refuses_a_bad_policy_with_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "rollout.yaml").write_text(policy_yaml().replace("bake: 1s", "bake: later", 1))
    out = subprocess.run(
        [sys.executable, "-m", "nfctl", "validate", str(tmp_path), "--no-compile", "-o", "json"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert '"file": "rollout.yaml"' in out.stdout and '"line": 12' in out.stdout, out.stdout


def test_a_policy_in_an_nf_manifest_is_pointed_to_rollout_yaml(tmp_path: Path) -> None:
    from nfctl.manifest.loader import load_manifest

    (tmp_path / "nf.yaml").write_text(policy_yaml())
    loaded = load_manifest(tmp_path / "nf.yaml", tmp_path)
    assert [str(d) for d in loaded.diagnostics] == [
        "nf.yaml:2 [kind]: error: a RolloutPolicy goes in rollout.yaml at the root of the "
        "folder the fleet follows, not in an NF manifest (docs/rollouts.md)"
    ]
