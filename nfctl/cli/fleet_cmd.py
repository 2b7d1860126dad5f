"""Operator commands against the controller: get, events, reconcile, suspend/resume."""

from __future__ import annotations

import functools
import inspect
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import typer
from google.protobuf.json_format import MessageToDict
from rich.markup import escape
from rich.table import Table

from nfctl.cli.exitcodes import UNAVAILABLE
from nfctl.cli.output import OutputFormat, console, emit_data, err_console
from nfctl.cli.render import STATE_COLORS, ago

get_app = typer.Typer(help="Read the fleet's state from the controller.", no_args_is_help=True)


CONN: Any = None  # placeholder default: with_conn supplies the real value


@dataclass
class Conn:
    address: str
    ca: Path | None
    cert: Path | None
    key: Path | None
    token_file: Path | None
    insecure: bool


CONN_PARAMS = [
    inspect.Parameter(
        "controller",
        inspect.Parameter.KEYWORD_ONLY,
        default=typer.Option(
            "localhost:9443", "--controller", envvar="NFCTL_CONTROLLER", help="controller host:port"
        ),
        annotation=str,
    ),
    inspect.Parameter(
        "tls_ca",
        inspect.Parameter.KEYWORD_ONLY,
        default=typer.Option(None, "--tls-ca", envvar="NFCTL_TLS_CA"),
        annotation=Path,
    ),
    inspect.Parameter(
        "tls_cert",
        inspect.Parameter.KEYWORD_ONLY,
        default=typer.Option(None, "--tls-cert", envvar="NFCTL_TLS_CERT"),
        annotation=Path,
    ),
    inspect.Parameter(
        "tls_key",
        inspect.Parameter.KEYWORD_ONLY,
        default=typer.Option(None, "--tls-key", envvar="NFCTL_TLS_KEY"),
        annotation=Path,
    ),
    inspect.Parameter(
        "token_file",
        inspect.Parameter.KEYWORD_ONLY,
        default=typer.Option(
            None, "--token-file", envvar="NFCTL_TOKEN_FILE", help="operator bearer token"
        ),
        annotation=Path,
    ),
    inspect.Parameter(
        "insecure",
        inspect.Parameter.KEYWORD_ONLY,
        default=typer.Option(
            False, "--insecure", envvar="NFCTL_INSECURE", help="plaintext (loopback)"
        ),
        annotation=bool,
    ),
]


def with_conn(func: Callable[..., None]) -> Callable[..., None]:
    """Give a command the controller connection options; it receives them as `conn`."""
    signature = inspect.signature(func)
    own = [p for p in signature.parameters.values() if p.name != "conn"]

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        conn = Conn(*(kwargs.pop(p.name) for p in CONN_PARAMS))
        func(*args, conn=conn, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=[*own, *CONN_PARAMS])  # type: ignore[attr-defined]
    return wrapper


@contextmanager
def fleet_stub(conn: Conn) -> Iterator[tuple[Any, list[tuple[str, str]]]]:
    from nfctl.api.nfctl.v1 import nfctl_pb2_grpc as pbg
    from nfctl.controller.auth import channel_credentials

    metadata: list[tuple[str, str]] = []
    if conn.token_file:
        metadata.append(("authorization", f"Bearer {conn.token_file.read_text().strip()}"))
    if conn.insecure:
        channel = grpc.insecure_channel(conn.address)
    else:
        channel = grpc.secure_channel(
            conn.address, channel_credentials(conn.ca, conn.cert, conn.key)
        )
    try:
        yield pbg.FleetServiceStub(channel), metadata
    except grpc.RpcError as exc:
        details = escape(exc.details() or "")
        err_console.print(f"[red]controller {conn.address}: {exc.code().name}: {details}[/red]")
        raise typer.Exit(UNAVAILABLE) from None
    finally:
        channel.close()


def _dict(message: Any) -> dict[str, Any]:
    return MessageToDict(
        message, preserving_proto_field_name=False, always_print_fields_with_no_presence=True
    )


def _selector(labels: str | None, nodes: str | None) -> Any:
    from nfctl.agent.config import parse_labels
    from nfctl.api.nfctl.v1 import nfctl_pb2 as pb

    return pb.NodeSelector(
        labels=parse_labels(labels) if labels else {},
        nodes=[n.strip() for n in (nodes or "").split(",") if n.strip()],
    )


