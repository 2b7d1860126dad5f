"""Builds: which desired NFs need a build that is not loaded yet, building those (in
parallel), and accepting a build only once its entries encode and its tests pass."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from nfctl.agent.reconcile.desired import DesiredNF, error_from
from nfctl.agent.reconcile.ports import BuilderPort, Metrics
from nfctl.agent.reconcile.state import Applied, entries_digest, spec_dump
from nfctl.agent.source import Revision
from nfctl.agent.store import AppliedNF
from nfctl.builder.check import check_entries
from nfctl.datapath.datapath import DatapathError, LoadedBuild
from nfctl.diagnostics import Diagnostic
from nfctl.manifest.model import Mode
from nfctl.nftest.build import remove_scratch, scratch_pin
from nfctl.nftest.gate import TESTS_FAILED, gate_problems, prepare_cases
from nfctl.nftest.load import tests_beside
from nfctl.wire.status import ErrorInfo

log = logging.getLogger(__name__)

Built = LoadedBuild | DatapathError
Adoptable = Callable[[DesiredNF], LoadedBuild | None]


def builds_needed(items: list[DesiredNF], adoptable: Adoptable) -> list[DesiredNF]:
    """Readable NFs whose build is neither loaded nor pinned: the ones to compile."""
    return [d for d in items if d.prepared.ok and adoptable(d) is None]


def build_all(
    builder: BuilderPort, pending: list[DesiredNF], snapshot: Path, metrics: Metrics | None
) -> dict[str, Built]:
    """Build every pending NF in parallel (one worker per CPU): a revision touching several
    NFs costs about one compile, not the sum."""
    if not pending:
        return {}
    builder.prepare_hooks({d.nf.spec.attach.hook for d in pending})

    def build(item: DesiredNF) -> Built:
        nf, prepared = item.nf, item.prepared
        policies = {m: spec.on_incompatible for m, spec in nf.spec.maps.items()}
        # with tests, the worker also pins a private copy for the gate (no 2nd compile)
        # a monitor-mode build passes every packet on, so its tests (which judge what the
        # NF decides) run on a test build of their own instead of a copy of it
        with_copy = tests_beside(prepared.manifest.path) and nf.spec.mode is not Mode.MONITOR
        test_pin = scratch_pin(nf.name) if with_copy else None
        ahead = None
        if test_pin is not None:  # the gate's cases and packets, while the worker compiles
            ahead = threading.Thread(target=prepare_cases, args=(prepared, snapshot), daemon=True)
            ahead.start()
        started = time.monotonic()
        try:
            loaded = builder.build(prepared, policies, test_pin)
            if test_pin is not None and loaded.test_pin is None:
                remove_scratch(test_pin.parent)  # no copy: the worker's folder stays empty
            return loaded
        except DatapathError as exc:
            if test_pin is not None:
                remove_scratch(test_pin.parent)
            return exc
        finally:
            if metrics:
                metrics.compile(time.monotonic() - started)
            if ahead is not None:
                ahead.join()

    workers = max(1, min(len(pending), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="compile") as pool:
        results = list(pool.map(build, pending))
    return {d.name: result for d, result in zip(pending, results, strict=True)}


@dataclass(frozen=True)
class Accepted:
    loaded: LoadedBuild


@dataclass(frozen=True)
class Refused:
    error: ErrorInfo
    reason: str = "Failed"


def accept(
    item: DesiredNF,
    current: Applied | None,
    built: Built | None,
    adoptable: Adoptable,
    builder: BuilderPort,
    revision: Revision,
    folder: Path,
) -> Accepted | Refused:
    """A build goes live only if the manifest's entries encode into its maps and, when it
    was compiled in this pass, the NF's tests.yaml passes on it. A refused build that
    nothing runs is discarded."""
    prepared = item.prepared
    if not prepared.ok:
        return Refused(error_from(prepared.diagnostics, revision.sha))
    if isinstance(built, DatapathError):
        diags = built.diagnostics or [Diagnostic(file="", message=str(built))]
        return Refused(error_from(diags, revision.sha))
    loaded = built or adoptable(item)
    if loaded is None:
        return Refused(ErrorInfo(message="build missing after compile", revision=revision.sha))
    problems = check_entries(
        prepared, loaded.record.maps, lambda info: loaded.record.codecs(info.name)
    )
    reason: str | None = None
    # a build compiled in this pass (not one adopted from an earlier pass or the pins):
    # its tests.yaml gates the swap
    if not problems and built is not None and loaded.compiled:
        if loaded.test_copy_error:
            log.warning("%s: no private copy for its tests: %s", item.name, loaded.test_copy_error)
        problems = gate_problems(
            prepared, folder, revision.snapshot, loaded.test_pin, loaded.record.maps
        )
        reason = TESTS_FAILED
    if loaded.test_pin is not None:  # the gate took it, or it was not needed
        remove_scratch(loaded.test_pin.parent)
        loaded.test_pin = None
    if problems:
        if loaded.compiled and (current is None or current.build_hash != loaded.build_hash):
            builder.discard(loaded)
        return Refused(error_from(problems, revision.sha, reason), reason or "Failed")
    return Accepted(loaded)


def next_applied(
    current: Applied | None, item: DesiredNF, loaded: LoadedBuild, revision: Revision, now: float
) -> tuple[Applied, str | None]:
    """The applied state after accepting a build, and what changed (an Applied event's
    message; None when nothing did). An unchanged NF keeps its revision and time."""
    nf = item.nf
    spec = spec_dump(nf)
    digest = entries_digest(nf)
    changed = current is None or current.build_hash != loaded.build_hash
    entries_changed = current is None or current.record.entries_digest != digest
    spec_changed = current is None or current.record.spec != spec
    moved = changed or spec_changed
    record = AppliedNF(
        name=nf.name,
        manifest_path=item.prepared.manifest.rel_path,
        build_hash=loaded.build_hash,
        version=nf.spec.version,
        revision=revision.sha if moved or current is None else current.record.revision,
        spec=spec,
        applied_at=now if moved or current is None else current.record.applied_at,
        entries_digest=digest,
    )
    message: str | None = None
    if changed:
        verb = "compiled and loaded" if loaded.compiled else "adopted"
        previous = f" (was {current.record.version}, {current.build_hash[:12]})" if current else ""
        message = f"version {nf.spec.version} build {loaded.build_hash[:12]} {verb}{previous}"
    elif entries_changed or spec_changed:
        message = f"manifest changes applied at {revision.short} (program unchanged)"
    return Applied(record, nf), message
