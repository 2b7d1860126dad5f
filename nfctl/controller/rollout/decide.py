"""The rollout engine's decisions, pure: given a rollout as stored, the policy that judges
it, what the fleet reports and the gate results, the next step: the rollout and its
bookkeeping as they must be stored, the approvals to send and the events to emit. No
store, no network, no clock; the driver (engine.py) observes, calls these and applies.

A decision that needs an observation it was not given (every node's verdict figures,
the answer of a promql gate) returns only that need; the driver observes and decides
again with the answer added. The decision is a function of its inputs, so the second run
repeats the first up to that point and goes on."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.controller.rollout import gates as gate_eval
from nfctl.controller.rollout.plan import (
    NodeView,
    max_unavailable,
    next_approvals,
    node_view,
    unready,
    wave_settings,
)
from nfctl.controller.rollout.state import EVENT_NODE, Detail, Snapshot
from nfctl.controller.storage import StoredApproval
from nfctl.manifest.rollout import (
    Gate,
    OnFailure,
    PromQLGate,
    ReadyGate,
    RolloutPolicy,
    VerdictGate,
)


@dataclass(frozen=True)
class FleetView:
    """The fleet as one decision sees it: every node's latest status, which are connected."""

    statuses: Mapping[str, pb.NodeStatus]
    connected: frozenset[str]

    def views(self, names: Iterable[str] | None = None) -> dict[str, NodeView]:
        """Views without verdict figures (those are Inputs.figures): at 10,000 nodes a
        view of each one costs ~0.3 s."""
        chosen = self.statuses if names is None else [n for n in names if n in self.statuses]
        return {n: node_view(n, self.statuses[n], n in self.connected, ()) for n in chosen}


@dataclass(frozen=True)
class Inputs:
    now: float
    policy: RolloutPolicy | None  # the policy judging the rollout (None: gone)
    fleet: FleetView
    author: str = ""  # of the rollout's revision, for its events
    commit_time: float = 0.0
    figures: Snapshot | None = None  # of gate_nfs(policy); None: not observed yet
    promql: Mapping[PromQLGate, gate_eval.Outcome] | None = None


@dataclass
class Decision:
    rollout: pb.Rollout
    detail: Detail
    approvals: list[StoredApproval] = field(default_factory=list)
    events: list[pb.Event] = field(default_factory=list)
    changed: bool = False
    evaluated: list[gate_eval.Outcome] = field(default_factory=list)  # gates judged
    halted_by: str = ""  # the gate that stopped the rollout in this step
    need_figures: bool = False
    need_promql: tuple[PromQLGate, ...] = ()

    @property
    def needs(self) -> bool:
        return self.need_figures or bool(self.need_promql)

    @property
    def empty(self) -> bool:
        return not self.changed and not self.approvals and not self.events


class _Need(Exception):
    def __init__(self, figures: bool, promql: tuple[PromQLGate, ...]) -> None:
        super().__init__("observation needed")
        self.figures = figures
        self.promql = promql


def gate_nfs(policy: RolloutPolicy | None) -> frozenset[str]:
    """The NFs the policy's verdict gates judge: the figures a decision may need."""
    if policy is None:
        return frozenset()
    waves = range(len(policy.spec.waves))
    gates = [*policy.spec.gates, *(g for i in waves for g in policy.gates_of(i))]
    return frozenset(g.nf for g in gates if isinstance(g, VerdictGate))


def run(
    rollout: pb.Rollout, detail: Detail, inputs: Inputs, body: Callable[[Step], None]
) -> Decision:
    """`body` applied to copies of the rollout and its detail; the stored ones stay."""
    copy = pb.Rollout()
    copy.CopyFrom(rollout)
    step = Step(Decision(copy, detail.copy()), inputs)
    try:
        body(step)
    except _Need as need:
        return Decision(rollout, detail, need_figures=need.figures, need_promql=need.promql)
    return step.decision


def advance(rollout: pb.Rollout, detail: Detail, inputs: Inputs) -> Decision:
    """The next step of a Progressing rollout."""
    return run(rollout, detail, inputs, Step.drive)