@get_app.command("nodes")
@with_conn
def get_nodes(
    output: OutputFormat = typer.Option(OutputFormat.TEXT, "--output", "-o"),
    selector: str = typer.Option(None, "--selector", "-l", help="label selector k=v,..."),
    stale: bool = typer.Option(False, "--stale", help="only stale nodes"),
    conn: Conn = CONN,
) -> None:
    """Nodes: connection, Ready condition, revisions, NFs."""
    from nfctl.api.nfctl.v1 import nfctl_pb2 as pb

    with fleet_stub(conn) as (stub, md):
        resp = stub.ListNodes(
            pb.ListNodesRequest(selector=_selector(selector, None), only_stale=stale), metadata=md
        )
    if output is not OutputFormat.TEXT:
        emit_data(_dict(resp).get("nodes", []), output)
        return
    table = Table(show_edge=False, header_style="bold")
    for column in (
        "NODE",
        "CONNECTED",
        "READY",
        "APPROVED",
        "APPLIED",
        "ATTEMPTED",
        "NFS",
        "LAST PASS",
        "LAST SEEN",
        "MESSAGE",
    ):
        table.add_column(column)
    for node in resp.nodes:
        st = node.status
        ready = next((c for c in st.conditions if c.type == "Ready"), None)
        ready_text = (
            "-"
            if ready is None
            else (
                "[green]True[/green]"
                if ready.status
                else f"[red]False[/red] {escape(ready.reason)}"
            )
        )
        if node.stale:
            ready_text += " [yellow](stale)[/yellow]"
        nfs = ", ".join(f"{f.name}:{f.state}" for f in st.functions)
        table.add_row(
            escape(st.node),
            "yes" if node.connected else "[yellow]no[/yellow]",
            ready_text,
            st.approved_revision[:12] or "-",  # under a RolloutPolicy (docs/rollouts.md)
            st.last_applied_revision[:12] or "-",
            st.last_attempted_revision[:12] or "-",
            escape(nfs) or "-",
            _last_pass(st),
            ago(node.last_seen),
            escape(ready.message if ready else ""),
        )
    console.print(table)


def _last_pass(status: Any) -> str:
    if not status.HasField("last_reconcile"):
        return "-"
    timings = status.last_reconcile
    return f"{timings.total_seconds:.2f}s {ago(timings.started_at)}"


@get_app.command("functions")
@with_conn
def get_functions(
    name: str = typer.Argument(None, help="one NF"),
    output: OutputFormat = typer.Option(OutputFormat.TEXT, "--output", "-o"),
    conn: Conn = CONN,
) -> None:
    """NFs across the fleet: which version/revision on how many nodes, which failing and why."""
    from nfctl.api.nfctl.v1 import nfctl_pb2 as pb

    with fleet_stub(conn) as (stub, md):
        resp = stub.ListFunctions(pb.ListFunctionsRequest(name=name or ""), metadata=md)
    if output is not OutputFormat.TEXT:
        emit_data(_dict(resp).get("functions", []), output)
        return
    table = Table(show_edge=False, header_style="bold")
    for column in ("NF", "NODES", "VERSION", "REVISION", "BUILD", "STATES", "FAILING"):
        table.add_column(column)
    for fn in resp.functions:
        failing = "; ".join(
            f"{f.node}: {f.state} {f.error.message}"
            + (f" ({f.error.file}:{f.error.line})" if f.error.line else "")
            for f in fn.failing
        )
        for index, v in enumerate(fn.versions):
            states = ", ".join(
                f"[{STATE_COLORS.get(s, 'white')}]{s}[/]={n}" for s, n in sorted(v.states.items())
            )
            table.add_row(
                escape(fn.name) if index == 0 else "",
                str(fn.nodes) if index == 0 else "",
                escape(v.version) or "-",
                v.revision[:12] or "-",
                v.build_hash[:12] or "-",
                states,
                escape(failing) if index == 0 else "",
            )
    console.print(table)


def _print_events(events: list[Any], output: OutputFormat) -> None:
    if output is not OutputFormat.TEXT:
        emit_data([_dict(e) for e in events], output)
        return
    for e in events:
        _print_event(e)


def _print_event(e: Any) -> None:
    when = time.strftime("%H:%M:%S", time.localtime(e.time))
    color = "yellow" if e.type == "Warning" else "green"
    who = f" {e.nf}" if e.nf else ""
    rev = f" @{e.revision[:12]}" if e.revision else ""
    console.print(
        f"{when} [{color}]{escape(e.reason)}[/{color}] {escape(e.node)}{escape(who)}{rev}: ", end=""
    )
    console.print(e.message, markup=False, highlight=False)


@get_app.command("events")
@with_conn
def get_events(
    node: str = typer.Option("", "--node"),
    nf: str = typer.Option("", "--nf"),
    reason: str = typer.Option("", "--reason"),
    watch: bool = typer.Option(False, "--watch", "-w", help="stream new events"),
    limit: int = typer.Option(50, "--limit"),
    output: OutputFormat = typer.Option(OutputFormat.TEXT, "--output", "-o"),
    conn: Conn = CONN,
) -> None:
    """Recent events (applied, failed, drift, ...); --watch streams them."""
    from nfctl.api.nfctl.v1 import nfctl_pb2 as pb

    with fleet_stub(conn) as (stub, md):
        if not watch:
            resp = stub.GetHistory(pb.GetHistoryRequest(node=node, nf=nf, limit=limit), metadata=md)
            events = [e for e in resp.events if not reason or e.reason == reason]
            _print_events(events, output)
            return
        with suppress(KeyboardInterrupt):
            _watch(stub, md, pb.WatchEventsRequest(node=node, nf=nf, reason=reason), output)


