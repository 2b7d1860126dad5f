"""Operator queries over the fleet's nodes: selecting nodes, summarizing their functions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.controller.node import NodeEntry


def select(
    ordered: Sequence[NodeEntry],
    by_name: Mapping[str, NodeEntry],
    selector: pb.NodeSelector | None,
) -> list[NodeEntry]:
    """The nodes a selector names or whose labels all match, by name; every node for an
    empty selector. `ordered` holds the entries of `by_name` sorted by name."""
    if selector is None or (not selector.labels and not selector.nodes):
        return list(ordered)
    names = set(selector.nodes)
    if not selector.labels:  # by name only: look them up
        return [by_name[name] for name in sorted(names) if name in by_name]
    labels = dict(selector.labels)
    out = []
    for entry in ordered:
        in_names = entry.name in names
        by_labels = bool(labels) and all(entry.status.labels.get(k) == v for k, v in labels.items())
        if in_names or by_labels:
            out.append(entry)
    return out


def function_summaries(ordered: Sequence[NodeEntry], name: str = "") -> list[pb.FunctionSummary]:
    """Per NF (or only `name`): how many nodes run it, its versions with their states, and
    the nodes where it is failing."""
    summaries: dict[str, pb.FunctionSummary] = {}
    versions: dict[tuple[str, str, str, str], pb.FunctionVersion] = {}
    for entry in ordered:
        for fn in entry.status.functions:
            if name and fn.name != name:
                continue
            summary = summaries.get(fn.name)
            if summary is None:
                summary = pb.FunctionSummary(name=fn.name)
                summaries[fn.name] = summary
            summary.nodes += 1
            key = (fn.name, fn.version, fn.revision, fn.build_hash)
            version = versions.get(key)
            if version is None:
                version = summary.versions.add(
                    version=fn.version, revision=fn.revision, build_hash=fn.build_hash
                )
                versions[key] = version
            version.nodes += 1
            version.states[fn.state] = version.states.get(fn.state, 0) + 1
            if fn.state in ("Failed", "Degraded", "Pending"):
                failure = summary.failing.add(node=entry.name, state=fn.state)
                if fn.HasField("last_error"):
                    failure.error.CopyFrom(fn.last_error)
    return [summaries[k] for k in sorted(summaries)]
