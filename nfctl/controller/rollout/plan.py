"""Pure rollout planning: which nodes each wave takes, which nodes to approve next, whether
a node is ready on a revision, and the verdict figures a gate compares. No I/O here."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.manifest.rollout import Gate, ReadyGate, RolloutPolicy, Wave, share_of

REST_WAVE = "rest"
FAILING_STATES = frozenset({"Failed", "Degraded"})

Figures = tuple[int, int]  # (dropped, total packets) of one NF on one node


@dataclass(frozen=True)
class NodeView:
    """What the rollout engine needs of one node's latest status."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    connected: bool = True
    applied: str = ""  # last_applied_revision
    ready: bool = False  # the Ready condition
    failing: tuple[str, ...] = ()  # NFs in an error state
    verdicts: Mapping[str, Figures] = field(default_factory=dict)


def verdict_figures(
    status: pb.NodeStatus, nfs: Collection[str] | None = None
) -> dict[str, Figures]:
    """(dropped, all packets) per NF (only those in `nfs` unless None), enforce and
    monitor verdicts together."""
    out: dict[str, Figures] = {}
    for fn in status.functions:
        if (nfs is not None and fn.name not in nfs) or not fn.HasField("verdicts"):
            continue
        dropped, total = out.get(fn.name, (0, 0))
        for v in (fn.verdicts.enforce, fn.verdicts.monitor):
            dropped += v.dropped
            total += v.passed + v.dropped + v.redirected + v.other
        out[fn.name] = (dropped, total)
    return out


def node_view(
    name: str, status: pb.NodeStatus, connected: bool, nfs: Collection[str] | None = None
) -> NodeView:
    return NodeView(
        name=name,
        labels=dict(status.labels),
        connected=connected,
        applied=status.last_applied_revision,
        ready=any(c.type == "Ready" and c.status for c in status.conditions),
        failing=tuple(sorted({f.name for f in status.functions if f.state in FAILING_STATES})),
        verdicts=verdict_figures(status, nfs),
    )


def select_waves(policy: RolloutPolicy, nodes: Iterable[NodeView]) -> list[tuple[str, list[str]]]:
    """(name, node names) per wave, in order. Each wave takes from the nodes no earlier
    wave took: by selector, by count or percentage of the whole fleet, or (neither) all of
    them. Nodes no wave took form a last wave, `rest`."""
    remaining = sorted(n.name for n in nodes)
    labels = {n.name: n.labels for n in nodes}
    total = len(remaining)
    waves: list[tuple[str, list[str]]] = []
    for index, wave in enumerate(policy.spec.waves):
        if wave.selector:
            take = [
                n for n in remaining if all(labels[n].get(k) == v for k, v in wave.selector.items())
            ]
        elif wave.count is not None:
            take = remaining[: share_of(wave.count, total)]
        else:
            take = list(remaining)
        taken = set(take)
        remaining = [n for n in remaining if n not in taken]
        waves.append((policy.wave_name(index), take))
    if remaining:
        waves.append((REST_WAVE, remaining))
    return waves


def wave_settings(policy: RolloutPolicy, index: int) -> tuple[float, list[Gate]]:
    """(bake seconds, gates) of wave `index`; the implicit `rest` wave bakes for nothing
    and is judged by the policy's own gates."""
    if index < len(policy.spec.waves):
        return policy.spec.waves[index].bake, policy.gates_of(index)
    gates: list[Gate] = list(policy.spec.gates)
    if not any(isinstance(g, ReadyGate) for g in gates):
        gates.insert(0, ReadyGate(kind="ready"))
    return 0.0, gates


def on_revision(node: NodeView, revision: str) -> bool:
    return node.connected and node.applied == revision and node.ready and not node.failing


