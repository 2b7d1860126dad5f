"""What a revision would change on one node, computed from data only: the NFs a repository
declares (desired) against what the node's agent applied (its state dir). No compiling, no
kernel, no I/O here; nfctl/cli/diff_cmd.py gathers the inputs."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from nfctl.agent.plan import selects_node
from nfctl.diagnostics import Diagnostic
from nfctl.manifest.model import NetworkFunction


class Change(StrEnum):
    ADDED = "added"  # selected here, not running yet: compile and attach
    REMOVED = "removed"  # gone from Git or deselected: detach and unpin
    REBUILT = "rebuilt"  # the program changes: compile, then swap it in
    UPDATED = "updated"  # same program; map entries, attach points or version change
    UNCHANGED = "unchanged"
    REFUSED = "refused"  # invalid: the agent refuses it and keeps what runs
    NOT_SELECTED = "not-selected"  # nodeSelector does not match this node, nothing runs


class Program(StrEnum):
    SAME = "same"
    CHANGED = "changed"
    UNKNOWN = "unknown"  # only a build with the node's kernel and BCC can tell


@dataclass(frozen=True)
class AppliedView:
    """One NF as the node runs it."""

    name: str
    revision: str
    build_hash: str  # computed on the node (its kernel and BCC)
    nf: NetworkFunction
    manifest: str
    # The same hash computed here from the applied revision's source, when the node's
    # state dir still holds that revision: comparable with DesiredNF.build_hash.
    local_build_hash: str | None = None
    attached: tuple[str, ...] = ()  # "eth0/xdp" as the node reported them


@dataclass(frozen=True)
class NodeView:
    node: str
    labels: dict[str, str]
    kernel: str
    applied: dict[str, AppliedView]
    revision: str | None = None  # lastAppliedRevision
    not_selected: frozenset[str] = frozenset()  # NFs the node last saw but did not select
    suspended: bool = False
    suspended_nfs: frozenset[str] = frozenset()


@dataclass(frozen=True)
class DesiredNF:
    manifest: str
    nf: NetworkFunction | None  # None: the manifest did not parse
    build_hash: str = ""  # computed here; "" when the source could not be read
    errors: tuple[Diagnostic, ...] = ()


@dataclass
class EntryChanges:
    added: list[dict[str, Any]] = field(default_factory=list)
    changed: list[dict[str, Any]] = field(default_factory=list)  # key, old, new
    removed: list[dict[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.removed)


@dataclass
class NFDiff:
    name: str
    change: Change
    manifest: str = ""
    version: tuple[str | None, str | None] = (None, None)  # running, desired
    program: Program | None = None
    notes: list[str] = field(default_factory=list)
    attach: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # field: (old, new)
    attached: list[str] = field(default_factory=list)  # where it runs now
    entries: dict[str, EntryChanges] = field(default_factory=dict)
    errors: list[Diagnostic] = field(default_factory=list)
    suspended: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "change": self.change.value,
            "manifest": self.manifest,
            "version": {"running": self.version[0], "desired": self.version[1]},
            "program": self.program.value if self.program else None,
            "notes": self.notes,
            "attach": {k: {"old": o, "new": n} for k, (o, n) in self.attach.items()},
            "attached": self.attached,
            "entries": {m: asdict(c) for m, c in self.entries.items()},
            "errors": [
                {"file": d.file, "line": d.line, "field": d.field, "message": d.message}
                for d in self.errors
            ],
            "suspended": self.suspended,
        }


@dataclass
class NodeDiff:
    node: str
    revision: str | None  # what the node runs
    target: str  # the revision or working tree compared
    nfs: list[NFDiff]

    @property
    def changed(self) -> bool:
        return any(d.change not in (Change.UNCHANGED, Change.NOT_SELECTED) for d in self.nfs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "revision": self.revision,
            "target": self.target,
            "changed": self.changed,
            "nfs": [d.to_dict() for d in self.nfs],
        }


ATTACH_FIELDS = (
    "hook",
    "interfaces",
    "excludeInterfaces",
    "priority",
    "xdpMode",
    "position",
    "onInterfaceRemoved",
)


def diff_node(node: NodeView, desired: list[DesiredNF], target: str) -> NodeDiff:
    out: list[NFDiff] = []
    seen: set[str] = set()
    spec_suspended: set[str] = set()
    for want in desired:
        if want.nf is None:
            # like the agent: a manifest that no longer parses fails the NF applied from it,
            # which keeps running
            owner = next(
                (a.name for a in node.applied.values() if a.manifest == want.manifest), None
            )
            if owner is not None:
                seen.add(owner)
            out.append(_refused(owner or want.manifest, want, node))
            continue
        name = want.nf.name
        seen.add(name)
        if want.nf.spec.suspend:
            spec_suspended.add(name)
        current = node.applied.get(name)
        if want.errors:
            out.append(_refused(name, want, node))
        elif not selects_node(want.nf.spec.node_selector, node.labels):
            out.append(_deselected(want, current) if current else _not_selected(want))
        elif current is None:
            out.append(_added(want, node))
        else:
            out.append(_compare(current, want, node))
    for name, current in sorted(node.applied.items()):
        if name not in seen:
            gone = NFDiff(
                name,
                Change.REMOVED,
                manifest=current.manifest,
                version=(current.nf.spec.version, None),
                attached=list(current.attached),
                notes=["no longer in the repository: detached and unpinned"],
            )
            out.append(gone)
    for d in out:
        d.suspended = node.suspended or d.name in node.suspended_nfs | spec_suspended
        if d.suspended and d.change not in (Change.UNCHANGED, Change.NOT_SELECTED):
            d.notes.append(
                "suspended: nothing changes until resumed (`nfctl resume`, spec.suspend)"
            )
    out.sort(key=lambda d: d.name)
    return NodeDiff(node.node, node.revision, target, out)


def _refused(name: str, want: DesiredNF, node: NodeView) -> NFDiff:
    current = node.applied.get(name)
    keeps = (
        f"the node keeps running version {current.nf.spec.version}"
        if current
        else "nothing of it runs on this node"
    )
    return NFDiff(
        name,
        Change.REFUSED,
        manifest=want.manifest,
        version=(current.nf.spec.version if current else None, _version(want)),
        errors=list(want.errors),
        attached=list(current.attached) if current else [],
        notes=[f"refused by validation: {keeps}"],
    )


def _deselected(want: DesiredNF, current: AppliedView) -> NFDiff:
    assert want.nf is not None
    return NFDiff(
        want.nf.name,
        Change.REMOVED,
        manifest=want.manifest,
        version=(current.nf.spec.version, want.nf.spec.version),
        attached=list(current.attached),
        notes=[f"deselected: nodeSelector {_selector(want.nf)} no longer matches this node"],
    )


def _not_selected(want: DesiredNF) -> NFDiff:
    assert want.nf is not None
    return NFDiff(
        want.nf.name,
        Change.NOT_SELECTED,
        manifest=want.manifest,
        version=(None, want.nf.spec.version),
        notes=[f"nodeSelector {_selector(want.nf)} does not match this node"],
    )


def _added(want: DesiredNF, node: NodeView) -> NFDiff:
    assert want.nf is not None
    attach = want.nf.spec.attach
    notes = ["compile, verify and attach"]
    if want.nf.name in node.not_selected:
        notes.insert(0, f"newly selected: nodeSelector {_selector(want.nf)} now matches")
    return NFDiff(
        want.nf.name,
        Change.ADDED,
        manifest=want.manifest,
        version=(None, want.nf.spec.version),
        program=Program.CHANGED,
        attach={
            "hook": (None, attach.hook.value),
            "interfaces": (None, list(attach.interfaces)),
        },
        entries=_entry_changes(None, want.nf),
        notes=notes,
    )


def _compare(current: AppliedView, want: DesiredNF, node: NodeView) -> NFDiff:
    assert want.nf is not None
    program, note = _program(current, want, node)
    attach = _attach_changes(current.nf, want.nf)
    entries = _entry_changes(current.nf, want.nf)
    version = (current.nf.spec.version, want.nf.spec.version)
    if program is Program.CHANGED:
        change = Change.REBUILT
    elif attach or entries or version[0] != version[1] or program is Program.UNKNOWN:
        change = Change.UPDATED
    else:
        change = Change.UNCHANGED
    notes = [note] if note else []
    notes += [
        f"map {m} is no longer managed: its entries stay as they are"
        for m in sorted(set(_managed_entries(current.nf)) - set(_managed_entries(want.nf)))
    ]
    if entries and program is not Program.CHANGED:
        notes.append("map entries are updated in place: no compile, same program id")
    return NFDiff(
        want.nf.name,
        change,
        manifest=want.manifest,
        version=version,
        program=program,
        attach=attach,
        attached=list(current.attached),
        entries=entries,
        notes=notes,
    )


def _program(current: AppliedView, want: DesiredNF, node: NodeView) -> tuple[Program, str]:
    if not want.build_hash:
        return Program.UNKNOWN, "the source could not be read here"
    if current.local_build_hash is not None:
        same = current.local_build_hash == want.build_hash
        return (Program.SAME, "") if same else (Program.CHANGED, "program inputs changed")
    if current.build_hash == want.build_hash:
        return Program.SAME, ""
    return (
        Program.UNKNOWN,
        f"the applied revision {current.revision[:12]} is not in the node's state dir and this "
        f"machine's kernel/BCC differ from the node's ({node.kernel}): a build on the node "
        "decides whether the program changes",
    )


def _attach_changes(old: NetworkFunction, new: NetworkFunction) -> dict[str, tuple[Any, Any]]:
    before = old.spec.attach.model_dump(mode="json", by_alias=True)
    after = new.spec.attach.model_dump(mode="json", by_alias=True)
    return {
        f: (before.get(f), after.get(f)) for f in ATTACH_FIELDS if before.get(f) != after.get(f)
    }


def _entry_changes(old: NetworkFunction | None, new: NetworkFunction) -> dict[str, EntryChanges]:
    """Managed map entries compared as written in YAML. Two spellings of one key (an address
    as text and as bytes) count as different here: only the node's typed encoding (from the
    compiled program's BTF) could equate them."""
    before = _managed_entries(old) if old else {}
    after = _managed_entries(new)
    out: dict[str, EntryChanges] = {}
    for name in sorted(after):  # a map no longer managed keeps its entries: see _unmanaged
        was, now = before.get(name, {}), after.get(name, {})
        changes = EntryChanges(
            added=[{"key": now[k][0], "value": now[k][1]} for k in now if k not in was],
            changed=[
                {"key": now[k][0], "old": was[k][1], "new": now[k][1]}
                for k in now
                if k in was and was[k][1] != now[k][1]
            ],
            removed=[{"key": was[k][0], "value": was[k][1]} for k in was if k not in now],
        )
        if changes:
            out[name] = changes
    return out


def _managed_entries(nf: NetworkFunction) -> dict[str, dict[str, tuple[Any, Any]]]:
    out: dict[str, dict[str, tuple[Any, Any]]] = {}
    for name, spec in nf.spec.maps.items():
        if spec.managed:
            dumped = spec.model_dump(mode="json")["entries"]
            out[name] = {_canon(e["key"]): (e["key"], e["value"]) for e in dumped}
    return out


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _selector(nf: NetworkFunction) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(nf.spec.node_selector.items())) or "{}"


def _version(want: DesiredNF) -> str | None:
    return want.nf.spec.version if want.nf else None
