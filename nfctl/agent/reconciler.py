"""One agent's reconcile pass, in named phases with typed data between them:

sync():        fetch -> desired state -> builds (compile only what changed; a failure
               keeps the last good version) -> converge().
converge():    plan (pure: chains, entries, drift, frozen points) -> apply -> summarize
               -> node status.
check_drift(): converge() without fetching: correct or report what drifted.

The phases live in nfctl.agent.reconcile; this class runs them in order and holds what
carries over between passes."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from nfctl import __version__
from nfctl.agent.attachments import AttachmentTracker
from nfctl.agent.plan import AttachPoint, prune_candidates
from nfctl.agent.reconcile.apply import apply_plan
from nfctl.agent.reconcile.builds import Refused, accept, build_all, builds_needed, next_applied
from nfctl.agent.reconcile.desired import DesiredNF, desired_state
from nfctl.agent.reconcile.events import EventLog, failure_message
from nfctl.agent.reconcile.fetch import SourceState, fetch_revision
from nfctl.agent.reconcile.node_status import (
    Outlook,
    StatusInputs,
    nf_statuses,
    settle,
    shadowed_condition,
    source_unavailable,
    verdict_totals,
)
from nfctl.agent.reconcile.plan import (
    Chains,
    desired_chains,
    observe_request,
    plan_chains,
    plan_entries,
    read_observation,
)
from nfctl.agent.reconcile.ports import BuilderPort, DatapathPort, GitPort, Metrics
from nfctl.agent.reconcile.state import Applied, NFRuntime, records
from nfctl.agent.reconcile.summary import Notice, attachment_notices, summarize
from nfctl.agent.source import Revision, redact
from nfctl.agent.store import AppliedNF, StateStore, Suspensions
from nfctl.datapath.datapath import LoadedBuild
from nfctl.datapath.observe import AttachPointState
from nfctl.system import kernel_release
from nfctl.wire.status import (
    ConditionType,
    ErrorInfo,
    Event,
    NFStatus,
    NodeStatus,
    ReconcileTimings,
    SourceStatus,
)

log = logging.getLogger(__name__)


@dataclass
class AgentSettings:
    node: str
    labels: dict[str, str]
    repo_url: str
    ref: str
    path: str = "."
    drift_mode: str = "correct"  # correct | warn
    verify_signatures: bool = False


class Reconciler:
    """Keeps one node's datapath at the revision Git (or a rollout) asks for, and reports
    how that went: events to listeners and the store, NodeStatus to status listeners."""

    def __init__(
        self,
        settings: AgentSettings,
        datapath: DatapathPort,
        builder: BuilderPort,
        source: GitPort,
        store: StateStore,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.datapath = datapath
        self.builder = builder
        self.source = source
        self.store = store
        self.metrics = metrics
        self.lock = threading.RLock()
        self.applied: dict[str, Applied] = {
            name: Applied.from_record(record) for name, record in store.load_applied().items()
        }
        self.runtime: dict[str, NFRuntime] = {}
        self.loaded: dict[str, LoadedBuild] = {}
        self.pending_commit: dict[str, LoadedBuild] = {}  # builds whose new maps wait
        self.source_state = SourceState()
        self.unparsed: dict[str, ErrorInfo] = {}  # manifest path -> error (no NF name known)
        self.events = EventLog(settings.node, store)
        self.listeners: list[Callable[[Event], None]] = self.events.listeners
        self.status_listeners: list[Callable[[NodeStatus], None]] = []
        self.attachments = AttachmentTracker()
        self._reported: set[str] = set()  # drift reported once (warn mode)
        self._pruned: list[AppliedNF] = []
        self._changes: list[tuple[str, str]] = []
        self._modes: dict[AttachPoint, str | None] = {}
        self._observed: dict[AttachPoint, AttachPointState] = {}
        self._target: Chains = {}
        self._converged = False
        self._synced: dict[str, tuple[str, str]] = {}
        self._spec_suspended: set[str] = set()  # NFs with spec.suspend in the last revision
        # rollouts (nfctl.agent.approval): maps the fetched head to the revision this node
        # may run; builds kept loaded beyond the applied ones (a rollback adopts them)
        self.revision_gate: Callable[[Revision | None], Revision | None] | None = None
        self.kept_builds: dict[str, set[str]] = {}
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

    @property
    def revision(self) -> Revision | None:
        return self.source_state.revision

    @property
    def source_error(self) -> str | None:
        return self.source_state.error

    # -- events ----------------------------------------------------------------------
    def event(
        self,
        reason: str,
        message: str,
        nf: str | None = None,
        warning: bool = False,
        revision: Revision | None = None,
    ) -> Event:
        return self.events.record(reason, message, nf, warning, revision or self.revision)

    def _emit(self, notices: list[Notice]) -> None:
        for notice in notices:
            if notice.failure is not None and notice.nf is not None:
                self._fail(notice.nf, notice.failure, notice.reason)
            else:
                self.event(
                    notice.reason, notice.message, notice.nf, notice.warning, notice.revision
                )
            if notice.drift and self.metrics:
                self.metrics.drift(*notice.drift)

    def _nf(self, name: str) -> NFRuntime:
        return self.runtime.setdefault(name, NFRuntime())

    def _fail(self, name: str, error: ErrorInfo, reason: str = "Failed") -> None:
        """The NF's error; its event only when the error is new (every pass retries)."""
        rt = self._nf(name)
        key = f"{reason}|{error.revision}|{error.message}"
        rt.error = error
        if rt.error_key != key:
            rt.error_key = key
            kept = self.applied.get(name)
            message = failure_message(error, kept.record if kept else None)
            self.event(reason, message, nf=name, warning=True)

    # -- a full pass -------------------------------------------------------------------
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
            if self.revision_gate is not None:  # a RolloutPolicy: the approved revision
                revision = self.source_state.revision = self.revision_gate(revision)
            fetched = time.monotonic()
            if revision is not None:
                self._build(revision, suspensions)
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

    # -- phase 1: fetch ----------------------------------------------------------------
    def _fetch(self) -> Revision | None:
        result = fetch_revision(
            self.source,
            self.source_state,
            self.settings.ref,
            self.settings.verify_signatures,
            self.metrics,
        )
        if result.newly_unavailable and self.source_state.error is not None:
            # status first: whoever reads the event finds the status saying so too
            source_unavailable(self.status, self.source_state.error)
            self._publish()
        if result.refused is not None:
            self.status.last_attempted_revision = result.refused
        if result.fetched is not None and self.status.source:
            self.status.source.last_fetched_revision = result.fetched
        self._emit(result.notices)
        return result.revision

    # -- phases 2 and 3: desired state, builds -------------------------------------------
    def _build(self, revision: Revision, suspensions: Suspensions) -> None:
        self.status.last_attempted_revision = revision.sha
        desired = desired_state(
            revision, self.settings.path, self.settings.labels, suspensions, self.applied
        )
        if desired.path_missing is not None:
            stalled = ("PathNotFound", desired.path_missing)
            if self.source_state.stalled != stalled:
                self.event("Failed", desired.path_missing, warning=True)
            self.source_state.stalled = stalled
            return
        for rt in self.runtime.values():
            rt.in_git = False
        for name, selected in desired.selected.items():
            rt = self._nf(name)
            rt.in_git, rt.selected = True, selected
        for name, error in desired.failures:
            self._nf(name).in_git = True
            self._fail(name, error)
        self.unparsed = desired.unparsed
        for path, error in self.unparsed.items():
            key = f"unparsed|{path}|{error.revision}|{error.message}"
            if self._nf(f"<{path}>").error_key != key:
                self._nf(f"<{path}>").error_key = key
                self.event("Failed", f"{path}: {error.message}", warning=True)
        self._spec_suspended = desired.spec_suspended
        built = build_all(
            self.builder,
            builds_needed(desired.to_build, self._adoptable),
            revision.snapshot,
            self.metrics,
        )
        folder = revision.snapshot / self.settings.path
        for item in desired.to_build:
            current = self.applied.get(item.name)
            verdict = accept(
                item,
                current,
                built.get(item.name),
                self._adoptable,
                self.builder,
                revision,
                folder,
            )
            if isinstance(verdict, Refused):
                self._fail(item.name, verdict.error, verdict.reason)
                continue
            rt = self._nf(item.name)
            rt.error, rt.error_key = None, ""
            self.loaded[item.name] = verdict.loaded
            if verdict.loaded.swaps:
                self.pending_commit[item.name] = verdict.loaded
            self.applied[item.name], change = next_applied(
                current, item, verdict.loaded, revision, time.time()
            )
            if change is not None:
                self._changes.append((item.name, change))
        keep = {n for n in desired.in_git if desired.selected[n]}
        keep |= {n for n in self.applied if n in suspensions.nfs}
        for name in prune_candidates(self.applied, keep, desired.failing_owners):
            self._pruned.append(self.applied.pop(name).record)
            self.loaded.pop(name, None)
        self.store.save_applied(records(self.applied))

    def _adoptable(self, item: DesiredNF) -> LoadedBuild | None:
        loaded = self.loaded.get(item.name)
        if loaded is None or loaded.build_hash != item.prepared.build_hash:
            loaded = self.builder.find_loaded(item.name, item.prepared.build_hash)
        return loaded

    def _loaded(self, name: str) -> LoadedBuild | None:
        """The build of the applied version, adopted from its pins after a restart."""
        applied = self.applied.get(name)
        if applied is None:
            return None
        loaded = self.loaded.get(name)
        if loaded is None or loaded.build_hash != applied.build_hash:
            loaded = self.builder.find_loaded(name, applied.build_hash)
            if loaded is not None:
                self.loaded[name] = loaded
        return loaded

    def _running(self) -> dict[str, LoadedBuild]:
        return {name: b for name in self.applied if (b := self._loaded(name)) is not None}

    # -- phases 4 to 6: plan, apply, summarize -------------------------------------------
    def desired_chains(self) -> Chains:
        return desired_chains(self.applied, self.datapath.interface_names())

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
            suspended = set(suspensions.nfs) | self._spec_suspended
            running = self._running()
            interfaces = self.datapath.interface_names()
            target = desired_chains(self.applied, interfaces)
            request = observe_request(target, self.datapath.tracked_points())
            seen = read_observation(self.datapath.observe(request))
            previous = self._target if self._converged else None
            plan = plan_chains(target, seen, self.applied, suspended, previous, correct)
            plan.entries = plan_entries(self.applied, running, suspended, self._synced, correct)
            for rt in self.runtime.values():
                rt.attach_errors = {}
            result = apply_plan(
                self.datapath,
                self.builder,
                plan,
                correct,
                self.pending_commit,
                self._pruned,
                self.applied,
                self._target,
                self.kept_builds,
            )
            for name, errors in result.attach_errors.items():
                self._nf(name).attach_errors = errors
            for gone in self._pruned:
                self.runtime.pop(gone.name, None)
            self._pruned = []
            self._synced.update(result.synced)
            self._emit(summarize(plan, result, self._changes, self._reported))
            self._changes = []
            now = time.time()
            placements = [a.placement for a in self.applied.values()]
            changes = self.attachments.update(
                self._target, target, set(interfaces), placements, now
            )
            self._emit(attachment_notices(changes, now))
            self._modes = {**seen.modes, **result.modes}
            self._observed = seen.states
            self._target = target
            self._converged = True
            return result.entry_drift + plan.drift_found

    def check_drift(self) -> list[str]:
        """Periodic: the same convergence without fetching; returns the drift found."""
        with self.lock:
            found = self.converge()
            shadowed_condition(self.status, self._observed, self._target)
            if self.status.suspended:  # conditions say "Suspended" until a resume
                self._publish()
            else:
                # an interface may have vanished or come back: Ready (and, once everything
                # is attached again, lastAppliedRevision) follows
                self._finish(self.revision)
            return found

    # -- phase 7: node status ------------------------------------------------------------
    def _status_inputs(self) -> StatusInputs:
        running = self._running()
        return StatusInputs(
            applied=self.applied,
            runtime=self.runtime,
            loaded=running,
            map_counts={
                name: {m.name: self.datapath.map_count(b, m.name) for m in b.record.maps}
                for name, b in running.items()
            },
            verdicts=verdict_totals(self.datapath.verdict_counts()),
            target=self._target,
            modes=self._modes,
            observed=self._observed,
            lost=self.attachments.lost,
            suspended=set(self.store.suspensions().nfs),
            spec_suspended=self._spec_suspended,
        )

    def _finish(self, revision: Revision | None) -> bool:
        view = self._status_inputs()
        functions = nf_statuses(view)
        outlook = Outlook(self.source_state.stalled, self.source_state.error, tuple(self.unparsed))
        settle(self.status, functions, outlook, revision.sha if revision else None, view)
        self._publish(functions)
        return self.status.ready

    def build_nf_statuses(self) -> list[NFStatus]:
        return nf_statuses(self._status_inputs())

    def _publish(self, functions: list[NFStatus] | None = None) -> None:
        self.status.functions = self.build_nf_statuses() if functions is None else functions
        self.status.observed_at = time.time()
        self.store.save_status(self.status)
        if self.metrics:
            self.metrics.update(self.status)
        for listener in self.status_listeners:
            try:
                listener(self.status)
            except Exception:
                log.exception("status listener failed")


__all__ = ["AgentSettings", "Reconciler"]
