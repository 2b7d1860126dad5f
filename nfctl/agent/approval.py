"""Which revision this node may run under a RolloutPolicy.

With a controller configured and a RolloutPolicy (rollout.yaml at the root of the followed
folder, where the controller reads it) in the revision the node runs or in the
fetched head, the agent applies only the revision the controller approved for it. The
agent stays in charge of safety: an approval is taken only if its revision is reachable
from the followed ref and (with --verify-signatures) signed by a trusted key; a refused
approval is an event and the node stays where it is. Approvals are persisted in the state
dir, so a restarted agent, or one whose controller is gone, holds its last approval
(fail-static). Without a policy, or without a controller, the node follows its ref.

`decide` is the pure decision; `ApprovalGate` feeds it from Git, the state dir and the
reconciler, and is what the reconciler calls between fetch and apply."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nfctl.agent.source import GitSource, Revision, SourceError
from nfctl.datapath.records import write_json_atomic
from nfctl.manifest.loader import MAX_MANIFEST_BYTES
from nfctl.manifest.rollout import POLICY_NAMES
from nfctl.wire.status import ConditionType

if TYPE_CHECKING:
    from nfctl.agent.reconciler import Reconciler

log = logging.getLogger(__name__)

STATE_FILE = "approval.json"
POLICY_CACHE = 64  # commits whose policy presence is remembered

# Approved condition reasons
FOLLOWING_REF = "FollowingRef"
APPROVED = "Approved"
AWAITING_APPROVAL = "AwaitingApproval"
APPROVAL_REFUSED = "ApprovalRefused"
APPROVED_UNREADABLE = "ApprovedRevisionUnreadable"


@dataclass(frozen=True)
class Approval:
    """One ApproveRevision from the controller."""

    revision: str
    rollout_id: str = ""
    wave: int = 0
    reason: str = ""
    received_at: float = field(default_factory=time.time, compare=False)

    @property
    def short(self) -> str:
        return self.revision[:12]

    def describe(self) -> str:
        where = f"rollout {self.rollout_id}, wave {self.wave + 1}" if self.rollout_id else ""
        why = ": ".join(p for p in (where, self.reason) if p)
        return f"{self.short} ({why})" if why else self.short

    @classmethod
    def from_json(cls, data: Any) -> Approval | None:
        if not isinstance(data, dict) or not isinstance(data.get("revision"), str):
            return None
        return cls(
            revision=data["revision"],
            rollout_id=str(data.get("rollout_id", "")),
            wave=int(data.get("wave", 0)),
            reason=str(data.get("reason", "")),
            received_at=float(data.get("received_at", 0.0)),
        )


@dataclass
class ApprovalState:
    """What the state dir keeps: the approval the node holds (checked and taken), the
    newest one offered (maybe not taken yet), and the builds of the revision the node ran
    before its last approval (kept loaded so a rollback adopts them: no recompile)."""

    held: Approval | None = None
    offered: Approval | None = None
    kept_builds: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def load(cls, folder: Path) -> ApprovalState:
        try:
            data = json.loads((folder / STATE_FILE).read_text())
        except (OSError, ValueError):
            return cls()
        if not isinstance(data, dict):
            return cls()
        kept = data.get("kept_builds")
        return cls(
            held=Approval.from_json(data.get("held")),
            offered=Approval.from_json(data.get("offered")),
            kept_builds={
                str(k): [str(h) for h in v]
                for k, v in (kept.items() if isinstance(kept, dict) else [])
                if isinstance(v, list)
            },
        )

    def save(self, folder: Path) -> None:
        write_json_atomic(
            folder / STATE_FILE,
            {
                "held": asdict(self.held) if self.held else None,
                "offered": asdict(self.offered) if self.offered else None,
                "kept_builds": self.kept_builds,
            },
        )


@dataclass(frozen=True)
class Decision:
    revision: str | None  # what to apply; None: nothing yet (a joining node waits)
    governed: bool  # a rollout policy is in force for this node
    accept: bool  # the offered approval becomes the held one
    reason: str  # the Approved condition's reason
    message: str


def needs_check(held: Approval | None, offered: Approval | None) -> bool:
    """Whether the offered approval names a revision not yet checked (reachability,
    signature). Re-approving the held revision (another rollout id or reason) needs none."""
    return offered is not None and (held is None or offered.revision != held.revision)


def decide(
    governed: bool,
    head: str | None,
    running: str | None,
    held: Approval | None,
    offered: Approval | None,
    refusal: str | None,
) -> Decision:
    """The revision to apply. refusal: why the offered approval failed its checks (None:
    it passed, or needed none)."""
    if not governed:
        return Decision(head, False, False, FOLLOWING_REF, "no rollout policy: following the ref")
    if offered is not None and offered != held and refusal is None:
        return Decision(offered.revision, True, True, APPROVED, f"approved {offered.describe()}")
    refused = offered is not None and refusal is not None and needs_check(held, offered)
    if held is not None:
        if refused and offered is not None:
            message = f"approval of {offered.short} refused ({refusal}); holding {held.short}"
            return Decision(held.revision, True, False, APPROVAL_REFUSED, message)
        return Decision(held.revision, True, False, APPROVED, f"approved {held.describe()}")
    staying = f"holding {running[:12]}" if running else "nothing applied"
    if refused and offered is not None:
        message = f"approval of {offered.short} refused ({refusal}); {staying}"
        return Decision(running, True, False, APPROVAL_REFUSED, message)
    message = f"rollout policy in force and no approval from the controller yet; {staying}"
    return Decision(running, True, False, AWAITING_APPROVAL, message)


def refusal_of(source: GitSource, sha: str, verify_signatures: bool) -> str | None:
    """Why this node must not run sha, approved or not (None: it may): not reachable from
    the followed ref, or (with --verify-signatures) not signed by a trusted key."""
    try:
        source.check_reachable(sha)
        if verify_signatures:
            source.verify(sha)
    except SourceError as exc:
        return str(exc)
    return None


class ApprovalGate:
    """Between fetch and apply: maps the fetched head to the revision this node may run."""

    def __init__(
        self, source: GitSource, folder: Path, reconciler: Reconciler, verify_signatures: bool
    ) -> None:
        self.source = source
        self.folder = folder
        self.reconciler = reconciler
        self.verify_signatures = verify_signatures
        self._lock = threading.Lock()
        self._state = ApprovalState.load(folder)
        # commit -> has a policy (commits never change); the last few only
        self._policy: dict[str, bool] = {}
        self._reported: str = ""  # the last refusal/awaiting message made an event
        reconciler.kept_builds = {n: set(h) for n, h in self._state.kept_builds.items()}
        reconciler.status.approved_revision = self.held_revision

    @classmethod
    def install(cls, reconciler: Reconciler, source: GitSource) -> ApprovalGate:
        """source: the reconciler's Git source (the gate also reads files and checks
        reachability, which the reconciler's GitPort does not offer)."""
        gate = cls(
            source,
            reconciler.store.dir,
            reconciler,
            reconciler.settings.verify_signatures,
        )
        reconciler.revision_gate = gate
        return gate

    # -- from the controller link --------------------------------------------------------
    @property
    def held_revision(self) -> str | None:
        with self._lock:
            return self._state.held.revision if self._state.held else None

    def offer(self, approval: Approval) -> bool:
        """Record an approval from the controller (checked at the next pass). Returns
        whether it is new."""
        with self._lock:
            if approval == self._state.offered or (
                approval == self._state.held and self._state.offered is None
            ):
                return False
            self._state.offered = approval
            self._state.save(self.folder)
        log.info("controller approved %s", approval.describe())
        return True

    # -- from the reconciler ---------------------------------------------------------------
    def has_policy(self, sha: str | None) -> bool:
        if sha is None:
            return False
        if sha not in self._policy:
            if len(self._policy) >= POLICY_CACHE:
                del self._policy[next(iter(self._policy))]
            folder = self.reconciler.settings.path.strip("/")
            folder = "" if folder in ("", ".") else folder.removeprefix("./")
            try:
                # present is enough, as for the controller: a broken policy is still a
                # policy (the controller keeps the last good one in force)
                self._policy[sha] = any(
                    self.source.read_file(sha, f"{folder}/{name}".lstrip("/"), MAX_MANIFEST_BYTES)
                    is not None
                    for name in POLICY_NAMES
                )
            except SourceError as exc:
                log.warning("cannot look for a rollout policy in %s: %s", sha[:12], exc)
                return True  # unknown: wait for an approval rather than follow blindly
        return self._policy[sha]

    def __call__(self, fetched: Revision | None) -> Revision | None:
        rec = self.reconciler
        head = fetched.sha if fetched else None
        running = rec.status.last_applied_revision
        with self._lock:
            state = replace(self._state)
        governed = self.has_policy(head) or self.has_policy(running)
        refusal = None
        if governed and state.offered is not None and needs_check(state.held, state.offered):
            refusal = refusal_of(self.source, state.offered.revision, self.verify_signatures)
        decision = decide(governed, head, running, state.held, state.offered, refusal)
        if decision.accept and state.offered is not None:
            self._take(state.offered, running)
        elif (
            decision.reason in (APPROVAL_REFUSED, AWAITING_APPROVAL)
            and decision.message != self._reported
        ):
            self._reported = decision.message
            rec.event(decision.reason, decision.message, warning=refusal is not None)
        rec.status.approved_revision = self.held_revision
        if not governed:
            self._clear_condition()
            return fetched
        rec.status.set_condition(
            ConditionType.APPROVED, decision.reason == APPROVED, decision.reason, decision.message
        )
        stalled = rec.source_state.stalled
        if stalled is not None and stalled[0] in (AWAITING_APPROVAL, APPROVED_UNREADABLE):
            rec.source_state.stalled = None  # set by an earlier pass of this gate
        if decision.revision is None:
            rec.source_state.stalled = (AWAITING_APPROVAL, decision.message)
            return None
        if fetched is not None and decision.revision == fetched.sha:
            return fetched
        try:
            return self.source.revision(decision.revision)
        except SourceError as exc:
            message = f"cannot read approved revision {decision.revision[:12]}: {exc}"
            rec.source_state.stalled = (APPROVED_UNREADABLE, message)
            if message != self._reported:
                self._reported = message
                rec.event(APPROVED_UNREADABLE, message, warning=True)
            return None

    def _take(self, approval: Approval, running: str | None) -> None:
        rec = self.reconciler
        with self._lock:
            if approval.revision != running:
                # the builds running now stay loaded: going back to them is an adoption
                self._state.kept_builds = {
                    name: [applied.build_hash] for name, applied in rec.applied.items()
                }
            self._state.held = approval
            if self._state.offered == approval:
                self._state.offered = None
            self._state.save(self.folder)
            rec.kept_builds = {n: set(h) for n, h in self._state.kept_builds.items()}
        self._reported = ""
        approved: Revision | None = None
        with contextlib.suppress(SourceError):
            approved = self.source.commit_info(approval.revision)
        rec.event(
            "RevisionApproved",
            f"applying {approval.describe()} approved by the controller",
            revision=approved,
        )

    def _clear_condition(self) -> None:
        status = self.reconciler.status
        status.conditions = [c for c in status.conditions if c.type is not ConditionType.APPROVED]