def next_approvals(
    wave: list[str],
    approved: set[str],
    views: Mapping[str, NodeView],
    revision: str,
    max_unavailable: int,
) -> list[str]:
    """Wave nodes to approve now: while fewer than `max_unavailable` approved nodes are not
    yet running the revision, the next ones in order."""
    in_flight = [
        n for n in wave if n in approved and not (n in views and on_revision(views[n], revision))
    ]
    room = max(0, max_unavailable - len(in_flight))
    return [n for n in wave if n not in approved][:room]


def max_unavailable(policy: RolloutPolicy, wave_size: int) -> int:
    return max(1, share_of(policy.spec.max_unavailable, max(wave_size, 1)))


def unready(wave: list[str], views: Mapping[str, NodeView], revision: str) -> list[str]:
    return [n for n in wave if n not in views or not on_revision(views[n], revision)]


def delta(now: Figures | None, then: Figures | None) -> Figures:
    """Packets between two readings of monotonic counters; a counter that went backwards
    was reset (the NF left its attach point) and counts from zero."""
    if now is None:
        return (0, 0)
    if then is None or now[1] < then[1] or now[0] < then[0]:
        return now
    return (now[0] - then[0], now[1] - then[1])


def summed(
    nodes: Iterable[str],
    nf: str,
    now: Mapping[str, Mapping[str, Figures]],
    then: Mapping[str, Mapping[str, Figures]],
) -> Figures:
    dropped = total = 0
    for node in nodes:
        d, t = delta(now.get(node, {}).get(nf), then.get(node, {}).get(nf))
        dropped += d
        total += t
    return dropped, total


def ratio(figures: Figures) -> float:
    return figures[0] / figures[1] if figures[1] else 0.0


@dataclass(frozen=True)
class VerdictJudgement:
    ok: bool | None  # None: waiting for data (fewer than min_packets packets)
    value: float
    baseline: float
    threshold: float
    message: str


def judge_verdicts(
    nf: str,
    max_increase: float,
    wave: Figures,
    others: Figures,
    pre_update: Figures,
    min_packets: int = 0,
) -> VerdictJudgement:
    """The wave's drop ratio against the nodes not yet updated over the same window, or,
    when those saw too few packets, the wave nodes before their update; when neither saw
    any, against 0 (an absolute limit). With `min_packets`, undecided (None) until the
    wave and a baseline that saw packets saw that many."""
    need = max(min_packets, 1)
    if others[1] >= need:
        baseline, against = ratio(others), f"{others[1]} packets on nodes not yet updated"
    elif pre_update[1] >= need:
        baseline, against = ratio(pre_update), f"{pre_update[1]} packets before the update"
    else:
        baseline, against = 0.0, "no baseline traffic"
    threshold = baseline + max_increase
    if not wave[1] and not min_packets:
        return VerdictJudgement(
            True, 0.0, baseline, threshold, f"nf {nf}: no packets on the wave yet"
        )
    short = ""
    if wave[1] < min_packets:
        short = f"only {wave[1]} packets of nf {nf} seen on the wave"
    elif others[1] < need and pre_update[1] < need and (others[1] or pre_update[1]):
        short = f"only {max(others[1], pre_update[1])} packets of nf {nf} seen on the baseline"
    if short:
        message = f"{short}, minPackets {min_packets}"
        return VerdictJudgement(None, ratio(wave), baseline, threshold, message)
    value = ratio(wave)
    ok = value <= threshold
    message = (
        f"nf {nf}: drop ratio {value:.4f} ({wave[0]}/{wave[1]} packets) on the wave "
        f"{'<=' if ok else '>'} baseline {baseline:.4f} ({against}) + {max_increase:g}"
    )
    return VerdictJudgement(ok, value, baseline, threshold, message)


def wave_of(waves: list[tuple[str, list[str]]]) -> dict[str, int]:
    return {n: i for i, (_, nodes) in enumerate(waves) for n in nodes}


__all__ = [
    "NodeView",
    "Wave",
    "judge_verdicts",
    "next_approvals",
    "node_view",
    "select_waves",
]
