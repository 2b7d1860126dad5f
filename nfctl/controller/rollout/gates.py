"""Judging a wave's gates into GateResults from what the controller holds: ready (node
status) and verdict (datapath counters in node status). Pure; the promql gate, which asks
Prometheus, is in promql.py.

A result's `ok` is True, False (a definite failure: the rollout halts at once) or None
(not decided: no data yet, Prometheus unreachable); a gate still undecided when the bake
time is over fails (fail closed)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.controller.rollout.plan import (
    Figures,
    NodeView,
    judge_verdicts,
    on_revision,
    summed,
)
from nfctl.manifest.rollout import PromQLGate, ReadyGate, VerdictGate, gate_name


@dataclass
class Outcome:
    result: pb.GateResult
    ok: bool | None
    # undecided for want of traffic: may wait past the bake time up to the progress deadline
    waiting: bool = False


def result(
    gate: ReadyGate | VerdictGate | PromQLGate, now: float, **fields: object
) -> pb.GateResult:
    return pb.GateResult(
        name=gate_name(gate),
        kind=gate.kind,
        evaluated_at=now,
        **fields,  # type: ignore[arg-type]
    )


def ready_gate(
    gate: ReadyGate, wave: list[str], views: Mapping[str, NodeView], revision: str, now: float
) -> Outcome:
    failing = [
        f"{n} ({', '.join(views[n].failing)})" for n in wave if n in views and views[n].failing
    ]
    if failing:
        message = f"NFs in error on {', '.join(failing)}"
        return Outcome(result(gate, now, ok=False, message=message, value=len(failing)), False)
    behind = [n for n in wave if n not in views or not on_revision(views[n], revision)]
    if behind:
        shown = ", ".join(
            f"{n} (applied {views[n].applied[:12] or 'nothing'}"
            f"{'' if views[n].connected else ', disconnected'})"
            if n in views
            else f"{n} (unknown)"
            for n in behind[:10]
        )
        message = f"{len(behind)}/{len(wave)} nodes not Ready on {revision[:12]}: {shown}"
        return Outcome(result(gate, now, ok=False, message=message, value=len(behind)), None)
    message = f"{len(wave)}/{len(wave)} nodes Ready on {revision[:12]}, no NF in error"
    return Outcome(result(gate, now, ok=True, message=message, value=0), True)


def verdict_gate(
    gate: VerdictGate,
    wave: list[str],
    others: list[str],
    figures: Mapping[str, Mapping[str, Figures]],
    bake_start: Mapping[str, Mapping[str, Figures]],
    rollout_start: Mapping[str, Mapping[str, Figures]],
    wave_start: Mapping[str, Mapping[str, Figures]],
    now: float,
) -> Outcome:
    """Wave nodes since the bake began vs. the nodes not yet updated over the same window;
    without those, the wave nodes from the rollout's start to their update. Waiting for
    data (undecided) until they saw the gate's minPackets."""
    judged = judge_verdicts(
        gate.nf,
        gate.max_increase,
        wave=summed(wave, gate.nf, figures, bake_start),
        others=summed(others, gate.nf, figures, bake_start),
        pre_update=summed(wave, gate.nf, wave_start, rollout_start),
        min_packets=gate.min_packets,
    )
    waiting = judged.ok is None
    judgement = result(
        gate,
        now,
        ok=bool(judged.ok),
        message=f"verdict gate {gate_name(gate)}: {judged.message}" if waiting else judged.message,
        value=judged.value,
        threshold=judged.threshold,
        baseline=judged.baseline,
    )
    return Outcome(judgement, judged.ok, waiting)
