"""Human-readable renderings (rich tables) of statuses and events."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from rich.table import Table

from nfctl.agent.status import AttachPointStatus, NFStatus, NodeStatus
from nfctl.cli.output import console

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


def render_node_status(status: NodeStatus) -> None:
    ready = status.condition(status.conditions[0].type) if status.conditions else None
    console.print(
        f"[bold]node[/bold] {status.node}  kernel {status.kernel}  agent {status.agent_version}"
        + ("  [magenta]SUSPENDED[/magenta]" if status.suspended else "")
    )
    if status.source:
        console.print(
            f"source {status.source.url} {status.source.ref} path {status.source.path}",
            markup=False,
        )
    console.print(
        f"lastAppliedRevision {(status.last_applied_revision or '-')[:12]}  "
        f"lastAttemptedRevision {(status.last_attempted_revision or '-')[:12]}"
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
    del ready
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
            nf.name,
            f"[{color}]{nf.state.value}[/{color}]",
            nf.version or "-",
            (nf.revision or "-")[:12],
            str(nf.program_id or "-"),
            attached or "-",
            _verdicts(nf),
            maps or "-",
            error,
        )
    console.print(table)


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
