"""The promql gate: an instant query against a real Prometheus, judged into a GateResult
(see gates.py for what `ok` None means). The one gate whose evaluation is an effect."""

from __future__ import annotations

import math
import time

import aiohttp

from nfctl.controller.rollout.gates import Outcome, result
from nfctl.manifest.rollout import PromQLGate

PROMQL_TIMEOUT = 5.0


async def promql_gate(
    gate: PromQLGate, default_url: str | None, session: aiohttp.ClientSession
) -> Outcome:
    url = gate.url or default_url
    now = time.time()
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
        return Outcome(result(gate, now, ok=False, message=message, threshold=threshold), False)
    try:
        async with session.get(
            url.rstrip("/") + "/api/v1/query",
            params={"query": gate.query},
            timeout=aiohttp.ClientTimeout(total=PROMQL_TIMEOUT),
        ) as response:
            body = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        message = f"Prometheus {url} did not answer: {exc or type(exc).__name__}"
        return Outcome(result(gate, now, ok=False, message=message, threshold=threshold), None)
    if not isinstance(body, dict) or body.get("status") != "success":
        error = body.get("error") if isinstance(body, dict) else str(body)[:200]
        message = f"query {gate.query!r} failed: {error}"
        return Outcome(result(gate, now, ok=False, message=message, threshold=threshold), False)
    data = body.get("data") or {}
    values = _sample_values(data.get("resultType"), data.get("result"))
    if not values:
        message = f"query {gate.query!r} returned no samples"
        return Outcome(result(gate, now, ok=False, message=message, threshold=threshold), None)
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
    return Outcome(result(gate, now, ok=ok, message=message, value=shown, threshold=threshold), ok)


def _sample_values(kind: object, result: object) -> list[float]:
    try:
        if kind == "scalar" and isinstance(result, list):
            return [float(result[1])]
        if kind == "vector" and isinstance(result, list):
            return [float(sample["value"][1]) for sample in result]
    except (KeyError, IndexError, TypeError, ValueError):
        return []
    return []
