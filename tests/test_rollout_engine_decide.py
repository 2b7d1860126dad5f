"""The rollout engine's decisions (nfctl/controller/rollout/decide.py, actions.py) as pure
functions: a rollout as stored, a fleet of node statuses, gate results in; the next step
out. No store, no network, no clock."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace

import pytest

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.controller.rollout import actions, decide
from nfctl.controller.rollout.decide import Decision, FleetView, Inputs
from nfctl.controller.rollout.gates import Outcome
from nfctl.controller.rollout.gitrepo import PolicyAt
from nfctl.controller.rollout.state import Detail, RolloutError
from nfctl.manifest.rollout import PromQLGate, RolloutPolicy, parse_policy
from tests.rollout_sim import NF, policy_yaml

OLD, NEW = "a" * 40, "b" * 40
NODES = {"node-a": "canary", "node-b": "worker", "node-c": "worker", "node-d": "worker"}
T0 = 1_000_000.0


def policy_of(**options: str) -> RolloutPolicy:
    policy, problems = parse_policy(policy_yaml(**options), "rollout.yaml")
    assert policy is not None, [str(p) for p in problems]
    return policy


def status(name: str, applied: str, packets: int = 0, dropped: int = 0) -> pb.NodeStatus:
    return pb.NodeStatus(
        node=name,
        labels={"role": NODES[name]},
        last_applied_revision=applied,
        conditions=[pb.Condition(type="Ready", status=True)],
        functions=[
            pb.FunctionStatus(
                name=NF,
                state="Applied",
                revision=applied,
                verdicts=pb.VerdictTotals(
                    enforce=pb.Verdicts(passed=packets - dropped, dropped=dropped)
                ),
            )
        ],
    )


class World:
    """A fleet whose statuses a test moves forward, and the stored rollout it decides on."""

    def __init__(self, policy: RolloutPolicy) -> None:
        self.policy = policy
        self.statuses = {n: status(n, OLD) for n in NODES}
        self.rollout = pb.Rollout()
        self.detail = Detail()
        self.stored: list[Decision] = []

    def inputs(self, now: float, promql: Mapping[PromQLGate, Outcome] | None = None) -> Inputs:
        fleet = FleetView(dict(self.statuses), frozenset(self.statuses))
        return Inputs(now, self.policy, fleet, "Ada", T0, None, promql)

    def observe(self, decision: Decision, inputs: Inputs) -> Inputs:
        """What the driver does for a decision that needs figures: read them, decide again."""
        assert decision.need_figures and not decision.need_promql, decision
        return self.with_figures(inputs)

    def with_figures(self, inputs: Inputs) -> Inputs:
        figures = {
            n: {NF: (s.functions[0].verdicts.enforce.dropped, packets(s))}
            for n, s in inputs.fleet.statuses.items()
        }
        return replace(inputs, figures=figures)

    def decided(self, make: Callable[[Inputs], Decision], inputs: Inputs) -> Decision:
        decision = make(inputs)
        if decision.needs:
            decision = make(self.observe(decision, inputs))
        assert not decision.needs
        return decision

    def start(self, now: float) -> Decision:
        in_force = PolicyAt("rollout.yaml", self.policy)
        at_head = PolicyAt("rollout.yaml", self.policy)

        def make(i: Inputs) -> Decision:
            started = actions.start(NEW, OLD, in_force, OLD, at_head, "r1", i)
            assert started is not None
            return started

        return self.store(self.decided(make, self.inputs(now)))

    def advance(self, now: float, **kw: Mapping[PromQLGate, Outcome]) -> Decision:
        rollout, detail = self.rollout, self.detail
        return self.store(
            self.decided(lambda i: decide.advance(rollout, detail, i), self.inputs(now, **kw))
        )

    def act(self, action: str, now: float) -> Decision:
        rollout, detail = self.rollout, self.detail
        return self.store(
            self.decided(
                lambda i: actions.act(action, "test", rollout, detail, i, True), self.inputs(now)
            )
        )

    def store(self, decision: Decision) -> Decision:
        """Persist as the store does (bytes and JSON) and deliver the approvals: each
        approved node runs what it was approved."""
        self.rollout = pb.Rollout.FromString(decision.rollout.SerializeToString())
        self.detail = Detail.load(decision.detail.dump())
        for approval in decision.approvals:
            self.statuses[approval.node] = status(approval.node, approval.revision)
        self.stored.append(decision)
        return decision

    def traffic(self, packets: int, drop_share: Mapping[str, float]) -> None:
        """Every node counts `packets` more, dropping the share its revision drops."""
        for name, s in self.statuses.items():
            revision = s.last_applied_revision
            before = s.functions[0].verdicts.enforce
            total = before.passed + before.dropped + packets
            dropped = before.dropped + round(packets * drop_share.get(revision, 0.01))
            self.statuses[name] = status(name, revision, total, dropped)


def packets(s: pb.NodeStatus) -> int:
    v = s.functions[0].verdicts.enforce
    return v.passed + v.dropped


def reasons(decision: Decision) -> list[str]:
    return [e.reason for e in decision.events]


def test_a_rollout_starts_with_the_canary_wave_and_approves_only_it() -> None:
    world = World(policy_of(bake="10s"))
    first = world.start(T0)
    assert first.rollout.state == "Progressing"
    assert [list(w.nodes) for w in first.rollout.waves] == [
        ["node-a"],
        ["node-b", "node-c"],
        ["node-d"],
    ]
    assert reasons(first) == ["RolloutStarted", "WaveStarted"]
    assert [(a.node, a.revision, a.wave) for a in first.approvals] == [("node-a", NEW, 0)]
    assert first.rollout.waves[0].state == "Progressing"
    assert all(e.author == "Ada" and e.time == T0 for e in first.events)


def test_a_decision_needing_figures_asks_for_them_and_changes_nothing() -> None:
    world = World(policy_of())
    world.start(T0)
    stored = world.rollout.SerializeToString()
    asked = decide.advance(world.rollout, world.detail, world.inputs(T0 + 1))
    assert asked.need_figures and asked.empty
    assert world.rollout.SerializeToString() == stored  # the stored rollout is not touched


def test_a_wave_bakes_for_its_bake_time_and_then_passes() -> None:
    world = World(policy_of(bake="10s", interval="2s"))
    world.start(T0)
    baking = world.advance(T0 + 1)  # the canary runs NEW now
    assert baking.rollout.waves[0].state == "Baking" and not baking.approvals
    world.traffic(1000, {})
    waiting = world.advance(T0 + 1.5)  # within one interval: nothing to do
    assert waiting.empty
    judged = world.advance(T0 + 4)  # an interval later: judged, still baking
    assert judged.rollout.waves[0].state == "Baking"
    assert {o.result.kind: o.ok for o in judged.evaluated} == {"ready": True, "verdict": True}
    world.traffic(1000, {})
    passed = world.advance(T0 + 11.5)
    assert passed.rollout.waves[0].state == "Passed"
    assert reasons(passed) == ["WavePassed", "WaveStarted"]
    assert [a.node for a in passed.approvals] == ["node-b", "node-c"]
    assert passed.rollout.current_wave == 1


@pytest.mark.parametrize("on_failure", ["rollback", "pause"])
def test_a_failed_verdict_gate_halts_and_rolls_back_or_pauses(on_failure: str) -> None:
    world = World(policy_of(bake="10s", interval="1s", on_failure=on_failure))
    world.start(T0)
    world.advance(T0 + 1)
    world.traffic(1000, {NEW: 0.3})
    failed = world.advance(T0 + 3)
    assert failed.halted_by == f"verdict-{NF}"
    canary = failed.rollout.waves[0]
    verdict = next(g for g in canary.gates if g.kind == "verdict")
    assert not verdict.ok and verdict.value == pytest.approx(0.3) and verdict.baseline < 0.02
    assert "GateFailed" in reasons(failed)
    if on_failure == "rollback":
        assert failed.rollout.state == "RolledBack" and canary.state == "RolledBack"
        assert [(a.node, a.revision) for a in failed.approvals] == [("node-a", OLD)]
        assert reasons(failed)[-1] == "RolledBack"
    else:
        assert failed.rollout.state == "Halted" and canary.state == "Failed"
        assert failed.approvals == []
    # no further node was ever approved the harmful revision
    approved_new = {a.node for d in world.stored for a in d.approvals if a.revision == NEW}
    assert approved_new == {"node-a"}


def test_nodes_not_ready_by_the_progress_deadline_fail_the_ready_gate() -> None:
    world = World(policy_of(deadline="20s"))
    world.start(T0)
    world.statuses["node-a"] = status("node-a", OLD)  # the canary never takes NEW
    assert not world.advance(T0 + 19).changed  # still within the deadline
    failed = world.advance(T0 + 21)
    ready = next(g for g in failed.rollout.waves[0].gates if g.kind == "ready")
    assert not ready.ok and "node-a" in ready.message
    assert "within progressDeadline 20 s" in ready.message
    assert failed.rollout.state == "RolledBack" and failed.halted_by == "ready"


def test_an_undecided_promql_gate_waits_while_baking_and_fails_closed_at_its_end() -> None:
    gates = '    - kind: promql\n      name: errors\n      query: "up"\n      max: 0.1\n'
    world = World(policy_of(bake="4s", interval="1s", gates=gates))
    gate = world.policy.spec.gates[0]
    assert isinstance(gate, PromQLGate)
    world.start(T0)
    asked = decide.advance(world.rollout, world.detail, world.with_figures(world.inputs(T0 + 1)))
    assert asked.need_promql == (gate,) and asked.empty  # the driver asks Prometheus
    silent = Outcome(pb.GateResult(name="errors", kind="promql", message="no samples"), None)
    waiting = world.advance(T0 + 1, promql={gate: silent})
    assert waiting.rollout.state == "Progressing" and waiting.rollout.waves[0].state == "Baking"
    assert [o.ok for o in waiting.evaluated if o.result.kind == "promql"] == [None]
    failed = world.advance(T0 + 6, promql={gate: silent})
    assert failed.rollout.state == "RolledBack" and failed.halted_by == "errors"


def test_a_newer_commit_is_queued_until_the_rollout_ends_and_never_repeated() -> None:
    active = pb.Rollout(id="r1", revision=NEW, state="Progressing")
    newer = "c" * 40
    assert not actions.should_start(newer, [active])  # queued
    active.state = "Completed"
    assert actions.should_start(newer, [active])  # now it starts
    rolled_back = pb.Rollout(id="r2", revision=newer, state="RolledBack")
    assert not actions.should_start(newer, [rolled_back, active])  # never again by itself


def test_promote_passes_the_wave_and_starts_the_next() -> None:
    world = World(policy_of(bake="60s"))
    world.start(T0)
    world.advance(T0 + 1)
    promoted = world.act("promote", T0 + 2)
    assert promoted.rollout.waves[0].state == "Passed"
    assert promoted.rollout.current_wave == 1
    assert reasons(promoted) == ["RolloutPromote", "WaveStarted"]
    assert [a.node for a in promoted.approvals] == ["node-b", "node-c"]


def test_abort_rolls_every_approved_node_back_and_nothing_else_applies() -> None:
    world = World(policy_of(bake="60s"))
    world.start(T0)
    world.advance(T0 + 1)
    world.act("promote", T0 + 2)
    aborted = world.act("abort", T0 + 3)
    assert aborted.rollout.state == "Aborted"
    assert sorted((a.node, a.revision) for a in aborted.approvals) == [
        ("node-a", OLD),
        ("node-b", OLD),
        ("node-c", OLD),
    ]
    for action in actions.ACTIONS:
        with pytest.raises(RolloutError, match="Aborted: nothing to"):
            world.act(action, T0 + 4)
    assert decide.advance(world.rollout, world.detail, world.inputs(T0 + 5)).rollout.state == (
        "Aborted"
    )


def test_pause_holds_and_resume_after_a_halt_bakes_the_wave_again() -> None:
    world = World(policy_of(bake="5s", interval="1s", on_failure="pause"))
    world.start(T0)
    world.advance(T0 + 1)
    world.traffic(1000, {NEW: 0.3})
    assert world.advance(T0 + 3).rollout.state == "Halted"
    with pytest.raises(RolloutError, match="not Progressing"):
        world.act("pause", T0 + 4)
    resumed = world.act("resume", T0 + 10)
    wave = resumed.rollout.waves[0]
    assert resumed.rollout.state == "Progressing" and wave.state == "Baking"
    assert resumed.detail.bake_started == T0 + 10  # judged again from now on


def test_deciding_again_from_the_stored_state_never_repeats_a_step() -> None:
    """A restarted controller decides from what was stored: on the same fleet at the same
    moment it approves nothing again, and the rollout approves each node once and starts
    each wave once."""
    world = World(policy_of(bake="2s", interval="1s"))
    world.start(T0)
    now = T0
    while world.rollout.state == "Progressing" and now < T0 + 60:
        now += 0.5
        world.traffic(100, {})
        world.advance(now)
        # a new leader, on the stored state at the same moment, has nothing to add
        again = decide.advance(world.rollout, world.detail, world.with_figures(world.inputs(now)))
        assert not again.approvals and "WaveStarted" not in reasons(again), again
    assert world.rollout.state == "Completed"
    approvals = [(a.node, a.revision) for d in world.stored for a in d.approvals]
    assert sorted(approvals) == sorted((n, NEW) for n in NODES)
    started = [e.message.split(":")[0] for d in world.stored for e in d.events]
    assert sum("wave" in s and "/" in s for s in started) == 3
    sequences = [e.sequence for d in world.stored for e in d.events]
    assert sequences == list(range(1, len(sequences) + 1))
