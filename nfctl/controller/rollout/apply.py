"""Carrying out a decided step: persist the rollout with its approvals (one transaction),
then send the approvals to the nodes and emit the events; and send once more an approval
a connected node does not report holding."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.controller.fleet import Fleet, NodeEntry
from nfctl.controller.rollout.decide import Decision
from nfctl.controller.storage import StoredApproval

log = logging.getLogger(__name__)

RESEND_AFTER = 15.0  # seconds a connected node may take to report a new approval
# Approve commands go through FleetService (and its cross-replica fan-out).
SendFn = Callable[[list[NodeEntry], pb.Command], Awaitable[tuple[list[str], list[str]]]]


class Applier:
    def __init__(self, fleet: Fleet, send: SendFn) -> None:
        self.fleet = fleet
        self.store = fleet.store
        self.send = send
        self.resend_after = RESEND_AFTER
        self.last_resend = time.time()  # a new leader first lets agents report
        self._resent: set[tuple[str, str, str, int]] = set()

    async def commit(self, decision: Decision, expected: float | None) -> str | None:
        """Persist the step, then send its approvals and events: the stored detail text,
        or None with nothing persisted or sent when the stored rollout is no longer the
        one decided from (`expected`: its updated_at then; None for a new rollout)."""
        rollout, detail = decision.rollout, decision.detail
        rollout.updated_at = max(time.time(), (expected or 0.0) + 1e-6)

        def save() -> tuple[bool, str]:
            text = detail.dump()
            return self.store.save_rollout(rollout, text, decision.approvals, expected), text

        saved, text = await asyncio.to_thread(save)
        if not saved:
            log.info("rollout %s changed meanwhile; this step is dropped", rollout.id)
            return None
        by_command: dict[tuple[str, int, str], list[str]] = {}
        for a in decision.approvals:
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
        for event in decision.events:
            level = logging.WARNING if event.type == "Warning" else logging.INFO
            log.log(level, "rollout %s: %s", rollout.id, event.message)
        if decision.events:
            self.fleet.pending_events.extend(decision.events)
            self.fleet.publish(decision.events)
        return text

    async def resend_unheard(self, now: float) -> None:
        """An approval a connected node does not report holding resend_after seconds after
        it was stored is sent once more (once per leader): a leader that died between
        storing a step and sending it leaves nodes whose streams other replicas hold
        without it. An agent that refused the revision says so in its own events."""
        if now - self.last_resend < self.resend_after:
            return
        self.last_resend = now
        rows = await asyncio.to_thread(self.store.load_approvals)
        groups: dict[StoredApproval, list[NodeEntry]] = {}
        for row in rows:
            entry = self.fleet.nodes.get(row.node)
            key = (row.node, row.revision, row.rollout_id, row.wave)
            if (
                entry is None
                or not entry.connected
                or entry.status.approved_revision == row.revision
                or now - row.time < self.resend_after
                or key in self._resent
            ):
                continue
            self._resent.add(key)
            template = StoredApproval("", row.revision, row.rollout_id, row.wave, row.reason, 0.0)
            groups.setdefault(template, []).append(entry)
        for approval, entries in groups.items():
            log.warning(
                "%d nodes do not report approval %s (%s): sent again",
                len(entries),
                approval.revision[:12],
                approval.reason,
            )
            command = pb.Command(id=self.fleet.next_command_id(), approve=approval.to_proto())
            await self.send(entries, command)
