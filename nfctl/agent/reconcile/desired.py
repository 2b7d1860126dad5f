"""Desired state: what one revision of the repository asks of this node, typed. Reads the
revision's checkout only; no kernel, no Git."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from nfctl.agent.plan import selects_node
from nfctl.agent.reconcile.state import Applied
from nfctl.agent.source import Revision
from nfctl.agent.store import Suspensions
from nfctl.compiler.client import PreparedNF, prepare
from nfctl.diagnostics import Diagnostic
from nfctl.manifest.model import NetworkFunction
from nfctl.manifest.repo import scan_repo
from nfctl.wire.status import ErrorInfo


def error_from(
    diags: list[Diagnostic], revision: str | None, reason: str | None = None
) -> ErrorInfo:
    first = diags[0] if diags else Diagnostic(file="", message="unknown error")
    extra = f" (+{len(diags) - 1} more)" if len(diags) > 1 else ""
    return ErrorInfo(
        message=first.message + extra,
        file=first.file or None,
        line=first.line,
        log=first.detail,
        revision=revision,
        reason=reason,
    )


@dataclass(frozen=True)
class DesiredNF:
    """An NF this node must run, with its sources read and its build hash computed."""

    nf: NetworkFunction
    prepared: PreparedNF

    @property
    def name(self) -> str:
        return self.nf.name


@dataclass
class DesiredState:
    revision: Revision
    path_missing: str | None = None  # the configured path is not in this revision
    to_build: list[DesiredNF] = field(default_factory=list)  # selected, not frozen, readable
    in_git: set[str] = field(default_factory=set)  # every NF the revision names
    selected: dict[str, bool] = field(default_factory=dict)  # name -> nodeSelector matches
    spec_suspended: set[str] = field(default_factory=set)  # selected NFs with spec.suspend
    failures: list[tuple[str, ErrorInfo]] = field(default_factory=list)  # in manifest order
    failing_owners: set[str] = field(default_factory=set)  # applied NFs Git cannot read now
    unparsed: dict[str, ErrorInfo] = field(default_factory=dict)  # path -> error, no NF known


def desired_state(
    revision: Revision,
    path: str,
    labels: Mapping[str, str],
    suspensions: Suspensions,
    applied: Mapping[str, Applied],
) -> DesiredState:
    state = DesiredState(revision)
    folder = revision.snapshot / path
    if not folder.is_dir():
        state.path_missing = f"path {path!r} does not exist in {revision.describe()}"
        return state
    scan = scan_repo(folder, repo_root=revision.snapshot)
    for manifest in scan.manifests:
        nf = manifest.nf
        if nf is None:
            error = error_from(manifest.diagnostics, revision.sha)
            owner = next(
                (a.name for a in applied.values() if a.record.manifest_path == manifest.rel_path),
                None,
            )
            if owner is not None:
                state.failing_owners.add(owner)
                state.failures.append((owner, error))
            else:
                state.unparsed[manifest.rel_path] = error
            continue
        state.in_git.add(nf.name)
        selected = selects_node(nf.spec.node_selector, labels)
        state.selected[nf.name] = selected
        if not selected:
            continue
        if nf.spec.suspend:
            state.spec_suspended.add(nf.name)
        if nf.name in suspensions.nfs or nf.spec.suspend:
            continue  # frozen: whatever runs keeps running
        if manifest.diagnostics:  # e.g. duplicate names
            state.failures.append((nf.name, error_from(manifest.diagnostics, revision.sha)))
            state.failing_owners.add(nf.name)
            continue
        state.to_build.append(DesiredNF(nf, prepare(manifest, revision.snapshot)))
    return state