# A resumed watch replays stored events from this long before the break (agent clocks):
# events a node made before the break but delivered after it (it was cut off too) are
# printed, and none twice (the client sends what it printed, per node).
RESUME_LOOKBACK_SECONDS = 300.0
WATCH_MAX_BACKOFF_SECONDS = 5.0
_FATAL = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNIMPLEMENTED,
}


def _watch(stub: Any, md: list[tuple[str, str]], base: Any, output: OutputFormat) -> None:
    """Stream events until interrupted; when the stream breaks (controller restart),
    reconnect with backoff and resume: no event printed twice, none left out."""
    import json

    started = time.time()
    printed: dict[str, int] = {}  # node -> highest sequence printed
    since = 0.0
    failures = 0
    while True:
        request = type(base)()
        request.CopyFrom(base)
        request.include_history = not since
        request.since = since
        request.after_sequences.update(printed)
        call = stub.WatchEvents(request, metadata=md)
        try:
            for event in call:
                failures = 0
                if event.sequence and event.sequence <= printed.get(event.node, 0):
                    continue
                printed[event.node] = max(printed.get(event.node, 0), event.sequence)
                if output is OutputFormat.TEXT:
                    _print_event(event)
                else:
                    sys.stdout.write(json.dumps(_dict(event)) + "\n")
                    sys.stdout.flush()
            reason = "stream ended"
        except grpc.RpcError as exc:
            if exc.code() in _FATAL:
                raise
            reason = f"{exc.code().name}: {exc.details() or ''}"
        except KeyboardInterrupt:
            call.cancel()
            raise
        since = max(started - 60.0, time.time() - RESUME_LOOKBACK_SECONDS)
        failures += 1
        delay = min(WATCH_MAX_BACKOFF_SECONDS, 0.25 * 2**failures)
        err_console.print(f"[yellow]watch: {escape(reason)}; reconnecting in {delay:.1f}s[/yellow]")
        time.sleep(delay)


@get_app.command("history")
@with_conn
def get_history(
    node: str = typer.Option("", "--node"),
    nf: str = typer.Option("", "--nf"),
    revision: str = typer.Option("", "--revision", help="commit SHA or prefix"),
    since: float = typer.Option(0.0, "--since", help="unix time, or negative seconds from now"),
    until: float = typer.Option(0.0, "--until"),
    limit: int = typer.Option(500, "--limit"),
    output: OutputFormat = typer.Option(OutputFormat.TEXT, "--output", "-o"),
    conn: Conn = CONN,
) -> None:
    """The audit trail: who changed what, when, and what each node did about it."""
    from nfctl.api.nfctl.v1 import nfctl_pb2 as pb

    if since < 0:
        since = time.time() + since
    with fleet_stub(conn) as (stub, md):
        resp = stub.GetHistory(
            pb.GetHistoryRequest(
                node=node, nf=nf, revision=revision, since=since, until=until, limit=limit
            ),
            metadata=md,
        )
    if output is not OutputFormat.TEXT:
        emit_data([_dict(e) for e in resp.events], output)
        return
    table = Table(show_edge=False, header_style="bold")
    for column in ("TIME", "NODE", "NF", "REASON", "REVISION", "AUTHOR", "MESSAGE"):
        table.add_column(column)
    for e in resp.events:
        table.add_row(
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.time)),
            escape(e.node),
            escape(e.nf) or "-",
            escape(e.reason),
            e.revision[:12] or "-",
            escape(e.author) or "-",
            escape(e.message),
        )
    console.print(table)


def remote_command(
    kind: str,
    conn: Conn,
    selector: str | None,
    nodes: str | None,
    nf: str | None = None,
    revision: str = "",
) -> None:
    from nfctl.api.nfctl.v1 import nfctl_pb2 as pb

    sel = _selector(selector, nodes)
    with fleet_stub(conn) as (stub, md):
        if kind == "reconcile":
            resp = stub.Reconcile(pb.ReconcileRequest(selector=sel, revision=revision), metadata=md)
        elif kind == "suspend":
            resp = stub.Suspend(pb.SuspendRequest(selector=sel, nf=nf or ""), metadata=md)
        else:
            resp = stub.Resume(pb.ResumeRequest(selector=sel, nf=nf or ""), metadata=md)
    console.print(f"{kind} sent to {len(resp.nodes)} node(s): {', '.join(resp.nodes) or '-'}")
    if resp.offline:
        console.print(f"[yellow]not connected: {', '.join(resp.offline)}[/yellow]")
