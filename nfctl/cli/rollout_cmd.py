"""`nfctl rollout status|history|pause|resume|promote|abort`: the controller's rollouts."""

from __future__ import annotations

import time

import typer
from rich.markup import escape
from rich.table import Table

from nfctl.cli.exitcodes import NOT_OK
from nfctl.cli.fleet_cmd import CONN, Conn, _dict, fleet_stub, with_conn
from nfctl.cli.output import OutputFormat, console, emit_data
from nfctl.cli.render import ago

rollout_app = typer.Typer(
    help="Progressive rollouts driven by the controller (docs/rollouts.md).",
    no_args_is_help=True,
)

STATE_STYLE = {
    "Completed": "green",
    "Passed": "green",
    "Progressing": "cyan",
    "Baking": "cyan",
    "Paused": "yellow",
    "Halted": "red",
    "Failed": "red",
    "RolledBack": "red",
    "Aborted": "red",
}


def _state(state: str) -> str:
    style = STATE_STYLE.get(state)
    return f"[{style}]{state}[/{style}]" if style else state


def _print_rollout(r: object) -> None:
    from nfctl.api.nfctl.v1 import nfctl_pb2 as pb

    assert isinstance(r, pb.Rollout)
    console.print(
        f"rollout {escape(r.id)}: {_state(r.state)}  revision {r.revision[:12]}  "
        f"previous {r.previous_revision[:12] or '-'}  onFailure {r.on_failure or '-'}"
    )
    console.print(f"  policy {escape(r.policy) or '-'}; {escape(r.message)}")
    table = Table(show_edge=False, header_style="bold")
    for column in ("WAVE", "NAME", "STATE", "NODES", "STARTED", "GATES"):
        table.add_column(column)
    for w in r.waves:
        gates = "\n".join(
            f"{'ok' if g.ok else 'FAIL'} {escape(g.name)}: {escape(g.message)}" for g in w.gates
        )
        marker = "*" if w.index == r.current_wave and r.state != "Completed" else ""
        table.add_row(
            f"{w.index + 1}{marker}",
            escape(w.name),
            _state(w.state),
            escape(", ".join(w.nodes)) or "-",
            ago(w.started_at) if w.started_at else "-",
            gates or "-",
        )
    if r.waves:
        console.print(table)


FAILED_STATES = ("Halted", "RolledBack", "Aborted")
# states a rollout leaves only by an operator or a newer commit: a watch ends there
SETTLED_STATES = ("Completed", "Superseded", "Paused", *FAILED_STATES)


def _progress_line(r: object) -> str:
    """One line per change while watching: state, wave, and the newest gate verdicts."""
    from nfctl.api.nfctl.v1 import nfctl_pb2 as pb

    assert isinstance(r, pb.Rollout)
    wave = r.waves[r.current_wave] if r.current_wave < len(r.waves) else None
    where = f"wave {r.current_wave + 1}/{len(r.waves)} {wave.name} {wave.state}" if wave else "-"
    gates = ", ".join(f"{g.name} {'ok' if g.ok else 'FAIL'}" for g in wave.gates) if wave else ""
    return (
        f"{time.strftime('%H:%M:%S')} {r.revision[:12]} {r.state}: {where}"
        f"{'; ' + gates if gates else ''}; {r.message}"
    )


