"""Rates for `nfctl top`, from the node statuses the controller holds: per node and NF,
packets/s, drops/s and verdict shares from the NF's verdict counters (in monitor mode: what
the NF would have done), chain errors/s, state and applied revision.

A rate is the difference of two status snapshots of the node divided by the time between
them on the agent's clock (observed_at, stamped when the counters were read), so it covers
the agent's reporting window whatever the viewer's refresh. Pure: the polling lives in
nfctl/cli/top_cmd.py."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from nfctl.wire.status import NodeStatus, Verdicts

Key = tuple[str, str]  # node, nf
VERDICTS = ("passed", "dropped", "redirected", "other")
SORT_KEYS = ("rate", "drops", "node", "nf")


@dataclass(frozen=True)
class Sample:
    """One NF on one node, as the controller last heard of it."""

    node: str
    nf: str
    state: str
    mode: str  # enforce | monitor
    revision: str
    error: str  # the NF's last error, "" when none
    at: float  # the agent's observed_at of this status
    counts: Verdicts | None  # the verdicts of the NF's mode; None before it was chained
    chain_errors: int


@dataclass(frozen=True)
class Row:
    node: str
    nf: str
    state: str
    mode: str
    revision: str
    error: str
    packets_per_second: float | None  # None: no two snapshots to compare yet
    drops_per_second: float | None
    chain_errors_per_second: float | None
    shares: dict[str, float] | None  # verdict -> fraction of the window's packets
    window: float | None  # seconds between the two snapshots
    since: float | None  # the window on the agent's clock, unix seconds
    until: float | None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def samples(statuses: Iterable[NodeStatus]) -> dict[Key, Sample]:
    out: dict[Key, Sample] = {}
    for status in statuses:
        for nf in status.functions:
            mode = nf.mode or "enforce"
            verdicts = nf.verdicts
            counts = None
            if verdicts is not None:
                counts = verdicts.monitor if mode == "monitor" else verdicts.enforce
            error = nf.last_error
            out[(status.node, nf.name)] = Sample(
                node=status.node,
                nf=nf.name,
                state=nf.state.value,
                mode=mode,
                revision=nf.revision or "",
                error=f"{error.file}:{error.line} {error.message}"
                if error and error.file and error.line
                else (error.message if error else ""),
                at=status.observed_at,
                counts=counts,
                chain_errors=verdicts.chain_errors if verdicts else 0,
            )
    return out


def rate_row(before: Sample | None, after: Sample) -> Row:
    """The rates between two snapshots of one NF. None (no rate) when there is no earlier
    snapshot, it is not older, or a counter went down (counters reset when an NF left its
    attach points, or a mode switch changed which counters are read)."""
    window = after.at - before.at if before is not None else 0.0
    rates: dict[str, float] | None = None
    errors: float | None = None
    if (
        before is not None
        and window > 0
        and before.counts is not None
        and after.counts is not None
        and before.mode == after.mode
    ):
        deltas = {v: getattr(after.counts, v) - getattr(before.counts, v) for v in VERDICTS}
        chain = after.chain_errors - before.chain_errors
        if min(deltas.values()) >= 0 and chain >= 0:
            rates = {v: d / window for v, d in deltas.items()}
            errors = chain / window
    total = sum(rates.values()) if rates is not None else None
    shares = None
    if rates is not None and total:
        shares = {v: r / total for v, r in rates.items()}
    return Row(
        node=after.node,
        nf=after.nf,
        state=after.state,
        mode=after.mode,
        revision=after.revision,
        error=after.error,
        packets_per_second=total,
        drops_per_second=rates["dropped"] if rates is not None else None,
        chain_errors_per_second=errors,
        shares=shares,
        window=window if rates is not None else None,
        since=before.at if rates is not None and before is not None else None,
        until=after.at if rates is not None else None,
    )


class RateTracker:
    """Rows for successive polls of the controller. Each NF's rate covers its snapshots of
    the last `span` seconds (at least the two newest), so figures are steady whatever the
    agents' reporting interval; a poll that brings no newer snapshot (agents report every
    few seconds, the viewer polls every second) keeps the last figures."""

    def __init__(self, span: float = 3.0) -> None:
        self.span = span
        self._history: dict[Key, deque[Sample]] = {}  # oldest first, distinct times

    def update(self, now: dict[Key, Sample]) -> list[Row]:
        rows = []
        for key, sample in now.items():
            history = self._history.setdefault(key, deque())
            if history and sample.at < history[-1].at:  # the agent's clock went back
                history.clear()
            if not history or sample.at > history[-1].at:
                history.append(sample)
            while len(history) > 2 and history[0].at < sample.at - self.span:
                history.popleft()
            before = history[0] if len(history) > 1 else None
            rows.append(rate_row(before, history[-1]))
        for key in set(self._history) - set(now):  # NF gone from the node, or node gone
            del self._history[key]
        return rows


def select(rows: list[Row], nf: str | None, sort: str) -> list[Row]:
    chosen = [r for r in rows if nf is None or r.nf == nf]

    def rate(value: float | None) -> float:
        return -(value if value is not None else -1.0)  # no rate yet sorts last

    if sort == "rate":
        return sorted(chosen, key=lambda r: (rate(r.packets_per_second), r.node, r.nf))
    if sort == "drops":
        return sorted(chosen, key=lambda r: (rate(r.drops_per_second), r.node, r.nf))
    if sort == "node":
        return sorted(chosen, key=lambda r: (r.node, r.nf))
    return sorted(chosen, key=lambda r: (r.nf, r.node))
