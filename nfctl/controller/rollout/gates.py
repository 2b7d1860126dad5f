"""Evaluating a wave's gates into GateResults: ready (node status), verdict (datapath
counters in node status), promql (an instant query against a real Prometheus).

A result's `ok` is True, False (a definite failure: the rollout halts at once) or None
(not decided: no data yet, Prometheus unreachable); a gate still undecided when the bake
time is over fails (fail closed)."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.controller.rollout.plan import (
    Figures,
    NodeView,
    judge_verdicts,
    on_revision,
    summed,
)
from nfctl.manifest.rollout import PromQLGate, ReadyGate, VerdictGate, gate_name

PROMQL_TIMEOUT = 5.0


@dataclass
class Outcome:
    result: pb.GateResult
    ok: bool | None


def _result(gate: ReadyGate | VerdictGate | PromQLGate, **fields: object) -> pb.GateResult:
    return pb.GateResult(
        name=gate_name(gate),
        kind=gate.kind,
        evaluated_at=time.time(),
        **fields,  # type: ignore[arg-type]
    )


def ready_gate(
    gate: ReadyGate, wave: list[str], views: Mapping[str, NodeView], revision: str
) -> Outcome:
    failing = [
        f"{n} ({', '.join(views[n].failing)})" for n in wave if n in views and views[n].failing
    ]
    if failing:
        message = f"NFs in error on {', '.join(failing)}"
        return Outcome(_result(gate, ok=False, message=message, value=len(failing)), False)
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
        return Outcome(_result(gate, ok=False, message=message, value=len(behind)), None)
    message = f"{len(wave)}/{len(wave)} nodes Ready on {revision[:12]}, no NF in error"
    return Outcome(_result(gate, ok=True, message=message, value=0), True)


def verdict_gate(
    gate: VerdictGate,
    wave: list[str],
    others: list[str],
    now: Mapping[str, Mapping[str, Figures]],
    bake_start: Mapping[str, Mapping[str, Figures]],
    rollout_start: Mapping[str, Mapping[str, Figures]],
    wave_start: Mapping[str, Mapping[str, Figures]],
) -> Outcome:
    """Wave nodes since the bake began vs. the nodes not yet updated over the same window;
    without those, the wave nodes from the rollout's start to their update."""
    judged = judge_verdicts(
        gate.nf,
        gate.max_increase,
        wave=summed(wave, gate.nf, now, bake_start),
        others=summed(others, gate.nf, now, bake_start),
        pre_update=summed(wave, gate.nf, wave_start, rollout_start),
    )
    result = _result(
        gate,
        ok=judged.ok,
        message=judged.message,
        value=judged.value,
        threshold=judged.threshold,
        baseline=judged.baseline,
    )
    return Outcome(result, judged.ok)


async def promql_gate(
    gate: PromQLGate, default_url: str | None, session: aiohttp.ClientSession
) -> Outcome:
    url = gate.url or default_url
    bounds = " and ".join(
        part
        for part in (
            f">= {gate.min:g}" if gate.min is not None else "",
            f"<= {gate.max:g}" if gate.max is not None else "",
        )
        if part
    )
    threshold = gate.max if gate.max is not None else gate.min or 0.0
    if not url:
        message = "no Prometheus URL (set url in the gate or --prometheus-url)"
        return Outcome(_result(gate, ok=False, message=message, threshold=threshold), False)
    try:
        async with session.get(
            url.rstrip("/") + "/api/v1/query",
            params={"query": gate.query},
            timeout=aiohttp.ClientTimeout(total=PROMQL_TIMEOUT),
        ) as response:
            body = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        message = f"Prometheus {url} did not answer: {exc or type(exc).__name__}"
        return Outcome(_result(gate, ok=False, message=message, threshold=threshold), None)
    if not isinstance(body, dict) or body.get("status") != "success":
        error = body.get("error") if isinstance(body, dict) else str(body)[:200]
        message = f"query {gate.query!r} failed: {error}"
        return Outcome(_result(gate, ok=False, message=message, threshold=threshold), False)
    data = body.get("data") or {}
    values = _sample_values(data.get("resultType"), data.get("result"))
    if not values:
        message = f"query {gate.query!r} returned no samples"
        return Outcome(_result(gate, ok=False, message=message, threshold=threshold), None)
    bad = [
        v
        for v in values
        if math.isnan(v)
        or (gate.max is not None and v > gate.max)
        or (gate.min is not None and v < gate.min)
    ]
    shown = bad[0] if bad else (max(values) if gate.max is not None else min(values))
    ok = not bad
    message = (
        f"query {gate.query!r} = {shown:g}{f' ({len(values)} samples)' if len(values) > 1 else ''}"
        f"{'' if ok else ' not'} {bounds}"
    )
    return Outcome(_result(gate, ok=ok, message=message, value=shown, threshold=threshold), ok)


def _sample_values(kind: object, result: object) -> list[float]:
    try:
        if kind == "scalar" and isinstance(result, list):
            return [float(result[1])]
        if kind == "vector" and isinstance(result, list):
            return [float(sample["value"][1]) for sample in result]
    except (KeyError, IndexError, TypeError, ValueError):
        return []
    return []