class Step:
    """One decision being made: the rollout and detail it changes, the inputs it reads."""

    def __init__(self, decision: Decision, inputs: Inputs) -> None:
        self.decision = decision
        self.rollout = decision.rollout
        self.detail = decision.detail
        self.inputs = inputs
        self.now = inputs.now

    # -- observations -----------------------------------------------------------------------
    def figures(self, evaluating: Iterable[Gate] = ()) -> Snapshot:
        """The figures of the gates' NFs (none needed: {}), raising what is missing."""
        nfs = gate_nfs(self.inputs.policy)
        promql = self.inputs.promql or {}
        missing = tuple(g for g in evaluating if isinstance(g, PromQLGate) and g not in promql)
        need_figures = bool(nfs) and self.inputs.figures is None
        if need_figures or missing:
            raise _Need(need_figures, missing)
        return (self.inputs.figures or {}) if nfs else {}

    # -- waves ------------------------------------------------------------------------------
    def drive(self) -> None:
        policy, rollout = self.inputs.policy, self.rollout
        if policy is None:
            self.finish("the policy in force is gone")
            return
        while rollout.state == "Progressing" and rollout.current_wave < len(rollout.waves):
            if not self.drive_wave(policy, rollout.waves[rollout.current_wave]):
                return
            rollout.current_wave += 1
        if rollout.state == "Progressing":
            self.finish("every wave passed")

    def drive_wave(self, policy: RolloutPolicy, wave: pb.RolloutWave) -> bool:
        """Advance one wave; True when it passed (go on with the next)."""
        rollout, detail, now, decision = self.rollout, self.detail, self.now, self.decision
        nodes = list(wave.nodes)
        views = self.inputs.fleet.views(nodes)
        bake, gates = wave_settings(policy, wave.index)
        if any(not isinstance(g, ReadyGate) for g in gates):
            # a gate on what the datapath did needs at least one interval of it to judge
            bake = max(bake, policy.spec.interval)
        if wave.state == "Pending":
            detail.wave_start = self.figures()
            wave.state, wave.started_at, decision.changed = "Progressing", now, True
            self.event(
                "Normal", "WaveStarted",
                f"wave {wave.index + 1}/{len(rollout.waves)} {wave.name}: "
                f"{', '.join(nodes) or 'no nodes'}",
            )  # fmt: skip
        if not nodes:
            wave.state, wave.finished_at, decision.changed = "Passed", now, True
            return True
        if wave.state == "Progressing":
            limit = max_unavailable(policy, len(nodes))
            for node in next_approvals(nodes, set(detail.approved), views, rollout.revision, limit):
                detail.approved[node] = wave.index
                reason = f"wave {wave.index + 1} of {len(rollout.waves)} ({wave.name})"
                decision.approvals.append(
                    StoredApproval(node, rollout.revision, rollout.id, wave.index, reason, now)
                )
            if not unready(nodes, views, rollout.revision):
                detail.bake_start = self.figures()
                wave.state, decision.changed = "Baking", True
                detail.bake_started, detail.last_eval = now, 0.0
            elif now - wave.started_at > policy.spec.progress_deadline:
                ready = gate_eval.ready_gate(
                    ReadyGate(kind="ready"), nodes, views, rollout.revision, now
                )
                ready.result.message += (
                    f" within progressDeadline {policy.spec.progress_deadline:g} s"
                )
                set_gate(wave, ready.result)
                decision.evaluated.append(ready)
                self.fail(policy, wave, ready.result)
                return False
            else:
                return False
        if wave.state != "Baking":
            return False
        baked = now - detail.bake_started >= bake
        first_after_bake = baked and detail.last_eval < detail.bake_started + bake
        if now - detail.last_eval < policy.spec.interval and not first_after_bake:
            return False
        outcomes = self.evaluate(gates, nodes, views)
        detail.last_eval, decision.changed = now, True
        for outcome in outcomes:
            set_gate(wave, outcome.result)
        decision.evaluated.extend(outcomes)
        failed = next((o for o in outcomes if o.ok is False), None)
        # waiting for traffic may go on past the bake time up to the progress deadline
        deadline = policy.spec.progress_deadline
        waited_out = now - wave.started_at > deadline
        if failed is None and baked:
            failed = next(
                (o for o in outcomes if o.ok is None and (waited_out or not o.waiting)), None
            )
            if failed is not None and failed.waiting:
                failed.result.message += f" within progressDeadline {deadline:g} s"
                set_gate(wave, failed.result)
        if failed is not None:
            self.fail(policy, wave, failed.result)
            return False
        if not baked or any(o.ok is None for o in outcomes):
            return False
        wave.state, wave.finished_at = "Passed", now
        self.event(
            "Normal", "WavePassed",
            f"wave {wave.index + 1} {wave.name} passed after {bake:g} s bake: "
            + "; ".join(o.result.message for o in outcomes),
        )  # fmt: skip
        return True

    def evaluate(
        self, gates: list[Gate], nodes: list[str], views: dict[str, NodeView]
    ) -> list[gate_eval.Outcome]:
        figures = self.figures(gates)
        fleet, detail, revision = self.inputs.fleet, self.detail, self.rollout.revision
        updated = set(detail.approved)
        others = [n for n in fleet.statuses if n in fleet.connected and n not in updated]
        out = []
        for gate in gates:
            if isinstance(gate, ReadyGate):
                out.append(gate_eval.ready_gate(gate, nodes, views, revision, self.now))
            elif isinstance(gate, VerdictGate):
                out.append(
                    gate_eval.verdict_gate(
                        gate,
                        nodes,
                        others,
                        figures,
                        detail.bake_start,
                        detail.rollout_start,
                        detail.wave_start,
                        self.now,
                    )
                )
            else:
                answered = (self.inputs.promql or {})[gate]
                result = pb.GateResult()
                result.CopyFrom(answered.result)
                out.append(gate_eval.Outcome(result, answered.ok, answered.waiting))
        return out

    # -- outcomes ---------------------------------------------------------------------------
    def fail(self, policy: RolloutPolicy, wave: pb.RolloutWave, gate: pb.GateResult) -> None:
        rollout, decision = self.rollout, self.decision
        wave.state, wave.finished_at, decision.changed = "Failed", self.now, True
        decision.halted_by = gate.name
        figures = (
            f" (value {gate.value:g}, threshold {gate.threshold:g}, baseline {gate.baseline:g})"
        )
        self.event(
            "Warning", "GateFailed",
            f"wave {wave.index + 1} {wave.name}: gate {gate.name} ({gate.kind}) failed: "
            f"{gate.message}{figures if gate.kind == 'verdict' else ''}",
        )  # fmt: skip
        if policy.spec.on_failure is OnFailure.ROLLBACK:
            self.roll_back(f"gate {gate.name} failed")
            wave.state = "RolledBack"
            rollout.state = "RolledBack"
            rollout.message = f"wave {wave.name}: gate {gate.name} failed; rolled back"
        else:
            rollout.state = "Halted"
            rollout.message = f"wave {wave.name}: gate {gate.name} failed; halted (onFailure pause)"

    def roll_back(self, why: str) -> None:
        rollout, detail = self.rollout, self.detail
        nodes = sorted(n for n in detail.approved if n not in detail.rolled_back)
        target = rollout.previous_revision
        if not target:
            return
        for node in nodes:
            self.decision.approvals.append(
                StoredApproval(
                    node, target, rollout.id, rollout.current_wave, f"rollback: {why}", self.now
                )
            )
        detail.rolled_back.extend(nodes)
        self.event(
            "Warning", "RolledBack",
            f"{len(nodes)} nodes approved {target[:12]} again ({why}): {', '.join(nodes)}",
        )  # fmt: skip

    def finish(self, why: str) -> None:
        rollout, detail, decision = self.rollout, self.detail, self.decision
        rollout.state, rollout.message, decision.changed = "Completed", why, True
        stragglers = [n for n in sorted(self.inputs.fleet.statuses) if n not in detail.approved]
        for node in stragglers:  # joined during the rollout, or offline at its start
            decision.approvals.append(
                StoredApproval(
                    node,
                    rollout.revision,
                    rollout.id,
                    len(rollout.waves),
                    "rollout completed",
                    self.now,
                )
            )
            detail.approved[node] = len(rollout.waves)
        self.event(
            "Normal", "RolloutCompleted",
            f"{rollout.revision[:12]} completed ({why}); {len(stragglers)} more nodes approved",
        )  # fmt: skip

    def approve_all(self, revision: str, reason: str) -> None:
        rollout = self.rollout
        for name in sorted(self.inputs.fleet.statuses):
            self.decision.approvals.append(
                StoredApproval(name, revision, rollout.id, len(rollout.waves), reason, self.now)
            )

    def event(self, kind: str, reason: str, message: str) -> None:
        self.detail.events += 1
        self.decision.events.append(
            pb.Event(
                node=EVENT_NODE,
                epoch=self.rollout.id,
                sequence=self.detail.events,
                time=self.now,
                type=kind,
                reason=reason,
                revision=self.rollout.revision,
                author=self.inputs.author,
                commit_time=self.inputs.commit_time,
                message=message,
            )
        )


def set_gate(wave: pb.RolloutWave, result: pb.GateResult) -> None:
    for existing in wave.gates:
        if existing.name == result.name:
            existing.CopyFrom(result)
            return
    wave.gates.add().CopyFrom(result)
