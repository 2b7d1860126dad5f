"""The rollout engine: a leader-only singleton that learns new revisions from the NF
repository, rolls each out wave by wave under the policy in force, judges every wave on its
gates and halts (and rolls back) on a failure. Operators pause, resume, promote and abort.

Each step goes down three layers: observe (observe.py: the stored rollout, the repository,
the fleet, Prometheus), decide (decide.py and actions.py: pure), apply (apply.py: the step
is persisted, with the approvals it is about to send, in one transaction, then sent). So a
new leader resumes where the last one stopped, never repeats a wave and never approves a
node twice for one step.

The policy in force for revision R is the policy of the fleet's last completed revision (a
harmful commit cannot weaken the gates that judge it); the first policy rolls out to every
node at once, as without a policy. A newer commit during a rollout is queued: it starts when
the rollout ends (completed, rolled back or aborted), and only the newest queued commit rolls
out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import replace

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.controller.fleet import Fleet
from nfctl.controller.rollout import actions, decide
from nfctl.controller.rollout.apply import Applier, SendFn
from nfctl.controller.rollout.decide import Decision, Inputs
from nfctl.controller.rollout.gitrepo import RepoMirror
from nfctl.controller.rollout.metrics import RolloutMetrics
from nfctl.controller.rollout.observe import Observer
from nfctl.controller.rollout.state import Detail, RolloutError
from nfctl.controller.storage import StoredRollout

__all__ = ["RolloutEngine", "RolloutError"]

log = logging.getLogger(__name__)

MAX_OBSERVATIONS = 4  # decisions per step: figures and promql answers asked at most once each


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
        metrics: RolloutMetrics | None = None,
    ) -> None:
        self.fleet = fleet
        self.observer = Observer(fleet, mirror, prometheus_url, fetch_interval)
        self.applier = Applier(fleet, send)
        self.tick_every = tick
        self.is_leader = is_leader
        self.metrics = metrics
        self._lock = asyncio.Lock()
        self._poke = asyncio.Event()
        self._settled_head = ""  # a head that has its rollout already: nothing to start

    # -- loop -------------------------------------------------------------------------------
    def poke(self) -> None:
        """Fetch the repository now (a webhook saw a push)."""
        self.observer.last_fetch = 0.0
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
            await self.observer.close()

    async def tick(self, now: float | None = None) -> None:
        async with self._lock:
            now = now or time.time()
            head = await self.observer.head(now)
            await self.applier.resend_unheard(now)
            active = await self.observer.active()
            if active is None:
                if head and head != self._settled_head:
                    await self._maybe_start(head, now)
                if self.metrics is not None and self.observer.newest is not None:
                    newest = self.observer.newest
                    self.metrics.seen(newest.rollout, self.observer.detail(newest))
                return
            rollout, detail = active
            if rollout.state == "Progressing":
                inputs = await self._inputs(rollout, detail, now)
                decision = await self._decide(lambda i: decide.advance(rollout, detail, i), inputs)
                if await self._apply(decision, rollout.updated_at):
                    rollout, detail = decision.rollout, decision.detail
            if self.metrics is not None:
                self.metrics.seen(rollout, detail)

    # -- observe, decide, apply -------------------------------------------------------------
    async def _inputs(self, rollout: pb.Rollout, detail: Detail, now: float) -> Inputs:
        """What a decision on `rollout` starts from: the policy chosen when it started
        (whatever completed since), the fleet now, its revision's author."""
        policy = (await self.observer.policy_at(detail.policy_revision)).policy
        author, committed = await self.observer.commit_info(rollout.revision)
        return Inputs(now, policy, self.observer.fleet_view(), author, committed)

    async def _decide(self, make: Callable[[Inputs], Decision], inputs: Inputs) -> Decision:
        decision = make(inputs)
        for _ in range(MAX_OBSERVATIONS):
            if not decision.needs:
                return decision
            if decision.need_figures:
                nfs = decide.gate_nfs(inputs.policy)
                inputs = replace(inputs, figures=await self.observer.figures(inputs.fleet, nfs))
            if decision.need_promql:
                answers = {**(inputs.promql or {})}
                answers.update(await self.observer.promql(decision.need_promql))
                inputs = replace(inputs, promql=answers)
            decision = make(inputs)
        raise RuntimeError("a rollout decision kept asking for observations")

    async def _apply(self, decision: Decision, expected: float | None) -> bool:
        """Persist and carry out a decided step; False when it was dropped (the stored
        rollout changed meanwhile) and nothing was persisted or sent."""
        if decision.empty:
            return True
        text = await self.applier.commit(decision, expected)
        if text is None:
            return False
        self.observer.saved(decision.rollout.id, text, decision.detail)
        if self.metrics is not None:
            self.metrics.applied(decision)
        return True

    async def _maybe_start(self, head: str, now: float) -> None:
        recent = [s.rollout for s in await self.observer.load(200)]
        if not actions.should_start(head, recent):
            if any(r.revision == head for r in recent):
                self._settled_head = head  # rolled out already (or rolled back: never again)
            return
        in_force, previous, policy_revision = await self.observer.policy_in_force()
        at_head = await self.observer.policy_at(head)
        author, committed = await self.observer.commit_info(head)
        inputs = Inputs(now, in_force.policy, self.observer.fleet_view(), author, committed)
        rollout_id = f"{head[:12]}-{uuid.uuid4().hex[:6]}"
        nothing = Decision(pb.Rollout(), Detail())

        def make(i: Inputs) -> Decision:
            started = actions.start(
                head, previous, in_force, policy_revision, at_head, rollout_id, i
            )
            return nothing if started is None else started

        decision = await self._decide(make, inputs)
        if decision is nothing:
            self._settled_head = head  # no policy anywhere: every agent follows its ref
            return
        await self._apply(decision, None)

    # -- operators --------------------------------------------------------------------------
    async def get(self, rollout_id: str = "") -> pb.Rollout | None:
        found = await self.observer.load(1, rollout_id)
        if rollout_id or not found:
            return found[0].rollout if found else None
        active = await self.observer.active()
        return active[0] if active else found[0].rollout

    async def list(self, limit: int = 20) -> list[pb.Rollout]:
        return [s.rollout for s in await self.observer.load(limit)]

    async def last_completed(self, max_age: float = 0.0) -> StoredRollout | None:
        return await self.observer.last_completed(max_age)

    async def act(self, action: str, rollout_id: str, reason: str) -> pb.Rollout:
        async with self._lock:
            if rollout_id:
                found = await self.observer.load(1, rollout_id)
                if not found:
                    raise RolloutError(f"no rollout {rollout_id!r}")
                rollout, detail = found[0].rollout, Detail.load(found[0].detail)
            else:
                active = await self.observer.active()
                if active is None:
                    raise RolloutError("no rollout in progress")
                rollout, detail = active
            inputs = await self._inputs(rollout, detail, time.time())
            leader = self.is_leader()
            decision = await self._decide(
                lambda i: actions.act(action, reason, rollout, detail, i, leader), inputs
            )
            if not await self._apply(decision, rollout.updated_at):
                raise RolloutError(
                    f"rollout {rollout.id} changed while this {action} was applied "
                    "(the leader stepped it): look at its status and try again"
                )
            return decision.rollout

    async def approval_for(self, node: str) -> pb.ApproveRevision | None:
        """What a (re)connecting node is told: its approval, else (a joining node) the
        fleet's last completed revision; None without any rollout history (no policy)."""
        rows = await asyncio.to_thread(self.fleet.store.load_approvals, node)
        if rows:
            return rows[0].to_proto()
        completed = await self.observer.last_completed(max_age=1.0)
        if completed is None:
            return None
        return pb.ApproveRevision(
            revision=completed.rollout.revision,
            rollout_id=completed.rollout.id,
            wave=0,
            reason="joining node: the fleet's last completed revision",
        )
