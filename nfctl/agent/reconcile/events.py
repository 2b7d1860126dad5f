"""Events, the audit trail: each goes to the state dir, the log and every listener (the
controller link), stamped with the commit it is about."""

from __future__ import annotations

import logging
from collections.abc import Callable

from nfctl.agent.source import Revision
from nfctl.agent.store import AppliedNF, StateStore
from nfctl.wire.status import ErrorInfo, Event, EventType

log = logging.getLogger(__name__)


class EventLog:
    def __init__(self, node: str, store: StateStore) -> None:
        self.node = node
        self.store = store
        self.listeners: list[Callable[[Event], None]] = []

    def record(
        self,
        reason: str,
        message: str,
        nf: str | None = None,
        warning: bool = False,
        revision: Revision | None = None,
    ) -> Event:
        event = Event(
            type=EventType.WARNING if warning else EventType.NORMAL,
            reason=reason,
            message=message,
            node=self.node,
            nf=nf,
            revision=revision.sha if revision else None,
            author=f"{revision.author} <{revision.author_email}>" if revision else None,
            commit_time=revision.committed_at if revision else None,
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


def failure_message(error: ErrorInfo, kept: AppliedNF | None) -> str:
    """An NF's failure as its event says it: where, and what keeps running meanwhile."""
    where = (
        f" ({error.file}:{error.line})"
        if error.file and error.line
        else (f" ({error.file})" if error.file else "")
    )
    keep = f"; keeping version {kept.version} ({kept.revision[:12]})" if kept else ""
    return f"{error.message}{where}{keep}"
