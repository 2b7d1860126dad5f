"""The rollout engine: a leader-only singleton that learns new revisions from the NF
repository, rolls each out wave by wave under the policy in force, judges every wave on its
gates and halts (and rolls back) on a failure. Operators pause, resume, promote and abort.

Everything it decides is persisted before it acts: each tick reads the active rollout
from the store and writes it back together with the approvals it is about to send (one
transaction), so a new leader resumes where the last one stopped, never repeats a wave and
never approves a node twice for one step.

The policy in force for revision R is the policy of the fleet's last completed revision (a
harmful commit cannot weaken the gates that judge it); the first policy rolls out to every
node at once, as without a policy. A newer commit during a rollout is queued: it starts when
the rollout ends (completed, rolled back or aborted), and only the newest queued commit rolls
out."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field

import aiohttp

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.controller.fleet import Fleet, NodeEntry
from nfctl.controller.rollout import gates as gate_eval
from nfctl.controller.rollout.gitrepo import PolicyAt, RepoError, RepoMirror
from nfctl.controller.rollout.plan import (
    Figures,
    NodeView,
    max_unavailable,
    next_approvals,
    node_view,
    select_waves,
    unready,
    wave_settings,
)
from nfctl.controller.storage import StoredApproval, StoredRollout
from nfctl.manifest.rollout import (
    OnFailure,
    PromQLGate,
    ReadyGate,
    RolloutPolicy,
    VerdictGate,
)

log = logging.getLogger(__name__)

ACTIVE = ("Progressing", "Paused", "Halted")
EVENT_NODE = "controller/rollout"
# Approve commands go through FleetService (and its cross-replica fan-out).
SendFn = Callable[[list[NodeEntry], pb.Command], Awaitable[tuple[list[str], list[str]]]]
Snapshot = dict[str, dict[str, Figures]]


class RolloutError(RuntimeError):
    """An operator action that does not apply (no such rollout, wrong state)."""


@dataclass
class Detail:
    """The engine's bookkeeping for one rollout, persisted with it (JSON)."""

    approved: dict[str, int] = field(default_factory=dict)  # node -> wave it got R in
    rolled_back: list[str] = field(default_factory=list)
    rollout_start: Snapshot = field(default_factory=dict)
    wave_start: Snapshot = field(default_factory=dict)
    bake_start: Snapshot = field(default_factory=dict)
    bake_started: float = 0.0
    last_eval: float = 0.0
    events: int = 0  # sequence of the rollout's last event

    def dump(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def load(cls, text: str) -> Detail:
        data = json.loads(text or "{}")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("rollout_start", "wave_start", "bake_start"):
            if key in known:
                known[key] = {
                    n: {nf: (int(f[0]), int(f[1])) for nf, f in per.items()}
                    for n, per in known[key].items()
                }
        return cls(**known)


@dataclass
class Step:
    """What one tick changed: persisted together, then acted on."""

    approvals: list[StoredApproval] = field(default_factory=list)
    events: list[pb.Event] = field(default_factory=list)
    changed: bool = False


class RolloutEngine:
    def __init__(
        self,
        fleet: Fleet,
        mirror: RepoMirror | None,
        send: SendFn,
        prometheus_url: str | None = None,
        fetch_interval: float = 30.0,
        tick: float = 1.0,
        is_leader: Callable[[], bool] = lambda: True,
    ) -> None:
        self.fleet = fleet
        self.store = fleet.store
        self.mirror = mirror
        self.send = send
        self.prometheus_url = prometheus_url
        self.fetch_interval = fetch_interval
        self.tick_every = tick
        self.is_leader = is_leader
        self._lock = asyncio.Lock()
        self._poke = asyncio.Event()
        self._last_fetch = 0.0
        self._policies: dict[str, PolicyAt] = {}
        self._commits: dict[str, tuple[str, float]] = {}
        self._http: aiohttp.ClientSession | None = None
        self._completed_cache: tuple[float, StoredRollout | None] = (0.0, None)

    # -- loop -------------------------------------------------------------------------------
    def poke(self) -> None:
        """Fetch the repository now (a webhook saw a push)."""
        self._last_fetch = 0.0
        self._poke.set()

    async def run(self) -> None:
        try:
            while True:
                if self.is_leader():
                    try:
                        await self.tick()
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:
                        log.exception("rollout engine: %s", exc)
                self._poke.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._poke.wait(), self.tick_every)
        finally:
            if self._http is not None:
                await self._http.close()

    async def tick(self, now: float | None = None) -> None:
        async with self._lock:
            now = now or time.time()
            head = await self._head(now)
            active = await self._active()
            if active is None:
                if head:
                    await self._maybe_start(head, now)
                return
            rollout, detail = active
            if rollout.state == "Progressing":
                step = Step()
                await self._drive(rollout, detail, now, step)
                await self._commit(rollout, detail, step)

    async def _head(self, now: float) -> str:
        if self.mirror is None:
            return ""
        if now - self._last_fetch >= self.fetch_interval:
            self._last_fetch = now
            try:
                return await asyncio.to_thread(self.mirror.fetch)
            except RepoError as exc:
                log.warning("rollout engine: %s", exc)
        return await asyncio.to_thread(self.mirror.head)

    # -- store ------------------------------------------------------------------------------
    async def _load(self, limit: int = 20, rollout_id: str = "") -> list[StoredRollout]:
        return await asyncio.to_thread(self.store.load_rollouts, limit, rollout_id)

    async def _active(self) -> tuple[pb.Rollout, Detail] | None:
        for stored in await self._load(5):
            if stored.rollout.state in ACTIVE:
                return stored.rollout, Detail.load(stored.detail)
        return None

    async def last_completed(self, max_age: float = 0.0) -> StoredRollout | None:
        cached_at, cached = self._completed_cache
        if max_age and time.monotonic() - cached_at < max_age:
            return cached
        found = None
        for stored in await self._load(200):
            if stored.rollout.state == "Completed":
                found = stored
                break
        self._completed_cache = (time.monotonic(), found)
        return found

    async def _commit(self, rollout: pb.Rollout, detail: Detail, step: Step) -> None:
        """Persist the step (rollout, approvals), then send the approvals and events."""
        if not step.changed and not step.approvals and not step.events:
            return
        rollout.updated_at = time.time()
        await asyncio.to_thread(self.store.save_rollout, rollout, detail.dump(), step.approvals)
        self._completed_cache = (0.0, None)
        by_command: dict[tuple[str, int, str], list[str]] = {}
        for a in step.approvals:
            by_command.setdefault((a.revision, a.wave, a.reason), []).append(a.node)
        for (revision, wave, reason), nodes in by_command.items():
            entries = [self.fleet.nodes[n] for n in nodes if n in self.fleet.nodes]
            command = pb.Command(
                id=self.fleet.next_command_id(),
                approve=pb.ApproveRevision(
                    revision=revision, rollout_id=rollout.id, wave=wave, reason=reason
                ),
            )
            try:
                await self.send(entries, command)
            except Exception as exc:  # the node gets it from Registered.approval
                log.warning("sending approvals failed: %s", exc)
        if step.events:
            self.fleet.pending_events.extend(step.events)
            self.fleet.publish(step.events)

    # -- repository -------------------------------------------------------------------------
    async def policy_at(self, revision: str) -> PolicyAt:
        if revision not in self._policies:
            if self.mirror is None:
                return PolicyAt("", None)
            self._policies[revision] = await asyncio.to_thread(self.mirror.policy_at, revision)
        return self._policies[revision]

    async def _commit_info(self, revision: str) -> tuple[str, float]:
        if revision not in self._commits and self.mirror is not None:
            try:
                info = await asyncio.to_thread(self.mirror.commit, revision)
                self._commits[revision] = (info.author, info.committed_at)
            except RepoError:
                return "", 0.0
        return self._commits.get(revision, ("", 0.0))

    async def _policy_in_force(self) -> tuple[PolicyAt, str]:
        """The policy of the last completed revision; when that revision's policy file
        was refused, the last good one before it. ('' revision: none completed yet.)"""
        completed = [s.rollout for s in await self._load(200) if s.rollout.state == "Completed"]
        for rollout in completed:
            at = await self.policy_at(rollout.revision)
            if not at.present or at.policy is not None:
                return at, rollout.revision
        return PolicyAt("", None), completed[0].revision if completed else ""

    # -- starting ---------------------------------------------------------------------------
    def _views(self) -> dict[str, NodeView]:
        return {
            name: node_view(name, entry.status, entry.connected)
            for name, entry in self.fleet.nodes.items()
        }

    @staticmethod
    def _figures(views: dict[str, NodeView]) -> Snapshot:
        return {name: dict(v.verdicts) for name, v in views.items() if v.verdicts}

    async def _maybe_start(self, head: str, now: float) -> None:
        recent = await self._load(200)
        if any(s.rollout.revision == head for s in recent):
            return  # rolled out already (or rolled back: never again by itself)
        in_force, previous = await self._policy_in_force()
        await self._commit_info(head)
        at_head = await self.policy_at(head)
        rollout = pb.Rollout(
            id=f"{head[:12]}-{uuid.uuid4().hex[:6]}",
            revision=head,
            previous_revision=previous,
            started_at=now,
            updated_at=now,
        )
        detail = Detail()
        step = Step(changed=True)
        if at_head.diagnostics:
            where = "; ".join(str(d) for d in at_head.diagnostics[:5])
            self._event(
                rollout, detail, step, "Warning", "PolicyRefused",
                f"the RolloutPolicy of {head[:12]} is refused ({where}); it will not be in "
                "force after this revision completes: the last good policy stays",
            )  # fmt: skip
        policy = in_force.policy
        if policy is None:
            if not previous and not at_head.present:
                return  # no policy anywhere: every agent follows its ref
            # the first policy, or a fleet whose policy was removed: every node at once
            rollout.state = "Completed"
            rollout.message = (
                "no policy in force: every node approved at once"
                if previous
                else "first RolloutPolicy: every node approved at once"
            )
            rollout.policy = f"{at_head.file}@{head[:12]}" if at_head.present else ""
            self._approve_all(rollout, head, "no policy in force", step, now)
            self._event(rollout, detail, step, "Normal", "RolloutCompleted", rollout.message)
            await self._commit(rollout, detail, step)
            return
        views = self._views()
        connected = [v for v in views.values() if v.connected]
        rollout.state = "Progressing"
        rollout.on_failure = policy.spec.on_failure.value
        rollout.policy = f"{in_force.file}:{policy.metadata.name}@{previous[:12]}"
        for index, (name, nodes) in enumerate(select_waves(policy, connected)):
            rollout.waves.add(index=index, name=name, nodes=nodes, state="Pending")
        rollout.message = f"{len(rollout.waves)} waves over {len(connected)} nodes"
        detail.rollout_start = self._figures(views)
        self._event(
            rollout, detail, step, "Normal", "RolloutStarted",
            f"rolling out {head[:12]} (previous {previous[:12]}) under {rollout.policy}: "
            + ", ".join(f"{w.name} ({len(w.nodes)} nodes)" for w in rollout.waves),
        )  # fmt: skip
        await self._drive(rollout, detail, now, step)
        await self._commit(rollout, detail, step)

    def _approve_all(
        self, rollout: pb.Rollout, revision: str, reason: str, step: Step, now: float
    ) -> None:
        for name in sorted(self.fleet.nodes):
            step.approvals.append(
                StoredApproval(name, revision, rollout.id, len(rollout.waves), reason, now)
            )

    # -- driving ----------------------------------------------------------------------------
    def _policy(self, rollout: pb.Rollout) -> RolloutPolicy | None:
        at = self._policies.get(rollout.previous_revision)
        return at.policy if at else None

    async def _drive(self, rollout: pb.Rollout, detail: Detail, now: float, step: Step) -> None:
        await self.policy_at(rollout.previous_revision)
        await self._policy_in_force()  # fills the cache for a revision whose policy was refused
        policy = self._policy(rollout)
        if policy is None:
            in_force, _ = await self._policy_in_force()
            policy = in_force.policy
        if policy is None:
            self._finish(rollout, detail, step, now, "the policy in force is gone")
            return
        while rollout.state == "Progressing" and rollout.current_wave < len(rollout.waves):
            wave = rollout.waves[rollout.current_wave]
            if not await self._drive_wave(policy, rollout, wave, detail, now, step):
                return
            rollout.current_wave += 1
        if rollout.state == "Progressing":
            self._finish(rollout, detail, step, now, "every wave passed")

    async def _drive_wave(
        self,
        policy: RolloutPolicy,
        rollout: pb.Rollout,
        wave: pb.RolloutWave,
        detail: Detail,
        now: float,
        step: Step,
    ) -> bool:
        """Advance one wave; True when it passed (go on with the next)."""
        views = self._views()
        nodes = list(wave.nodes)
        bake, gates = wave_settings(policy, wave.index)
        if wave.state == "Pending":
            wave.state, wave.started_at, step.changed = "Progressing", now, True
            detail.wave_start = self._figures(views)
            self._event(
                rollout, detail, step, "Normal", "WaveStarted",
                f"wave {wave.index + 1}/{len(rollout.waves)} {wave.name}: "
                f"{', '.join(nodes) or 'no nodes'}",
            )  # fmt: skip
        if wave.state == "Progressing":
            approved = set(detail.approved)
            limit = max_unavailable(policy, len(nodes))
            for node in next_approvals(nodes, approved, views, rollout.revision, limit):
                detail.approved[node] = wave.index
                reason = f"wave {wave.index + 1} of {len(rollout.waves)} ({wave.name})"
                step.approvals.append(
                    StoredApproval(node, rollout.revision, rollout.id, wave.index, reason, now)
                )
            if not unready(nodes, views, rollout.revision):
                wave.state, step.changed = "Baking", True
                detail.bake_started, detail.last_eval = now, 0.0
                detail.bake_start = self._figures(views)
            elif now - wave.started_at > policy.spec.progress_deadline:
                ready = gate_eval.ready_gate(
                    ReadyGate(kind="ready"), nodes, views, rollout.revision
                )
                ready.result.message += (
                    f" within progressDeadline {policy.spec.progress_deadline:g} s"
                )
                self._set_gate(wave, ready.result)
                await self._fail(policy, rollout, wave, detail, ready.result, now, step)
                return False
            else:
                return False
        if wave.state != "Baking":
            return False
        baked = now - detail.bake_started >= bake
        if not baked and now - detail.last_eval < policy.spec.interval:
            return False
        detail.last_eval, step.changed = now, True
        outcomes = await self._evaluate(gates, rollout, nodes, views, detail)
        for outcome in outcomes:
            self._set_gate(wave, outcome.result)
        failed = next((o for o in outcomes if o.ok is False), None)
        if failed is None and baked:
            failed = next((o for o in outcomes if o.ok is None), None)
        if failed is not None:
            await self._fail(policy, rollout, wave, detail, failed.result, now, step)
            return False
        if not baked:
            return False
        wave.state, wave.finished_at = "Passed", now
        self._event(
            rollout, detail, step, "Normal", "WavePassed",
            f"wave {wave.index + 1} {wave.name} passed after {bake:g} s bake: "
            + "; ".join(o.result.message for o in outcomes),
        )  # fmt: skip
        return True

    async def _evaluate(
        self,
        gates: list[ReadyGate | VerdictGate | PromQLGate],
        rollout: pb.Rollout,
        nodes: list[str],
        views: dict[str, NodeView],
        detail: Detail,
    ) -> list[gate_eval.Outcome]:
        now_figures = self._figures(views)
        updated = set(detail.approved)
        others = [n for n, v in views.items() if v.connected and n not in updated]
        out = []
        for gate in gates:
            if isinstance(gate, ReadyGate):
                out.append(gate_eval.ready_gate(gate, nodes, views, rollout.revision))
            elif isinstance(gate, VerdictGate):
                out.append(
                    gate_eval.verdict_gate(
                        gate,
                        nodes,
                        others,
                        now_figures,
                        detail.bake_start,
                        detail.rollout_start,
                        detail.wave_start,
                    )
                )
            else:
                if self._http is None:
                    self._http = aiohttp.ClientSession()
                out.append(await gate_eval.promql_gate(gate, self.prometheus_url, self._http))
        return out

    @staticmethod
    def _set_gate(wave: pb.RolloutWave, result: pb.GateResult) -> None:
        for existing in wave.gates:
            if existing.name == result.name:
                existing.CopyFrom(result)
                return
        wave.gates.add().CopyFrom(result)

    async def _fail(
        self,
        policy: RolloutPolicy,
        rollout: pb.Rollout,
        wave: pb.RolloutWave,
        detail: Detail,
        gate: pb.GateResult,
        now: float,
        step: Step,
    ) -> None:
        wave.state, wave.finished_at, step.changed = "Failed", now, True
        figures = (
            f" (value {gate.value:g}, threshold {gate.threshold:g}, baseline {gate.baseline:g})"
        )
        self._event(
            rollout, detail, step, "Warning", "GateFailed",
            f"wave {wave.index + 1} {wave.name}: gate {gate.name} ({gate.kind}) failed: "
            f"{gate.message}{figures if gate.kind == 'verdict' else ''}",
        )  # fmt: skip
        if policy.spec.on_failure is OnFailure.ROLLBACK:
            self._roll_back(rollout, detail, step, now, f"gate {gate.name} failed")
            wave.state = "RolledBack"
            rollout.state = "RolledBack"
            rollout.message = f"wave {wave.name}: gate {gate.name} failed; rolled back"
        else:
            rollout.state = "Halted"
            rollout.message = f"wave {wave.name}: gate {gate.name} failed; halted (onFailure pause)"

    def _roll_back(
        self, rollout: pb.Rollout, detail: Detail, step: Step, now: float, why: str
    ) -> None:
        nodes = sorted(n for n in detail.approved if n not in detail.rolled_back)
        target = rollout.previous_revision
        if not target:
            return
        for node in nodes:
            step.approvals.append(
                StoredApproval(
                    node, target, rollout.id, rollout.current_wave, f"rollback: {why}", now
                )
            )
        detail.rolled_back.extend(nodes)
        self._event(
            rollout, detail, step, "Warning", "RolledBack",
            f"{len(nodes)} nodes approved {target[:12]} again ({why}): {', '.join(nodes)}",
        )  # fmt: skip

    def _finish(
        self, rollout: pb.Rollout, detail: Detail, step: Step, now: float, why: str
    ) -> None:
        rollout.state, rollout.message, step.changed = "Completed", why, True
        stragglers = [n for n in sorted(self.fleet.nodes) if n not in detail.approved]
        for node in stragglers:  # joined during the rollout, or offline at its start
            step.approvals.append(
                StoredApproval(
                    node, rollout.revision, rollout.id, len(rollout.waves), "rollout completed", now
                )
            )
            detail.approved[node] = len(rollout.waves)
        self._event(
            rollout, detail, step, "Normal", "RolloutCompleted",
            f"{rollout.revision[:12]} completed ({why}); {len(stragglers)} more nodes approved",
        )  # fmt: skip

    def _event(
        self,
        rollout: pb.Rollout,
        detail: Detail,
        step: Step,
        kind: str,
        reason: str,
        message: str,
        nf: str = "",
    ) -> None:
        detail.events += 1
        author, committed = self._commits.get(rollout.revision, ("", 0.0))
        log.log(
            logging.WARNING if kind == "Warning" else logging.INFO,
            "rollout %s: %s",
            rollout.id,
            message,
        )
        step.events.append(
            pb.Event(
                node=EVENT_NODE,
                epoch=rollout.id,
                sequence=detail.events,
                time=time.time(),
                type=kind,
                reason=reason,
                nf=nf,
                revision=rollout.revision,
                author=author,
                commit_time=committed,
                message=message,
            )
        )

    # -- operators --------------------------------------------------------------------------
    async def get(self, rollout_id: str = "") -> pb.Rollout | None:
        found = await self._load(1, rollout_id)
        if rollout_id or not found:
            return found[0].rollout if found else None
        active = await self._active()
        return active[0] if active else found[0].rollout

    async def list(self, limit: int = 20) -> list[pb.Rollout]:
        return [s.rollout for s in await self._load(limit)]

    async def act(self, action: str, rollout_id: str, reason: str) -> pb.Rollout:
        async with self._lock:
            if rollout_id:
                found = await self._load(1, rollout_id)
                if not found:
                    raise RolloutError(f"no rollout {rollout_id!r}")
                rollout, detail = found[0].rollout, Detail.load(found[0].detail)
            else:
                active = await self._active()
                if active is None:
                    raise RolloutError("no rollout in progress")
                rollout, detail = active
            await self._commit_info(rollout.revision)
            now = time.time()
            step = Step(changed=True)
            why = f" by an operator{f': {reason}' if reason else ''}"
            if rollout.state not in ACTIVE:
                raise RolloutError(f"rollout {rollout.id} is {rollout.state}: nothing to {action}")
            wave = rollout.waves[rollout.current_wave] if rollout.waves else None
            if action == "pause":
                if rollout.state != "Progressing":
                    raise RolloutError(f"rollout {rollout.id} is {rollout.state}, not Progressing")
                rollout.state, rollout.message = "Paused", f"paused{why}"
            elif action == "resume":
                if rollout.state == "Progressing":
                    raise RolloutError(f"rollout {rollout.id} is already Progressing")
                if rollout.state == "Halted" and wave is not None:
                    # judge the wave again from now on: a fresh bake
                    wave.state, wave.finished_at = "Baking", 0.0
                    detail.bake_started, detail.last_eval = now, 0.0
                    detail.bake_start = self._figures(self._views())
                    del wave.gates[:]
                rollout.state, rollout.message = "Progressing", f"resumed{why}"
            elif action == "promote":
                if wave is not None:
                    wave.state, wave.finished_at = "Passed", now
                    rollout.current_wave += 1
                rollout.state, rollout.message = "Progressing", f"wave promoted{why}"
            elif action == "abort":
                self._roll_back(rollout, detail, step, now, f"aborted{why}")
                rollout.state, rollout.message = "Aborted", f"aborted{why}"
            else:
                raise RolloutError(f"unknown action {action!r}")
            self._event(
                rollout, detail, step, "Warning" if action == "abort" else "Normal",
                f"Rollout{action.capitalize()}",
                f"{action}{why} (wave {rollout.current_wave + 1}/{len(rollout.waves)})",
            )  # fmt: skip
            if rollout.state == "Progressing" and self.is_leader():
                await self._drive(rollout, detail, now, step)
            await self._commit(rollout, detail, step)
            return rollout

    async def approval_for(self, node: str) -> pb.ApproveRevision | None:
        """What a (re)connecting node is told: its approval, else (a joining node) the
        fleet's last completed revision; None without any rollout history (no policy)."""
        rows = await asyncio.to_thread(self.store.load_approvals, node)
        if rows:
            return rows[0].to_proto()
        completed = await self.last_completed(max_age=1.0)
        if completed is None:
            return None
        return pb.ApproveRevision(
            revision=completed.rollout.revision,
            rollout_id=completed.rollout.id,
            wave=0,
            reason="joining node: the fleet's last completed revision",
        )
