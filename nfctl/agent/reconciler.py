"""One agent's reconcile loop body.

sync():     source -> desired NFs -> builds (compile only what changed; a failure keeps
            the last good version) -> converge().
converge(): desired chains for the node's current interfaces -> atomic chain changes ->
            map swaps committed -> managed entries synced -> removed NFs pruned.
check_drift(): compare the kernel with what converge() would produce; correct or warn.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from nfctl import __version__
from nfctl.agent.attachments import AttachmentTracker
from nfctl.agent.plan import (
    AttachPoint,
    ChainEntry,
    Placement,
    plan_chain_changes,
    prune_candidates,
    selects_node,
    target_chains,
)
from nfctl.agent.reporting import NFRuntime as _NFRuntime
from nfctl.agent.reporting import StatusReporting
from nfctl.agent.source import GitSource, Revision, SourceError, UntrustedRevisionError, redact
from nfctl.agent.status import (
    ConditionType,
    ErrorInfo,
    Event,
    EventType,
    NodeStatus,
    ReconcileTimings,
    SourceStatus,
)
from nfctl.agent.store import AppliedNF, StateStore, Suspensions
from nfctl.compiler.client import PreparedNF, prepare
from nfctl.datapath.datapath import ChainMember, Datapath, DatapathError, LoadedBuild
from nfctl.datapath.layout import LayoutError
from nfctl.datapath.observe import AttachPointState
from nfctl.diagnostics import Diagnostic
from nfctl.manifest.model import Hook, Mode, NetworkFunction
from nfctl.manifest.repo import scan_repo
from nfctl.nftest.build import remove_scratch, scratch_pin
from nfctl.nftest.gate import TESTS_FAILED, gate_problems, prepare_cases
from nfctl.nftest.load import tests_beside
from nfctl.system import kernel_release
from nfctl.validate import check_entries

log = logging.getLogger(__name__)


class Metrics(Protocol):
    def fetch(self, seconds: float, ok: bool) -> None: ...
    def compile(self, seconds: float) -> None: ...
    def reconcile(self, seconds: float, ok: bool) -> None: ...
    def drift(self, kind: str, corrected: bool) -> None: ...
    def update(self, status: NodeStatus) -> None: ...


@dataclass
class AgentSettings:
    node: str
    labels: dict[str, str]
    repo_url: str
    ref: str
    path: str = "."
    drift_mode: str = "correct"  # correct | warn
    verify_signatures: bool = False


def _entries_digest(nf: NetworkFunction) -> str:
    data = {
        name: spec.model_dump(mode="json") for name, spec in nf.spec.maps.items() if spec.managed
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _error_from(
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


class Reconciler(StatusReporting):
    def __init__(
        self,
        settings: AgentSettings,
        datapath: Datapath,
        source: GitSource,
        store: StateStore,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.datapath = datapath
        self.source = source
        self.store = store
        self.metrics = metrics
        self.lock = threading.RLock()
        self.applied: dict[str, AppliedNF] = store.load_applied()
        self.runtime: dict[str, _NFRuntime] = {}
        self.loaded: dict[str, LoadedBuild] = {}
        self.pending_commit: dict[str, LoadedBuild] = {}
        self.revision: Revision | None = None
        self.source_error: str | None = None
        self.stalled: tuple[str, str] | None = None  # (reason, message)
        self.unparsed: dict[str, ErrorInfo] = {}  # manifest path -> error (no NF name known)
        self.listeners: list[Callable[[Event], None]] = []
        self.status_listeners: list[Callable[[NodeStatus], None]] = []
        self._last_drift: dict[str, str] = {}
        self._pruned: list[AppliedNF] = []
        self._changes: list[tuple[str, str]] = []
        self._entry_changes: list[tuple[str, str]] = []
        self._modes: dict[AttachPoint, str | None] = {}
        self._observed: dict[AttachPoint, AttachPointState] = {}
        self._target: dict[AttachPoint, list[ChainEntry]] = {}
        self._converged = False
        self._synced: dict[str, tuple[str, str]] = {}
        self._spec_suspended: set[str] = set()  # NFs with spec.suspend in the last revision
        # rollouts (nfctl.agent.approval): maps the fetched head to the revision this node
        # may run; builds kept loaded beyond the applied ones (a rollback adopts them)
        self.revision_gate: Callable[[Revision | None], Revision | None] | None = None
        self.kept_builds: dict[str, set[str]] = {}
        self.attachments = AttachmentTracker()
        previous = store.load_status()
        self.status = previous or NodeStatus(node=settings.node)
        self.status.node = settings.node
        self.status.labels = dict(settings.labels)
        self.status.kernel = kernel_release()
        self.status.agent_version = __version__
        self.status.drift_mode = settings.drift_mode
        self.status.source = SourceStatus(
            url=redact(settings.repo_url), ref=settings.ref, path=settings.path
        )

    # -- events ----------------------------------------------------------------------
    def event(
        self,
        reason: str,
        message: str,
        nf: str | None = None,
        warning: bool = False,
        revision: Revision | None = None,
    ) -> Event:
        rev = revision or self.revision
        event = Event(
            type=EventType.WARNING if warning else EventType.NORMAL,
            reason=reason,
            message=message,
            node=self.settings.node,
            nf=nf,
            revision=rev.sha if rev else None,
            author=f"{rev.author} <{rev.author_email}>" if rev else None,
            commit_time=rev.committed_at if rev else None,
        )
        self.store.append_event(event)
        (log.warning if warning else log.info)(
            "%s%s: %s", reason, f" [{nf}]" if nf else "", message
        )
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:  # a listener never breaks reconciliation
                log.exception("event listener failed")
        return event

    def _fail(self, name: str, error: ErrorInfo, reason: str = "Failed") -> None:
        rt = self._nf(name)
        key = f"{reason}|{error.revision}|{error.message}"
        rt.error = error
        if rt.error_key != key:
            rt.error_key = key
            where = (
                f" ({error.file}:{error.line})"
                if error.file and error.line
                else (f" ({error.file})" if error.file else "")
            )
            kept = self.applied.get(name)
            keep = f"; keeping version {kept.version} ({kept.revision[:12]})" if kept else ""
            self.event(reason, f"{error.message}{where}{keep}", nf=name, warning=True)

    # -- sync: source to builds ------------------------------------------------------------
    def sync(self, fetch: bool = True) -> bool:
        """One full reconcile. Returns whether the node is Ready afterwards."""
        started = time.monotonic()
        with self.lock:
            suspensions = self.store.suspensions()
            self.status.suspended = suspensions.node
            if suspensions.node:
                self.status.set_condition(
                    ConditionType.RECONCILING, False, "Suspended", "node suspended"
                )
                self._publish()
                return self.status.ready
            self.status.set_condition(ConditionType.RECONCILING, True, "Progressing", "reconciling")
            wall = time.time()
            revision = self._fetch() if fetch else self.revision
            if self.revision_gate is not None:
                revision = self.revision = self.revision_gate(revision)
            fetched = time.monotonic()
            if revision is not None:
                self._apply_revision(revision, suspensions)
            built = time.monotonic()
            self.converge(suspensions)
            applied = time.monotonic()
            self.status.last_reconcile = ReconcileTimings(
                started_at=wall,
                fetch=round(fetched - started, 4),
                build=round(built - fetched, 4),
                apply=round(applied - built, 4),
                total=round(applied - started, 4),
                revision=revision.sha if revision else None,
            )
            ok = self._finish(revision)
        if self.metrics:
            self.metrics.reconcile(time.monotonic() - started, ok)
        return ok

    def _fetch(self) -> Revision | None:
        started = time.monotonic()
        sha: str | None = None
        try:
            sha = self.source.fetch()
            if self.source_error is not None:
                self.event("SourceAvailable", f"fetched {self.settings.ref} again")
            self.source_error = None
            if self.metrics:
                self.metrics.fetch(time.monotonic() - started, True)
        except SourceError as exc:
            if self.metrics:
                self.metrics.fetch(time.monotonic() - started, False)
            message = str(exc)
            if message != self.source_error:
                self.source_error = message
                if self.stalled is None:
                    # status first: whoever reads the event finds the status saying so too
                    self._source_unavailable_conditions()
                    self._publish()
                kept = self.revision.short if self.revision else "nothing"
                self.event("SourceUnavailable", f"{message}; keeping {kept}", warning=True)
            self.source_error = message
            return self.revision or self._last_fetched()
        try:
            if self.settings.verify_signatures:
                signer = self.source.verify(sha)
                log.debug("revision %s signed by %s", sha[:12], signer)
            revision = self.source.revision(sha)
        except UntrustedRevisionError as exc:
            if self.stalled != ("UntrustedRevision", str(exc)):
                refused: Revision | None = None
                with contextlib.suppress(SourceError):  # name the refused commit
                    refused = self.source.commit_info(sha)
                self.event("RevisionRefused", str(exc), warning=True, revision=refused)
            self.stalled = ("UntrustedRevision", str(exc))
            self.status.last_attempted_revision = sha
            return None
        except SourceError as exc:
            self.source_error = str(exc)
            return self.revision
        self.stalled = None
        self.revision = revision
        if self.status.source:
            self.status.source.last_fetched_revision = revision.sha
        return revision

    def _last_fetched(self) -> Revision | None:
        """After a restart with Git unreachable: the last revision in the local mirror."""
        try:
            sha = self.source.fetched_sha()
            if sha is None:
                return None
            if self.settings.verify_signatures:
                # the mirror also holds fetched revisions that were refused
                self.source.verify(sha)
            self.revision = self.source.revision(sha)
        except (SourceError, OSError):
            return None
        return self.revision

    def _apply_revision(self, revision: Revision, suspensions: Suspensions) -> None:
        self.status.last_attempted_revision = revision.sha
        folder = revision.snapshot / self.settings.path
        if not folder.is_dir():
            message = f"path {self.settings.path!r} does not exist in {revision.describe()}"
            if self.stalled != ("PathNotFound", message):
                self.event("Failed", message, warning=True)
            self.stalled = ("PathNotFound", message)
            return
        scan = scan_repo(folder, repo_root=revision.snapshot)
        in_git: set[str] = set()
        failing_owners: set[str] = set()
        spec_suspended: set[str] = set()
        to_build: list[tuple[NetworkFunction, PreparedNF]] = []
        self.unparsed = {}
        for rt in self.runtime.values():
            rt.in_git = False
        for manifest in scan.manifests:
            nf = manifest.nf
            if nf is None:
                error = _error_from(manifest.diagnostics, revision.sha)
                owner = next(
                    (a.name for a in self.applied.values() if a.manifest_path == manifest.rel_path),
                    None,
                )
                if owner is not None:
                    failing_owners.add(owner)
                    self._nf(owner).in_git = True
                    self._fail(owner, error)
                else:
                    self.unparsed[manifest.rel_path] = error
                continue
            in_git.add(nf.name)
            rt = self._nf(nf.name)
            rt.in_git = True
            rt.selected = selects_node(nf.spec.node_selector, self.settings.labels)
            if not rt.selected:
                continue
            if nf.spec.suspend:
                spec_suspended.add(nf.name)
            if nf.name in suspensions.nfs or nf.spec.suspend:
                continue  # frozen: whatever runs keeps running
            if manifest.diagnostics:  # e.g. duplicate names
                self._fail(nf.name, _error_from(manifest.diagnostics, revision.sha))
                failing_owners.add(nf.name)
                continue
            to_build.append((nf, prepare(manifest, revision.snapshot)))
        for path, error in self.unparsed.items():
            key = f"unparsed|{path}|{error.revision}|{error.message}"
            if self._nf(f"<{path}>").error_key != key:
                self._nf(f"<{path}>").error_key = key
                self.event("Failed", f"{path}: {error.message}", warning=True)
        self._spec_suspended = spec_suspended
        compiled = self._compile_changed(to_build, revision)
        for nf, prepared in to_build:
            self._build(nf, prepared, revision, compiled.get(nf.name))
        selected_in_git = {n for n in in_git if self._nf(n).selected}
        frozen = {n for n in self.applied if n in suspensions.nfs}
        for name in prune_candidates(self.applied, selected_in_git | frozen, failing_owners):
            gone = self.applied.pop(name)
            self.loaded.pop(name, None)
            self._pruned.append(gone)
        self.store.save_applied(self.applied)

    def _adoptable(self, name: str, prepared: PreparedNF) -> LoadedBuild | None:
        loaded = self.loaded.get(name)
        if loaded is None or loaded.build_hash != prepared.build_hash:
            loaded = self.datapath.find_loaded(name, prepared.build_hash)
        return loaded

    def _compile_changed(
        self, items: list[tuple[NetworkFunction, PreparedNF]], revision: Revision
    ) -> dict[str, LoadedBuild | DatapathError]:
        """Compile every NF whose build is not loaded yet, in parallel (one worker per CPU):
        a revision touching several NFs costs about one compile, not the sum."""
        pending = [
            (nf, prepared)
            for nf, prepared in items
            if prepared.ok and self._adoptable(nf.name, prepared) is None
        ]
        if not pending:
            return {}
        for hook in {nf.spec.attach.hook for nf, _ in pending}:
            self.datapath.dispatcher(hook)  # shared chain maps first, then builds in parallel

        def build(item: tuple[NetworkFunction, PreparedNF]) -> LoadedBuild | DatapathError:
            nf, prepared = item
            policies = {m: spec.on_incompatible for m, spec in nf.spec.maps.items()}
            # with tests, the worker also pins a private copy for the gate (no 2nd compile)
            # a monitor-mode build passes every packet on, so its tests (which judge what the
            # NF decides) run on a test build of their own instead of a copy of it
            with_copy = tests_beside(prepared.manifest.path) and nf.spec.mode is not Mode.MONITOR
            test_pin = scratch_pin(nf.name) if with_copy else None
            ahead = None
            if test_pin is not None:  # the gate's cases and packets, while the worker compiles
                ahead = threading.Thread(
                    target=prepare_cases, args=(prepared, revision.snapshot), daemon=True
                )
                ahead.start()
            started = time.monotonic()
            try:
                loaded = self.datapath.load(prepared, policies, test_pin)
                if test_pin is not None and loaded.test_pin is None:
                    remove_scratch(test_pin.parent)  # no copy: the worker's folder stays empty
                return loaded
            except DatapathError as exc:
                if test_pin is not None:
                    remove_scratch(test_pin.parent)
                return exc
            finally:
                if self.metrics:
                    self.metrics.compile(time.monotonic() - started)
                if ahead is not None:
                    ahead.join()

        workers = max(1, min(len(pending), os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="compile") as pool:
            results = list(pool.map(build, pending))
        return {nf.name: result for (nf, _), result in zip(pending, results, strict=True)}

    def _build(
        self,
        nf: NetworkFunction,
        prepared: PreparedNF,
        revision: Revision,
        compiled: LoadedBuild | DatapathError | None = None,
    ) -> None:
        name = nf.name
        if not prepared.ok:
            self._fail(name, _error_from(prepared.diagnostics, revision.sha))
            return
        current = self.applied.get(name)
        if isinstance(compiled, DatapathError):
            diags = compiled.diagnostics or [Diagnostic(file="", message=str(compiled))]
            self._fail(name, _error_from(diags, revision.sha))
            return
        loaded = compiled or self._adoptable(name, prepared)
        if loaded is None:
            self._fail(
                name, ErrorInfo(message="build missing after compile", revision=revision.sha)
            )
            return
        problems = check_entries(
            prepared, loaded.record.maps, lambda info: loaded.record.layouts(info.name)
        )
        reason: str | None = None
        # a build compiled in this pass (not one adopted from an earlier pass or the pins):
        # its tests.yaml gates the swap
        if not problems and compiled is not None and loaded.compiled:
            folder = revision.snapshot / self.settings.path
            if loaded.test_copy_error:
                log.warning("%s: no private copy for its tests: %s", name, loaded.test_copy_error)
            problems = gate_problems(
                prepared, folder, revision.snapshot, loaded.test_pin, loaded.record.maps
            )
            reason = TESTS_FAILED
        if loaded.test_pin is not None:  # the gate took it, or it was not needed
            remove_scratch(loaded.test_pin.parent)
            loaded.test_pin = None
        if problems:
            if loaded.compiled and (current is None or current.build_hash != loaded.build_hash):
                self.datapath.discard(loaded)
            self._fail(name, _error_from(problems, revision.sha, reason), reason or "Failed")
            return
        rt = self._nf(name)
        rt.error, rt.error_key = None, ""
        self.loaded[name] = loaded
        if loaded.swaps:
            self.pending_commit[name] = loaded
        changed = current is None or current.build_hash != loaded.build_hash
        entries_changed = current is None or current.entries_digest != _entries_digest(nf)
        spec_changed = current is None or current.spec != nf.model_dump(mode="json", by_alias=True)
        self.applied[name] = AppliedNF(
            name=name,
            manifest_path=prepared.manifest.rel_path,
            build_hash=loaded.build_hash,
            version=nf.spec.version,
            revision=revision.sha
            if (changed or spec_changed or current is None)
            else current.revision,
            spec=nf.model_dump(mode="json", by_alias=True),
            applied_at=time.time()
            if (changed or spec_changed)
            else (current.applied_at if current else time.time()),
            entries_digest=_entries_digest(nf),
        )
        if changed:
            verb = "compiled and loaded" if loaded.compiled else "adopted"
            previous = f" (was {current.version}, {current.build_hash[:12]})" if current else ""
            self._changes.append(
                (name, f"version {nf.spec.version} build {loaded.build_hash[:12]} {verb}{previous}")
            )
        elif entries_changed or spec_changed:
            self._changes.append(
                (name, f"manifest changes applied at {revision.short} (program unchanged)")
            )

    # -- converge: desired chains to the kernel -------------------------------------------
    def _placements(self) -> list[Placement]:
        out = []
        for applied in self.applied.values():
            nf = NetworkFunction.model_validate(applied.spec)
            out.append(Placement.of(nf, applied.build_hash))
        return out

    def desired_chains(self) -> dict[AttachPoint, list[ChainEntry]]:
        interfaces = [i.name for i in self.datapath.interfaces()]
        return target_chains(self._placements(), interfaces)

    def _observe(
        self, target: dict[AttachPoint, list[ChainEntry]], points: list[AttachPoint]
    ) -> tuple[
        dict[AttachPoint, list[ChainEntry] | None],
        dict[AttachPoint, str | None],
        dict[AttachPoint, list[str]],
    ]:
        """Per attach point: the chain the kernel runs (None: our dispatcher is not on the
        hook), the XDP mode, and how it differs from target (drift descriptions)."""
        desired = {(p.ifname, p.hook): [e.nf for e in target.get(p, [])] for p in points}
        actual: dict[AttachPoint, list[ChainEntry] | None] = {}
        modes: dict[AttachPoint, str | None] = {}
        drift: dict[AttachPoint, list[str]] = {}
        self._observed = {}
        for state in self.datapath.observe(desired):
            point = AttachPoint(state.ifname, state.hook)
            self._observed[point] = state
            modes[point] = state.xdp_mode if state.hook is Hook.XDP else state.attach or "tc"
            drift[point] = [d for d in state.drift if "is gone" not in d]
            if state.ours:
                actual[point] = [
                    ChainEntry(ref.nf or f"?{ref.prog_id}", ref.build_prefix or "")
                    for ref in state.chain
                ]
            else:
                actual[point] = None
        return actual, modes, drift

    def converge(self, suspensions: Suspensions | None = None) -> list[str]:
        """Make the kernel match the applied NFs. A difference where the desired state did
        not change since the last converge is drift: corrected (mode correct, event
        DriftCorrected) or only reported (mode warn, event DriftDetected). Returns the
        drift found."""
        with self.lock:
            suspensions = suspensions or self.store.suspensions()
            if suspensions.node:
                return []
            correct = self.settings.drift_mode == "correct"
            # Entries first: they live in pinned maps that old and new programs share, so a
            # map-only change is in the kernel before any netlink work, and a new NF starts
            # with its entries in place.
            self._entry_changes = []
            found: list[str] = self._sync_entries(suspensions, correct)
            target = self.desired_chains()
            present = {i.name for i in self.datapath.interfaces()}
            tracked = [
                AttachPoint(ifname, Hook(h))
                for ifname, entry in self.datapath.tracked_interfaces().items()
                for h in entry.get("hooks", [])
            ]
            points = sorted(set(target) | set(tracked))
            actual, modes, drift = self._observe(target, points)
            suspended_nfs = self._suspended_nfs(suspensions)
            frozen = {
                point
                for point, entries in target.items()
                if any(e.nf in suspended_nfs for e in entries) and actual.get(point) is not None
            }
            changes = plan_chain_changes(target, actual, frozen)
            for rt in self.runtime.values():
                rt.attach_errors = {}
            for point, entries in changes.set.items():
                unchanged = self._converged and self._target.get(point) == entries
                is_drift = unchanged and bool(drift.get(point))
                if is_drift:
                    found.extend(f"{point}: {d}" for d in drift[point])
                    if not correct:
                        self._report_drift(point, drift[point])
                        continue
                members = [
                    ChainMember(
                        e.nf, e.build_hash, self.datapath.layout.prog_pin(e.nf, e.build_hash)
                    )
                    for e in entries
                ]
                try:
                    modes[point] = self.datapath.set_chain(
                        point.ifname,
                        point.hook,
                        members,
                        xdp_mode=self._xdp_mode(entries),
                        take_over=correct,
                        position=self._position(entries),
                    )
                except Exception as exc:
                    for e in entries:
                        self._nf(e.nf).attach_errors[point] = str(exc)
                    log.warning("cannot set chain on %s: %s", point, exc)
                    continue
                if is_drift:
                    for d in drift[point]:
                        self.event("DriftCorrected", f"{point}: {d}", warning=True)
                        if self.metrics:
                            self.metrics.drift("chain", True)
            for point in changes.clear:
                try:
                    self.datapath.clear_chain(point.ifname, point.hook)
                except Exception as exc:
                    log.warning("cannot clear %s: %s", point, exc)
            self.datapath.reap()
            self._commit_swaps()
            self._prune()
            self._release_old_versions()
            for name, message in self._changes + self._entry_changes:
                self.event("Applied", message, nf=name)
            self._changes = []
            self._entry_changes = []
            self._track_attachments(target, present)
            self._modes = modes
            self._target = target
            self._converged = True
            return found

    def _suspended_nfs(self, suspensions: Suspensions) -> set[str]:
        """NFs frozen by `nfctl suspend --nf` or by spec.suspend in Git."""
        return set(suspensions.nfs) | self._spec_suspended

    def _report_drift(self, point: AttachPoint, problems: list[str]) -> None:
        for problem in problems:
            key = f"{point}: {problem}"
            if self._last_drift.get(key) != "reported":
                self._last_drift[key] = "reported"
                self.event("DriftDetected", key, warning=True)
                if self.metrics:
                    self.metrics.drift("chain", False)

    def _xdp_mode(self, entries: list[ChainEntry]) -> str:
        for entry in entries:
            applied = self.applied.get(entry.nf)
            if applied:
                mode = applied.spec.get("spec", {}).get("attach", {}).get("xdpMode", "auto")
                if mode != "auto":
                    return str(mode)
        return "auto"

    def _position(self, entries: list[ChainEntry]) -> str:
        """The TCX placement of the chain: the first NF (in chain order) that sets one."""
        for entry in entries:
            applied = self.applied.get(entry.nf)
            if applied:
                position = applied.spec.get("spec", {}).get("attach", {}).get("position")
                if position:
                    return str(position)
        return "first"

    def _commit_swaps(self) -> None:
        for name, loaded in list(self.pending_commit.items()):
            if self._nf(name).attach_errors:
                continue  # not live everywhere yet: the old maps stay in place
            try:
                swaps = ", ".join(
                    f"{w.name} ({w.migrated_entries} entries carried over)" for w in loaded.swaps
                )
                self.datapath.commit(loaded)
                self.event("MapsReplaced", f"incompatible maps replaced: {swaps}", nf=name)
            except OSError as exc:
                self._fail(name, ErrorInfo(message=f"committing new maps failed: {exc}"))
            del self.pending_commit[name]

    def _prune(self) -> None:
        for gone in self._pruned:
            self.datapath.remove_nf(gone.name)
            self.runtime.pop(gone.name, None)
            self.event(
                "Pruned",
                f"removed from Git; detached and unpinned (was {gone.version})",
                nf=gone.name,
            )
        self._pruned = []

    def _loaded(self, name: str) -> LoadedBuild | None:
        applied = self.applied.get(name)
        if applied is None:
            return None
        loaded = self.loaded.get(name)
        if loaded is None or loaded.build_hash != applied.build_hash:
            loaded = self.datapath.find_loaded(name, applied.build_hash)
            if loaded is not None:
                self.loaded[name] = loaded
        return loaded

    def _sync_entries(self, suspensions: Suspensions, correct: bool = True) -> list[str]:
        """Managed entries to the kernel. A change the manifest did not ask for is drift."""
        drifted: list[str] = []
        suspended_nfs = self._suspended_nfs(suspensions)
        for name, applied in self.applied.items():
            if name in suspended_nfs:
                continue
            loaded = self._loaded(name)
            if loaded is None:
                continue
            nf = NetworkFunction.model_validate(applied.spec)
            manifest_changed = self._synced.get(name) != (
                applied.build_hash,
                applied.entries_digest,
            )
            ok = True
            for map_name, spec in nf.spec.maps.items():
                if not spec.managed:
                    continue
                entries = [(e.key, e.value) for e in spec.entries]
                try:
                    if not manifest_changed and not correct:
                        plan = self.datapath.entries_diff(loaded, map_name, entries)
                        if not plan.empty:
                            drifted.append(f"{name}/{map_name}")
                            key = f"{name}/{map_name} entries differ from Git"
                            if self._last_drift.get(key) != "reported":
                                self._last_drift[key] = "reported"
                                self.event("DriftDetected", key, nf=name, warning=True)
                        continue
                    result = self.datapath.sync_entries(loaded, map_name, entries)
                except (OSError, LayoutError, KeyError) as exc:
                    self._fail(name, ErrorInfo(message=f"map {map_name}: {exc}"))
                    ok = False
                    continue
                changed = result.added + result.updated + result.deleted
                if not changed:
                    continue
                message = (
                    f"map {map_name}: +{result.added} ~{result.updated} -{result.deleted} "
                    f"entries ({result.total} total)"
                )
                if manifest_changed:
                    self._entry_changes.append((name, message))
                else:
                    drifted.append(f"{name}/{map_name}")
                    self.event(
                        "DriftCorrected", f"{message} restored to match Git", nf=name, warning=True
                    )
                    if self.metrics:
                        self.metrics.drift("map", True)
            if ok:
                self._synced[name] = (applied.build_hash, applied.entries_digest)
        return drifted

    def _release_old_versions(self) -> None:
        in_chains = {
            (e.nf, e.build_hash[:32]) for entries in self._target.values() for e in entries
        }
        for name, applied in self.applied.items():
            keep = {applied.build_hash} | self.kept_builds.get(name, set())
            keep |= {h for n, h in in_chains if n == name}
            if name in self.pending_commit:
                continue
            self.datapath.release_versions(name, keep)

    # -- drift -------------------------------------------------------------------------
    def check_drift(self) -> list[str]:
        """Periodic: the same convergence without fetching; returns the drift found."""
        with self.lock:
            found = self.converge()
            self._shadowed_condition()
            if self.status.suspended:  # conditions say "Suspended" until a resume
                self._publish()
            else:
                # an interface may have vanished or come back: Ready (and, once everything
                # is attached again, lastAppliedRevision) follows
                self._finish(self.revision)
            return found


__all__ = ["AgentSettings", "Reconciler"]
