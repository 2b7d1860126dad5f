"""Human-readable renderings (rich tables) of node statuses: one renderer for a node's
status whether it comes from the agent's state dir (`nfctl status`) or from the controller
(`nfctl get node`, `nfctl get nodes`): both are the wire model (nfctl/wire/status.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime

from rich.markup import escape
from rich.table import Table

from nfctl.cli.output import console
from nfctl.wire.status import AttachPointStatus, ConditionType, NFStatus, NodeStatus

STATE_COLORS = {
    "Applied": "green",
    "Degraded": "yellow",
    "Failed": "red",
    "Pending": "cyan",
    "Suspended": "magenta",
    "NotSelected": "dim",
}


def ago(ts: float | None) -> str:
    if not ts:
        return "-"
    seconds = max(0, int(time.time() - ts))
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _verdicts(nf: NFStatus) -> str:
    """pass/drop/redirect/other totals; '(monitor)' when they are only would-be verdicts."""
    if nf.verdicts is None:
        return "-"
    counts = nf.verdicts.monitor if nf.mode == "monitor" else nf.verdicts.enforce
    text = f"{counts.passed}/{counts.dropped}/{counts.redirected}/{counts.other}"
    if nf.mode == "monitor":
        text += " (monitor)"
    if nf.verdicts.chain_errors:
        text += f" errors {nf.verdicts.chain_errors}"
    return text


@dataclass(frozen=True)
class Connection:
    """The controller's view of a node's link (absent when read from the node itself)."""

    connected: bool
    stale: bool
    last_seen: float
    peer: str = ""

    def text(self) -> str:
        state = "connected" if self.connected else "[yellow]not connected[/yellow]"
        stale = " [yellow](stale)[/yellow]" if self.stale else ""
        peer = f" from {escape(self.peer)}" if self.peer else ""
        return f"{state}{stale}{peer}, last seen {ago(self.last_seen)}"


def render_node_status(status: NodeStatus, connection: Connection | None = None) -> None:
    console.print(
        f"[bold]node[/bold] {escape(status.node)}  kernel {escape(status.kernel)}  "
        f"agent {escape(status.agent_version)}"
        + ("  [magenta]SUSPENDED[/magenta]" if status.suspended else "")
    )
    if connection is not None:
        console.print(f"controller: {connection.text()}")
    if status.source:
        console.print(
            f"source {status.source.url} {status.source.ref} path {status.source.path}",
            markup=False,
        )
    console.print(
        f"lastAppliedRevision {(status.last_applied_revision or '-')[:12]}  "
        f"lastAttemptedRevision {(status.last_attempted_revision or '-')[:12]}"
        + (
            f"  approvedRevision {status.approved_revision[:12]}"
            if status.approved_revision
            else ""
        )
    )
    if status.last_reconcile is not None:
        t = status.last_reconcile
        console.print(
            f"lastReconcile {ago(t.started_at)}: fetch {t.fetch:.3f}s  build {t.build:.3f}s  "
            f"apply {t.apply:.3f}s  total {t.total:.3f}s"
        )
    for cond in status.conditions:
        good_when = cond.type.value not in ("Stalled", "Shadowed")
        color = "green" if cond.status == good_when else "red"
        console.print(
            f"  [{color}]{cond.type.value}={cond.status}[/{color}] {cond.reason} ", end=""
        )
        console.print(cond.message, markup=False, highlight=False)
    table = Table(show_edge=False, header_style="bold")
    # VERDICTS: pass/drop/redirect/other
    columns = ("NF", "STATE", "VERSION", "REVISION", "PROG ID", "ATTACHED", "VERDICTS", "MAPS")
    for column in (*columns, "ERROR"):
        table.add_column(column)
    for nf in status.functions:
        color = STATE_COLORS.get(nf.state.value, "white")
        attached = ", ".join(_attach_point(a) for a in nf.attach_points)
        maps = ", ".join(f"{m.name}:{m.entries}" for m in nf.maps)
        error = ""
        if nf.last_error:
            where = (
                f"{nf.last_error.file}:{nf.last_error.line} "
                if nf.last_error.file and nf.last_error.line
                else ""
            )
            error = where + nf.last_error.message
        table.add_row(
            escape(nf.name),
            f"[{color}]{nf.state.value}[/{color}]",
            escape(nf.version or "-"),
            (nf.revision or "-")[:12],
            str(nf.program_id or "-"),
            escape(attached or "-"),
            _verdicts(nf),
            escape(maps or "-"),
            escape(error),
        )
    console.print(table)


def nodes_table(nodes: list[tuple[NodeStatus, Connection]]) -> Table:
    """One line per node: its link, Ready, revisions, NFs and last pass."""
    table = Table(show_edge=False, header_style="bold")
    rollouts = any(status.approved_revision for status, _ in nodes)  # a RolloutPolicy rules
    columns = ("NODE", "CONNECTED", "READY", *(("APPROVED",) if rollouts else ()), "APPLIED")
    for column in (*columns, "ATTEMPTED", "NFS", "LAST PASS", "LAST SEEN", "MESSAGE"):
        table.add_column(column)
    for status, connection in nodes:
        ready = status.condition(ConditionType.READY)
        if ready is None:
            ready_text = "-"
        elif ready.status:
            ready_text = "[green]True[/green]"
        else:
            ready_text = f"[red]False[/red] {escape(ready.reason)}"
        if connection.stale:
            ready_text += " [yellow](stale)[/yellow]"
        nfs = ", ".join(f"{f.name}:{f.state.value}" for f in status.functions)
        timings = status.last_reconcile
        table.add_row(
            escape(status.node),
            "yes" if connection.connected else "[yellow]no[/yellow]",
            ready_text,
            *(((status.approved_revision or "-")[:12],) if rollouts else ()),
            (status.last_applied_revision or "-")[:12],
            (status.last_attempted_revision or "-")[:12],
            escape(nfs) or "-",
            f"{timings.total:.2f}s {ago(timings.started_at)}" if timings else "-",
            ago(connection.last_seen),
            escape(ready.message if ready else ""),
        )
    return table


def _attach_point(point: AttachPointStatus) -> str:
    """eth0/xdp(native, dispatcher 41, link 7): the ids bpftool net/link show print."""
    details = [point.mode] if point.mode and point.mode != "tc" else []
    if point.dispatcher_id:
        details.append(f"dispatcher {point.dispatcher_id}")
    if point.link_id:
        details.append(f"link {point.link_id}")
    if point.shadowed_by:
        details.append(f"shadowed by {', '.join(point.shadowed_by)}")
    return f"{point.interface}/{point.hook}" + (f"({', '.join(details)})" if details else "")
