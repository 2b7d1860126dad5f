"""The agent as its controller link sees it (the link's Protocols, nfctl/agent/controller_link.py):
status snapshots, the event log and the commands the controller may give. The only module
that knows both the link and the agent's insides; the link itself knows neither."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from nfctl.agent.approval import Approval, ApprovalGate
from nfctl.agent.store import StateStore
from nfctl.wire.status import Event, NodeStatus

if TYPE_CHECKING:
    from nfctl.agent.runner import Agent

log = logging.getLogger(__name__)


class AgentPort:
    """Status snapshots are copies taken in the reconciler's thread when it publishes (it
    holds its lock then), so the link's thread never reads a status being rewritten."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent
        self._on_status: list[Callable[[], None]] = []
        self._on_event: list[Callable[[], None]] = []
        reconciler = agent.reconciler
        with reconciler.lock:
            # with a controller, a RolloutPolicy makes the node run approved revisions only
            self.approvals = ApprovalGate.install(reconciler, agent.source)
            self._snapshot = reconciler.status.model_copy(deep=True)
            reconciler.status_listeners.append(self._published)
            reconciler.listeners.append(self._appended)

    # -- StatusProvider --------------------------------------------------------------------
    @property
    def outbox(self) -> StateStore:
        return self._agent.store

    def status_snapshot(self) -> NodeStatus:
        return self._snapshot

    def subscribe(self, on_status: Callable[[], None], on_event: Callable[[], None]) -> None:
        self._on_status.append(on_status)
        self._on_event.append(on_event)

    def _published(self, status: NodeStatus) -> None:
        self._snapshot = status.model_copy(deep=True)  # one reference swap: atomic
        for notify in self._on_status:
            notify()

    def _appended(self, event: Event) -> None:
        for notify in self._on_event:
            notify()

    # -- CommandCallbacks ------------------------------------------------------------------
    def reconcile_now(self, reason: str, revision: str) -> str:
        rev = f", revision {revision[:12]}" if revision else ""
        log.info("controller: reconcile now (%s%s)", reason or "controller", rev)
        self._agent.request_sync()
        return "reconcile scheduled"

    def set_suspended(self, nf: str | None, suspended: bool) -> str:
        current = self._agent.store.set_suspended(nf, suspended)
        verb = "suspended" if suspended else "resumed"
        self._agent.reconciler.event(
            verb.capitalize(), f"{'NF ' + nf if nf else 'node'} {verb} by the controller", nf=nf
        )
        self._agent.request_sync()
        return f"node={current.node} nfs={current.nfs}"

    def approve(self, revision: str, rollout_id: str, wave: int, reason: str) -> str:
        offered = Approval(revision=revision, rollout_id=rollout_id, wave=wave, reason=reason)
        if self.approvals.offer(offered):
            self._agent.request_sync()
        return f"approval of {revision[:12]} recorded; checked on apply"

    def reconnected(self) -> None:
        # a push the controller could not deliver while we were apart (its webhook had
        # nowhere to go): look at Git now instead of at the next tick
        self._agent.request_sync()