@rollout_app.command("status")
@with_conn
def status(
    rollout_id: str = typer.Argument("", help="a rollout id [default: the current one]"),
    output: OutputFormat = typer.Option(OutputFormat.TEXT, "--output", "-o"),
    watch: bool = typer.Option(
        False,
        "--watch",
        "-w",
        help="print a line (-o json: a JSON document) at every change until the rollout "
        "completes, halts, is paused or aborted",
    ),
    interval: float = typer.Option(1.0, "--interval", min=0.1, help="seconds between polls"),
    conn: Conn = CONN,
) -> None:
    """The current (or newest) rollout: waves, their nodes and gate results. Exit code 1
    when it halted, rolled back or was aborted."""
    from nfctl.api.nfctl.v1 import nfctl_pb2 as pb

    with fleet_stub(conn) as (stub, md):
        rollout = stub.GetRollout(pb.GetRolloutRequest(id=rollout_id), metadata=md).rollout
        if watch:
            seen = b""
            while True:
                snapshot = pb.Rollout()
                snapshot.CopyFrom(rollout)
                snapshot.updated_at = 0
                key = snapshot.SerializeToString(deterministic=True)
                if key != seen:
                    seen = key
                    if output is OutputFormat.TEXT:
                        console.print(escape(_progress_line(rollout)), highlight=False)
                    else:
                        emit_data(_dict(rollout), output)
                if rollout.state in SETTLED_STATES:
                    break
                time.sleep(interval)
                request = pb.GetRolloutRequest(id=rollout.id)
                rollout = stub.GetRollout(request, metadata=md).rollout
    if not watch:
        if output is not OutputFormat.TEXT:
            emit_data(_dict(rollout), output)
        else:
            _print_rollout(rollout)
    if rollout.state in FAILED_STATES:
        raise typer.Exit(NOT_OK)


@rollout_app.command("history")
@with_conn
def history(
    limit: int = typer.Option(20, "--limit", "-n", help="newest first"),
    output: OutputFormat = typer.Option(OutputFormat.TEXT, "--output", "-o"),
    conn: Conn = CONN,
) -> None:
    """Past and current rollouts, newest first."""
    from nfctl.api.nfctl.v1 import nfctl_pb2 as pb

    with fleet_stub(conn) as (stub, md):
        rollouts = stub.ListRollouts(pb.ListRolloutsRequest(limit=limit), metadata=md).rollouts
    if output is not OutputFormat.TEXT:
        emit_data([_dict(r) for r in rollouts], output)
        return
    table = Table(show_edge=False, header_style="bold")
    for column in ("ID", "REVISION", "STATE", "WAVE", "STARTED", "MESSAGE"):
        table.add_column(column)
    for r in rollouts:
        table.add_row(
            escape(r.id),
            r.revision[:12],
            _state(r.state),
            f"{min(r.current_wave + 1, len(r.waves))}/{len(r.waves)}" if r.waves else "-",
            ago(r.started_at),
            escape(r.message),
        )
    console.print(table)


def _action(name: str, rollout_id: str, reason: str, output: OutputFormat, conn: Conn) -> None:
    from nfctl.api.nfctl.v1 import nfctl_pb2 as pb

    request = pb.RolloutActionRequest(id=rollout_id, reason=reason)
    with fleet_stub(conn) as (stub, md):
        method = getattr(stub, f"{name.capitalize()}Rollout")
        rollout = method(request, metadata=md).rollout
    if output is not OutputFormat.TEXT:
        emit_data(_dict(rollout), output)
    else:
        _print_rollout(rollout)


ID_ARG = typer.Argument("", help="a rollout id [default: the current one]")
REASON = typer.Option("", "--reason", help="recorded in the audit trail")
OUTPUT = typer.Option(OutputFormat.TEXT, "--output", "-o")


@rollout_app.command("pause")
@with_conn
def pause(
    rollout_id: str = ID_ARG, reason: str = REASON, output: OutputFormat = OUTPUT, conn: Conn = CONN
) -> None:
    """Stop approving nodes; nodes keep what they run."""
    _action("pause", rollout_id, reason, output, conn)


@rollout_app.command("resume")
@with_conn
def resume(
    rollout_id: str = ID_ARG, reason: str = REASON, output: OutputFormat = OUTPUT, conn: Conn = CONN
) -> None:
    """Go on after a pause; after a halt, bake and judge the current wave again."""
    _action("resume", rollout_id, reason, output, conn)


@rollout_app.command("promote")
@with_conn
def promote(
    rollout_id: str = ID_ARG, reason: str = REASON, output: OutputFormat = OUTPUT, conn: Conn = CONN
) -> None:
    """Pass the current wave without waiting for its bake and gates."""
    _action("promote", rollout_id, reason, output, conn)


@rollout_app.command("abort")
@with_conn
def abort(
    rollout_id: str = ID_ARG, reason: str = REASON, output: OutputFormat = OUTPUT, conn: Conn = CONN
) -> None:
    """End the rollout; every node it approved goes back to the previous revision."""
    _action("abort", rollout_id, reason, output, conn)
