"""Rates for `nfctl top --agent`, computed from two scrapes of agents' /metrics: per node and NF,
each counter the NF exports (nfctl_nf_*, per map key) as a rate per second, next to the NF's
state and revision. Pure: the scraping lives in nfctl/cli/top_cmd.py."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from prometheus_client.parser import text_string_to_metric_families

Series = tuple[str, str, str]  # metric, nf, key


@dataclass(frozen=True)
class Scrape:
    node: str
    at: float  # time.monotonic() when the scrape returned
    counters: dict[Series, float]  # NF-exported counters
    functions: dict[str, tuple[str, str, str]]  # nf -> (state, version, revision)
    error: str = ""
    wall: float = 0.0  # time.time() at the same moment: says which window a rate covers


@dataclass(frozen=True)
class Row:
    node: str
    nf: str
    state: str
    revision: str
    metric: str
    key: str
    rate: float  # per second
    total: float
    since: float  # the window, unix seconds
    until: float

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


SORT_KEYS = ("rate", "node", "nf")


def parse(node: str, at: float, text: str, wall: float = 0.0) -> Scrape:
    counters: dict[Series, float] = {}
    functions: dict[str, tuple[str, str, str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if family.type == "counter" and sample.name.startswith("nfctl_nf_"):
                if sample.name.endswith("_total"):
                    series = (sample.name, labels.get("nf", ""), labels.get("key", ""))
                    counters[series] = float(sample.value)
            elif sample.name == "nfctl_agent_function_info":
                functions[labels["nf"]] = (labels["state"], labels["version"], labels["revision"])
    return Scrape(node, at, counters, functions, wall=wall)


def rates(before: Scrape, after: Scrape) -> list[Row]:
    """One row per counter series present in both scrapes. A counter that went down (the NF
    was replaced with a fresh map) has no rate yet: it shows 0 until the next sample."""
    seconds = after.at - before.at
    rows: list[Row] = []
    for series, now in after.counters.items():
        metric, nf, key = series
        was = before.counters.get(series)
        delta = now - was if was is not None and now >= was else 0.0
        state, _, revision = after.functions.get(nf, ("-", "", "-"))
        rate = delta / seconds if seconds > 0 else 0.0
        rows.append(
            Row(after.node, nf, state, revision, metric, key, rate, now, before.wall, after.wall)
        )
    return rows


def select(rows: list[Row], nf: str | None, sort: str) -> list[Row]:
    chosen = [r for r in rows if nf is None or r.nf == nf]
    if sort == "rate":
        return sorted(chosen, key=lambda r: (-r.rate, r.node, r.nf, r.metric, r.key))
    if sort == "node":
        return sorted(chosen, key=lambda r: (r.node, r.nf, r.metric, r.key))
    return sorted(chosen, key=lambda r: (r.nf, r.node, r.metric, r.key))
